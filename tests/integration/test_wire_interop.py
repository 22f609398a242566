"""A real node against a scripted peer that sends the reference's own bytes
(vectors.json: what a freshly started reference node sends on a new link)
and checks the node's answers at the byte level."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

from common.identity import address_of, subnet_of
from common.wire.packet import ControlPacket, StreamDecoder
from common.wire.tlv import Hello, Ihu, RouteRequest, Update
from tests.vectors import vectors

from .nodes import Node, wait_for

pytestmark = pytest.mark.integration


def frame(name: str) -> bytes:
    for group in ("control_packet_frame",):
        for v in vectors(group):
            if v["name"] == name:
                return bytes.fromhex(v["hex"])
    raise KeyError(name)


def read_tlvs(sock: socket.socket, until: Callable[[list[object]], bool], timeout: float) -> list[object]:
    decoder = StreamDecoder()
    seen: list[object] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(seen):
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        if not data:
            break
        seen.extend(p.tlv for p in decoder.feed(data) if isinstance(p, ControlPacket))
    return seen


def test_node_speaks_the_reference_wire_format(make_nodes: Callable[..., list[Node]]) -> None:
    (node,) = make_nodes(1)
    node.start().wait_ready()
    node_pk = bytes.fromhex(node.info["nodePubkey"])
    alice_update = frame("frame_reference_own_subnet_update")
    alice_hello = frame("frame_reference_hello_first")
    with socket.create_connection(("127.0.0.1", node.tcp_port), timeout=5) as s:
        # exactly what a new reference node sends first, then its first Hello
        s.sendall(alice_update + alice_hello)

        def complete(tlvs: list[object]) -> bool:
            return any(isinstance(t, Update) for t in tlvs) and any(isinstance(t, Ihu) for t in tlvs)

        tlvs = read_tlvs(s, complete, 10)
        updates = [t for t in tlvs if isinstance(t, Update)]
        ihus = [t for t in tlvs if isinstance(t, Ihu)]
        assert updates, f"no Update received, got {tlvs}"
        own = updates[0]
        # the node announces its own /64 with metric 0, the advertised 300 s interval and its key in the router id
        assert str(own.subnet) == node.subnet
        assert own.metric == 0 and own.interval == 30000
        assert own.router_id[:32] == node_pk and own.router_id[32:34] == b"\0\0"
        assert subnet_of(address_of(own.router_id[:32])) == own.subnet
        # our Hello is answered with an IHU: AE 0 (no address), interval 60 s
        assert ihus and ihus[0].address is None and ihus[0].interval == 6000
        for t in tlvs:
            if isinstance(t, Hello):
                assert t.flags == 0x8000 and t.interval == 2000

        # the node accepted the reference-encoded Update: Alice's subnet is a route with metric 0
        alice_subnet = "520:c662:fd00:9e92::/64"
        wait_for("Alice's subnet to be selected", lambda: alice_subnet in node.selected(), 10)
        assert node.selected()[alice_subnet]["metric"] == 0
        assert node.lookup("520:c662:fd00:9e92:5d99:34ed:ab8:82ab") == (
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        )

        # a route request for the node's own subnet is answered with its Update
        request = ControlPacket(RouteRequest(0, own.subnet)).encode()
        s.sendall(request)
        tlvs = read_tlvs(s, lambda ts: any(isinstance(t, Update) for t in ts), 10)
        assert any(isinstance(t, Update) and t.subnet == own.subnet and t.metric == 0 for t in tlvs)
