from __future__ import annotations

import pytest

from common.endpoint import Endpoint
from services.peerd.peer_table import ALIVE, CONNECTING, DEAD, PeerExists, PeerTable, PeerUnknown

EP = Endpoint.parse("tcp://192.0.2.6:9651")


def test_static_peer_dial_backoff_and_reconnect() -> None:
    t = PeerTable()
    entry = t.add_static(EP, now=0)
    with pytest.raises(PeerExists):
        t.add_static(EP, now=0)
    assert t.due_dials(0) == [entry] and entry.state == CONNECTING
    assert t.due_dials(0) == []  # not dialled twice at once
    t.dial_failed(entry, now=0)
    assert entry.state == DEAD and t.next_dial_time() == 1.0
    assert t.due_dials(0.5) == []
    assert t.due_dials(1.0) == [entry]
    t.dial_failed(entry, now=1.0)
    assert t.next_dial_time() == 3.0  # doubled backoff
    t.due_dials(3.0)
    t.connected(entry, "tcp-e-1")
    assert entry.state == ALIVE and entry.last_connected is not None
    t.disconnected("tcp-e-1", now=10)
    assert entry.state == DEAD and t.next_dial_time() == 11.0  # backoff reset after a good link


def test_inbound_peers_vanish_when_dead_and_json_shape() -> None:
    t = PeerTable()
    inbound = t.add_inbound(Endpoint.parse("tcp://[::1]:40000"), "tcp-e-2")
    doc = inbound.to_json(inbound.discovered + 5)
    assert doc == {
        "endpoint": {"proto": "tcp", "addr": {"socket": "[::1]:40000"}},
        "type": "inbound",
        "connectionState": "alive",
        "txBytes": 0,
        "rxBytes": 0,
        "discovered": 5,
        "lastConnected": doc["lastConnected"],
    }
    t.disconnected("tcp-e-2", now=0)
    assert t.entries == {}
    with pytest.raises(PeerUnknown):
        t.remove(EP)
