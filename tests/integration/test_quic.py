"""QUIC links between real --no-tun nodes on loopback, and against a test
peer built directly on aioquic with the reference's settings (no ALPN,
DATAGRAM frames, control on the first client-opened bidirectional
stream; TRANSPORTS.md 1), in both directions of dialling; bad input to
the QUIC port. The data plane over QUIC is in test_quic_netns.py."""

from __future__ import annotations

import base64
import datetime
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common import bus
from common.wire.packet import ControlPacket, DataPacket, StreamDecoder, decode_packet
from common.wire.tlv import Ihu, Update
from tests.vectors import vectors

from .nodes import Node, wait_for
from .test_messages import pop, push

pytestmark = pytest.mark.integration

ALICE_SUBNET = "520:c662:fd00:9e92::/64"
ALICE_IP = "520:c662:fd00:9e92:5d99:34ed:ab8:82ab"


def frame(name: str) -> bytes:
    for v in vectors("control_packet_frame"):
        if v["name"] == name:
            return bytes.fromhex(v["hex"])
    raise KeyError(name)


def quic_peers(node: Node) -> list[dict[str, Any]]:
    return [p for p in node.api("/api/v1/admin/peers") if p["endpoint"]["proto"] == "quic"]


def router_peers(node: Node) -> list[dict[str, Any]]:
    """The router's neighbours (one per live link)."""
    ctx = zmq.Context()
    try:
        return list(bus.rpc_call(ctx, str(node.run_dir), "router", "peers", {}, timeout_ms=3000))
    finally:
        ctx.destroy(linger=0)


def quic_alive(node: Node) -> int:
    return sum(1 for p in quic_peers(node) if p["connectionState"] == "alive")


# --- two nodes over QUIC only ----------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, Node]]:
    """A and B, B dialling A over QUIC only (shared by the tests that need a live link)."""
    base = Path(tmp_path_factory.mktemp("q", numbered=True))
    a, b = Node(base, "a"), Node(base, "b")
    b.peers = [a.quic_endpoint]
    try:
        a.start()
        b.start()
        a.wait_ready()
        b.wait_ready()
        wait_for("the QUIC link", lambda: quic_alive(a) == 1 and quic_alive(b) == 1, 30)
        yield a, b
    except BaseException:
        for n in (a, b):
            print(f"\n===== log of {n.name} =====\n{n.log_tail()}")
        raise
    finally:
        a.stop()
        b.stop()


def test_two_nodes_over_quic_only_route_and_carry_a_mebibyte(pair: tuple[Node, Node]) -> None:
    a, b = pair
    assert all(p["endpoint"]["proto"] == "quic" for p in a.api("/api/v1/admin/peers") + b.api("/api/v1/admin/peers"))
    (pa,) = quic_peers(a)
    assert pa["type"] == "inbound" and pa["endpoint"]["addr"]["socket"] == f"127.0.0.1:{b.quic_port}"
    wait_for("routes both ways", lambda: b.lookup(a.address) and a.lookup(b.address), 30)
    wait_for("selected routes", lambda: b.subnet in a.selected() and a.subnet in b.selected(), 20)
    payload = os.urandom(1 << 20)
    code, _ = push(a, b, payload)
    assert code == 201
    got = wait_for("the 1 MiB message at B", lambda: pop(b, timeout=2), 60)

    assert base64.b64decode(got["payload"]) == payload and got["srcIp"] == a.address
    # and it went over the QUIC link (wire bytes, QUIC overhead included)
    assert quic_peers(a)[0]["txBytes"] > len(payload) and quic_peers(b)[0]["rxBytes"] > len(payload)


# --- a reference-style test peer on aioquic ---------------------------------


def rcgen_like_certificate() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rcgen self signed cert")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(1975, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(4096, 1, 1, tzinfo=datetime.UTC))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("ab" * 32 + "-0000-0123456789ab")]), False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def reference_config(is_client: bool) -> QuicConfiguration:
    """quinn's settings as the reference sets them (TRANSPORTS.md 1.4)."""
    cfg = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=None,
        max_datagram_frame_size=65535,
        max_datagram_size=1452,
        idle_timeout=60.0,
        max_stream_data=10 * 1024 * 1024,
        server_name="dummy.mycelium" if is_client else None,
        verify_mode=ssl.CERT_NONE if is_client else None,
    )
    if not is_client:
        cfg.certificate, cfg.private_key = rcgen_like_certificate()
    return cfg


class TestPeer:
    """One QUIC connection driven by hand over a blocking UDP socket."""

    __test__ = False

    def __init__(self, port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.quic: QuicConnection | None = None
        self.addr: tuple[str, int] | None = None
        self.stream_id: int | None = None
        self.decoder = StreamDecoder()
        self.control: list[Any] = []
        self.datagrams: list[bytes] = []
        self.handshake = False
        self.terminated = False

    def connect(self, port: int) -> None:
        self.addr = ("127.0.0.1", port)
        self.quic = QuicConnection(configuration=reference_config(True))
        self.quic.connect(self.addr, time.monotonic())
        self.stream_id = self.quic.get_next_available_stream_id()  # open_bi()

    def send_stream(self, data: bytes) -> None:
        assert self.quic is not None and self.stream_id is not None
        self.quic.send_stream_data(self.stream_id, data)

    def send_datagram(self, data: bytes) -> None:
        assert self.quic is not None
        self.quic.send_datagram_frame(data)

    def pump(self, until: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if self.quic is not None:
                for data, addr in self.quic.datagrams_to_send(now):
                    self.sock.sendto(data, addr)
            if until():
                return True
            if now >= deadline:
                return False
            timer = self.quic.get_timer() if self.quic is not None else None
            wait = min(deadline, timer if timer is not None else deadline) - now
            self.sock.settimeout(max(0.001, wait))
            try:
                data, addr = self.sock.recvfrom(65536)
            except TimeoutError:
                if self.quic is not None and timer is not None and time.monotonic() >= timer:
                    self.quic.handle_timer(time.monotonic())
                    self._events()
                continue
            if self.quic is None:  # the first Initial of a node dialling us
                self.addr = addr
                from aioquic.buffer import Buffer
                from aioquic.quic.packet import pull_quic_header

                header = pull_quic_header(Buffer(data=data), host_cid_length=8)
                self.quic = QuicConnection(
                    configuration=reference_config(False), original_destination_connection_id=header.destination_cid
                )
            self.quic.receive_datagram(data, addr, time.monotonic())
            self._events()

    def _events(self) -> None:
        assert self.quic is not None
        while (event := self.quic.next_event()) is not None:
            if isinstance(event, events.HandshakeCompleted):
                assert event.alpn_protocol is None
                self.handshake = True
            elif isinstance(event, events.StreamDataReceived):
                if self.stream_id is None:
                    self.stream_id = event.stream_id  # accept_bi()
                assert event.stream_id == self.stream_id == 0
                self.control += [p.tlv for p in self.decoder.feed(event.data) if isinstance(p, ControlPacket)]
            elif isinstance(event, events.DatagramFrameReceived):
                self.datagrams.append(event.data)
            elif isinstance(event, events.ConnectionTerminated):
                self.terminated = True

    def close(self) -> None:
        self.sock.close()


def exchange_with(node: Node, peer: TestPeer) -> None:
    """Hello/IHU/Update both ways, then one data packet each way."""

    def answered() -> bool:
        return any(isinstance(t, Update) for t in peer.control) and any(isinstance(t, Ihu) for t in peer.control)

    assert peer.pump(answered, 15), f"no Update and IHU from the node: {peer.control}"
    own = next(t for t in peer.control if isinstance(t, Update))
    assert str(own.subnet) == node.subnet and own.router_id[:32] == bytes.fromhex(node.info["nodePubkey"])
    ihu = next(t for t in peer.control if isinstance(t, Ihu))
    assert ihu.interval == 6000
    wait_for("Alice's subnet selected", lambda: (peer.pump(lambda: False, 0.1), ALICE_SUBNET in node.selected())[1], 15)
    # node -> peer: a message to Alice leaves as an encrypted data packet in one DATAGRAM frame
    code, _ = push(node, _Addr(ALICE_IP), b"hello alice")  # type: ignore[arg-type]
    assert code == 201
    assert peer.pump(lambda: bool(peer.datagrams), 15), "no datagram from the node"
    packet = decode_packet(peer.datagrams[0])
    assert isinstance(packet, DataPacket) and packet.dst == socket.inet_pton(socket.AF_INET6, ALICE_IP)
    assert packet.src == socket.inet_pton(socket.AF_INET6, node.address)
    # peer -> node: a data packet for the node arrives through the datagram path
    before = node.counters("peerd-quic").get("data_local", 0)
    body = os.urandom(120)
    src = socket.inet_pton(socket.AF_INET6, ALICE_IP)
    peer.send_datagram(DataPacket(src, socket.inet_pton(socket.AF_INET6, node.address), 64, body).encode())
    peer.pump(lambda: False, 0.3)
    wait_for("the data packet delivered", lambda: node.counters("peerd-quic").get("data_local", 0) > before, 10)


class _Addr:
    """Just enough of a Node for ``push``'s destination."""

    def __init__(self, address: str) -> None:
        self.address = address


def test_reference_style_peer_dials_the_node(make_nodes: Callable[..., list[Node]]) -> None:
    (node,) = make_nodes(1)
    node.start().wait_ready()
    peer = TestPeer()
    try:
        peer.connect(node.quic_port)
        # exactly what a new reference node writes first on its stream
        peer.send_stream(frame("frame_reference_own_subnet_update") + frame("frame_reference_hello_first"))
        assert peer.pump(lambda: peer.handshake, 10), "no QUIC handshake"
        exchange_with(node, peer)
        (p,) = quic_peers(node)
        assert p["type"] == "inbound" and p["connectionState"] == "alive"
        # the peer restarts on the same port (as a reference node re-dials from 9651):
        # the new connection replaces the old link at once
        peer.close()
        peer = TestPeer(peer.port)
        peer.connect(node.quic_port)
        peer.send_stream(frame("frame_reference_own_subnet_update") + frame("frame_reference_hello_first"))
        assert peer.pump(lambda: any(isinstance(t, Update) for t in peer.control), 15)
        wait_for("one link, the new one", lambda: len(router_peers(node)) == 1 and len(quic_peers(node)) == 1, 10)
    finally:
        peer.close()


def test_node_dials_a_reference_style_peer(make_nodes: Callable[..., list[Node]]) -> None:
    (node,) = make_nodes(1)
    node.start().wait_ready()
    peer = TestPeer()
    try:
        status, body = node.api_status("/api/v1/admin/peers", "POST", {"endpoint": f"quic://127.0.0.1:{peer.port}"})
        assert status == 204, body
        assert peer.pump(lambda: peer.handshake and bool(peer.control), 15), "the node did not dial and write"
        peer.send_stream(frame("frame_reference_own_subnet_update") + frame("frame_reference_hello_first"))
        exchange_with(node, peer)
        (p,) = quic_peers(node)
        assert p["type"] == "static" and p["connectionState"] == "alive"
    finally:
        peer.close()


# --- bad input --------------------------------------------------------------


def test_bad_input_to_the_quic_port_is_counted_and_links_survive(pair: tuple[Node, Node]) -> None:
    a, b = pair
    target = ("127.0.0.1", a.quic_port)
    # a peer that completes its handshake and never opens the stream
    silent = TestPeer()
    try:
        silent.connect(a.quic_port)
        assert silent.pump(lambda: silent.handshake, 10)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            # garbage of every size, short headers for unknown connections, bogus long headers
            for n in (0, 1, 5, 40, 1200, 1500, 9000, 65000):
                s.sendto(os.urandom(n), target)
            s.sendto(b"\x40" + os.urandom(60), target)
            s.sendto(b"\xc0\x00\x00\x00\x01" + os.urandom(1300), target)
            # a flood of half-open handshakes: real Initials that never continue
            for _ in range(40):
                client = QuicConnection(configuration=reference_config(True))
                client.connect(target, time.monotonic())
                for data, _ in client.datagrams_to_send(time.monotonic()):
                    s.sendto(data, target)

        def counted() -> bool:
            c = a.counters("peerd-quic")
            return (
                c.get("quic_drop_handshake_limit", 0) > 0
                and c.get("quic_drop_malformed", 0) + c.get("quic_drop_unknown_cid", 0) + c.get("quic_drop_short", 0)
                > 0
            )

        wait_for("the drops counted", counted, 10)
        # the real link still carries traffic while the half-open ones wait out their 10 s
        wait_for("routes", lambda: b.lookup(a.address) and a.lookup(b.address), 20)
        code, _ = push(b, a, b"still here")
        assert code == 201
        got = wait_for("a message over the surviving link", lambda: pop(a, timeout=2), 20)
        assert got["srcIp"] == b.address
        # the silent peer is dropped after 10 s; the half-open ones too
        assert silent.pump(lambda: silent.terminated, 20), "the silent peer was not dropped"
        wait_for(
            "timeouts counted", lambda: a.counters("peerd-quic").get("quic_inbound_handshake_timeout", 0) >= 10, 10
        )
        assert quic_alive(a) == 1 and quic_alive(b) == 1
        # and new peers are accepted again
        late = TestPeer()
        try:
            late.connect(a.quic_port)
            assert late.pump(lambda: late.handshake, 10)
        finally:
            late.close()
    finally:
        silent.close()
