"""Link-local discovery engine (PROTOCOL.md 2.7): interfaces joined and
greeted, the 60 s interval, what a datagram means, and bad input counted."""

from __future__ import annotations

from common.endpoint import Endpoint
from common.wire.beacon import Beacon
from services.peerd.discovery import BEACON_INTERVAL, BURST, Discovery, Join, Send
from services.peerd.discovery_socket import ARPHRD_NONE, link_local_interfaces, qualifies
from services.peerd.peer_table import DISCOVERED, MAX_DISCOVERED, PeerTable

OWN = bytes(range(32)) + b"\0\0" + b"abcdef"
OTHER = bytes(range(1, 33)) + b"\0\0" + b"ghijkl"


def test_interfaces_joined_greeted_and_resent_every_minute() -> None:
    d = Discovery(OWN, 9651, private=False, now=0.0)
    assert d.interfaces({3, 2}, 0.0) == [Join(2), Join(3)]
    beacon = Beacon(9651, OWN).encode()
    assert d.join_result(2, True) == [Send(2, beacon)]  # a new interface is greeted at once
    assert d.join_result(3, False) == [] and d.counters["discovery_join_failed"] == 1
    assert d.tick(0.0) == []  # the greeting was the start-up send
    assert d.tick(BEACON_INTERVAL - 1) == []
    assert d.interfaces({2, 3}, 5.0) == [Join(3)]  # retried at the next scan
    d.join_result(3, True)
    assert d.interfaces({3}, 10.0) == []  # 2 went away: forgotten
    assert d.tick(BEACON_INTERVAL) == [Send(3, beacon)]
    assert d.next_event() == 15.0  # the next scan comes before the next send


def test_beacon_makes_a_peer_tcp_or_tls() -> None:
    beacon = Beacon(4242, OTHER).encode()
    assert Discovery(OWN, 9651, False, 0.0).datagram(beacon, "fe80::1", 7, 0.0) == Endpoint("tcp", "fe80::1%7", 4242)
    ep = Discovery(OWN, 9651, True, 0.0).datagram(beacon, "fe80::1%veth0", 7, 0.0)
    assert ep is not None and str(ep) == "tls://[fe80::1%7]:4242"


def test_bad_beacons_are_counted_not_kept() -> None:
    d = Discovery(OWN, 9651, False, 0.0)
    good = Beacon(4242, OTHER).encode()
    cases = [
        (good, "2001:db8::1", 7, "discovery_dropped_not_link_local"),
        (good, "fe80:0:0:1::1", 7, "discovery_dropped_not_link_local"),  # fe80::/10 but not fe80::/64
        (good, "192.0.2.1", 0, "discovery_dropped_not_link_local"),
        (good, "fe80::1", 0, "discovery_dropped_not_link_local"),  # no interface
        (good, "nonsense", 7, "discovery_dropped_source"),
        (good[:49], "fe80::1", 7, "discovery_dropped_malformed"),
        (good + b"x", "fe80::1", 7, "discovery_dropped_malformed"),
        (b"MYCELIUM" + good[8:], "fe80::1", 7, "discovery_dropped_malformed"),
        (Beacon(0, OTHER).encode(), "fe80::1", 7, "discovery_dropped_malformed"),
        (Beacon(9651, OWN).encode(), "fe80::2", 7, "discovery_dropped_own"),
        (Beacon(9651, OWN[:32] + b"\0\0zzzzzz").encode(), "fe80::2", 7, "discovery_dropped_own"),
    ]
    for i, (data, host, scope, counter) in enumerate(cases):
        before = d.counters[counter]
        assert d.datagram(data, host, scope, float(i)) is None, counter
        assert d.counters[counter] == before + 1, counter
    assert d.counters["discovery_beacons"] == 0


def test_a_flood_is_rate_limited_and_counted() -> None:
    d = Discovery(OWN, 9651, False, 0.0)
    good = Beacon(4242, OTHER).encode()
    results = [d.datagram(good, "fe80::1", 7, 0.0) for _ in range(10_000)]
    assert sum(r is not None for r in results) == int(BURST)
    assert d.counters["discovery_dropped_rate"] == 10_000 - int(BURST)
    assert d.datagram(good, "fe80::1", 7, 1.0) is not None  # the bucket refills


def test_peer_table_dedups_bounds_and_forgets_failing_discovered_peers() -> None:
    t = PeerTable()
    ep = Endpoint("tcp", "fe80::1%7", 9651)
    assert t.add_discovered(ep, 0.0) == "added"
    assert t.add_discovered(ep, 0.0) == "known"
    entry = t.entries[str(ep)]
    assert entry.kind == DISCOVERED and entry.to_json(0)["type"] == "linkLocalDiscovery"
    now = 0.0
    for attempt in range(3):
        assert t.due_dials(now) == [entry]
        forgotten = t.dial_failed(entry, now)
        assert forgotten == (attempt == 2)
        now += 10
    assert str(ep) not in t.entries
    for i in range(MAX_DISCOVERED + 10):
        t.add_discovered(Endpoint("tcp", f"fe80::{i + 2:x}%7", 9651), 0.0)
    assert sum(e.kind == DISCOVERED for e in t.entries.values()) == MAX_DISCOVERED
    assert t.add_discovered(Endpoint("tcp", "fe80::ffff%7", 9651), 0.0) == "full"


def test_a_link_resets_the_failure_count() -> None:
    t = PeerTable()
    ep = Endpoint("tcp", "fe80::1%7", 9651)
    t.add_discovered(ep, 0.0)
    entry = t.entries[str(ep)]
    for now in (0.0, 10.0):
        t.due_dials(now)
        t.dial_failed(entry, now)
    t.due_dials(20.0)
    t.connected(entry, "tcp-x-1")
    t.disconnected("tcp-x-1", 30.0)
    t.due_dials(40.0)
    assert not t.dial_failed(entry, 40.0) and str(ep) in t.entries


def test_interface_filter() -> None:
    text = (
        "fe800000000000000000000000000001 02 40 20 80 eth0\n"
        "fe800000000000000000000000000002 03 40 20 40 eth1\n"  # tentative (DAD running)
        "20010db8000000000000000000000001 04 40 00 80 eth2\n"  # no link-local address
        "fe800000000000000000000000000003 05 40 20 80 wg0\n"
        "garbage\n"
    )
    assert link_local_interfaces(text) == {2: "eth0", 5: "wg0"}
    up_mc = 0x1 | 0x1000
    assert qualifies(up_mc, 1)
    assert not qualifies(0x1000, 1)  # down
    assert not qualifies(up_mc | 0x8, 772)  # loopback
    assert not qualifies(up_mc | 0x10, 1)  # point-to-point
    assert not qualifies(0x1, 1)  # no multicast
    assert not qualifies(up_mc, ARPHRD_NONE)  # TUN
