"""The QUIC endpoint (services/peerd/links/quic_endpoint.py) with two
endpoints wired together in memory and a fake clock, as aioquic's own
tests pair connections: no sockets, no sleeps."""

from __future__ import annotations

import os
from collections import Counter

from aioquic.quic.connection import QuicConnection
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from common.wire.packet import ControlPacket, DataPacket, decode_packet
from common.wire.tlv import Hello
from services.peerd.links import quic_endpoint as qe
from services.peerd.links.base import COST_QUIC, ip_cost
from services.peerd.links.quic_endpoint import (
    ControlIn,
    DataIn,
    DialFailed,
    LinkDown,
    LinkUp,
    QuicEndpoint,
    base_configuration,
    server_configuration,
)

A = ("::ffff:10.0.0.1", 9651)
B = ("::ffff:10.0.0.2", 9651)


class Wire:
    """Two endpoints and a clock; ``pump`` moves datagrams until quiet."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.a = QuicEndpoint(server_configuration(os.urandom(32)), Counter())
        self.b = QuicEndpoint(server_configuration(os.urandom(32)), Counter())
        self.lost: list[bytes] = []
        self.drop_to_b = False

    def pump(self, rounds: int = 20) -> None:
        for _ in range(rounds):
            moved = 0
            for src, src_addr, dst, dst_addr in ((self.a, A, self.b, B), (self.b, B, self.a, A)):
                for group, to in src.transmit(self.now):
                    if to != dst_addr:
                        continue  # to a client that is not there
                    for data in group:
                        assert len(data) <= qe.MAX_UDP_PAYLOAD
                        moved += 1
                        if dst is self.b and self.drop_to_b:
                            self.lost.append(data)
                            continue
                        dst.receive(data, src_addr, self.now)
                    dst.flush_received()
            self.now += 0.001
            if not moved:
                return

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            timer = min(t for t in (self.a.next_timer(), self.b.next_timer(), end) if t is not None)
            self.now = max(self.now, timer)
            self.a.handle_timer(self.now)
            self.b.handle_timer(self.now)
            self.pump()
            self.now += 0.001


def link(w: Wire) -> tuple[qe.QuicLinkConn, qe.QuicLinkConn]:
    """A dials B; B's side comes up when A writes its first control packet."""
    conn_a = w.a.dial(B, w.now)
    w.pump()
    ups = [e for e in w.a.events if isinstance(e, LinkUp)]
    assert ups and ups[0].conn is conn_a
    assert conn_a.stream_id == 0
    assert not [e for e in w.b.events if isinstance(e, LinkUp)]  # not before the stream opens
    assert w.a.send_control(conn_a, hello(1))
    w.pump()
    (up_b,) = [e for e in w.b.events if isinstance(e, LinkUp)]
    w.a.events.clear()
    w.b.events.clear()
    return conn_a, up_b.conn


def hello(seq: int) -> bytes:
    return ControlPacket(Hello(0, seq, 2000)).encode()


def data_packet(size: int, tag: int = 0) -> bytes:
    body = bytes([tag]) * size
    return DataPacket(b"\x04" + bytes(15), b"\x05" + bytes(15), 64, body).encode()


def test_certificate_is_shaped_like_rcgen() -> None:
    cfg = server_configuration(bytes(range(32)))
    cert = cfg.certificate
    assert isinstance(cert, x509.Certificate) and isinstance(cfg.private_key, ec.EllipticCurvePrivateKey)
    assert cert.version == x509.Version.v3 and isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.subject == cert.issuer and "rcgen self signed cert" in cert.subject.rfc4514_string()
    assert cert.not_valid_before_utc.year == 1975 and cert.not_valid_after_utc.year == 4096
    (ext,) = cert.extensions
    names = ext.value.get_values_for_type(x509.DNSName)
    assert names[0].startswith(bytes(range(32)).hex() + "-0000-")
    assert cert.serial_number.bit_length() <= 159
    # a fresh key every time
    assert server_configuration(bytes(32)).certificate.public_key() != cert.public_key()


def test_no_alpn_sni_and_no_verification() -> None:
    client = base_configuration(is_client=True)
    assert client.alpn_protocols is None and client.server_name == "dummy.mycelium"
    assert client.verify_mode == 0  # ssl.CERT_NONE
    assert client.max_datagram_frame_size and client.max_datagram_size <= 1472
    assert base_configuration(is_client=False).alpn_protocols is None


def test_link_up_control_and_data_both_ways() -> None:
    w = Wire()
    conn_a, conn_b = link(w)
    assert conn_b.inbound and conn_b.stream_id == 0
    assert conn_a.handshake_time is not None and conn_a.rtt is not None
    # the first control packet reached B
    w.a.send_control(conn_a, hello(2) + hello(3))
    w.pump()
    ctl = [p.tlv.seqno for e in w.b.events if isinstance(e, ControlIn) for p in e.packets]
    assert ctl == [2, 3]
    # B answers on the same stream
    w.b.send_control(conn_b, hello(7))
    w.pump()
    assert [p.tlv.seqno for e in w.a.events if isinstance(e, ControlIn) for p in e.packets] == [7]
    # data both ways, as a batch, each packet its own DATAGRAM frame
    blob = b"".join(data_packet(100 + i, i) for i in range(20))
    assert w.a.send_data(conn_a, blob) == 20
    assert w.b.send_data(conn_b, data_packet(50)) == 1
    w.pump()
    got = [e for e in w.b.events if isinstance(e, DataIn)]
    packets = [bytes(e.buf[o : o + 40 + 100 + i]) for e in got for i, o in enumerate(e.offsets)]
    assert len(packets) == 20 and packets[5] == data_packet(105, 5)
    assert sum(len(e.offsets) for e in got) == 20 and len(got) <= 3  # batched per receive round
    back = [e for e in w.a.events if isinstance(e, DataIn)]
    assert len(back) == 1 and bytes(back[0].buf) == data_packet(50)


def test_big_data_packet_goes_on_the_stream_and_never_blocks_datagrams() -> None:
    w = Wire()
    conn_a, _ = link(w)
    limit = conn_a.datagram_limit()
    assert limit == qe.MAX_UDP_PAYLOAD - 30  # 1422 at 1452, TRANSPORTS.md 1.3
    big = data_packet(limit)  # 40 bytes more than the limit
    small = data_packet(100, 9)
    assert w.a.send_data(conn_a, big + small + data_packet(limit - 40, 3)) == 3
    assert w.a.counters["quic_data_on_stream"] == 1
    w.pump()
    got = b"".join(bytes(e.buf) for e in w.b.events if isinstance(e, DataIn))
    assert big in got and small in got and data_packet(limit - 40, 3) in got


def test_datagram_queue_is_bounded() -> None:
    w = Wire()
    conn_a, _ = link(w)
    n = qe.MAX_PENDING_DATAGRAMS + 100
    queued = w.a.send_data(conn_a, data_packet(1000) * n)
    assert queued == qe.MAX_PENDING_DATAGRAMS
    assert w.a.counters["quic_datagram_queue_full"] == 100


def test_truncated_and_garbage_datagrams_are_counted_link_survives() -> None:
    w = Wire()
    conn_a, conn_b = link(w)
    good = data_packet(200)
    for bad in (good[:-1], good + b"x", b"\x07" * 60, b"\x01\x01\x00"):
        conn_a.quic.send_datagram_frame(bad)
    w.a.dirty.add(conn_a)
    w.pump()
    c = w.b.counters
    assert c["quic_datagram_bad_length"] == 2 and c["quic_datagram_malformed"] == 2
    w.a.send_data(conn_a, good)
    w.pump()
    assert any(bytes(e.buf) == good for e in w.b.events if isinstance(e, DataIn))
    assert conn_b.up and not conn_b.closed


def test_garbage_udp_is_dropped_without_state() -> None:
    w = Wire()
    conn_a, _ = link(w)
    for junk in (b"", b"\x00", os.urandom(40), b"\x40" + os.urandom(100), b"\xc0" + os.urandom(1300)):
        w.b.receive(junk, ("::ffff:10.9.9.9", 4000), w.now)
    assert len(w.b.conns) == 1 and sum(w.b.counters.values()) >= 4
    w.a.send_control(conn_a, hello(5))
    w.pump()
    assert any(isinstance(e, ControlIn) for e in w.b.events)


def test_half_open_handshakes_are_limited_and_expire() -> None:
    w = Wire()
    # ten clients send their Initial and nothing more
    for i in range(qe.MAX_PENDING_HANDSHAKES + 5):
        client = QuicConnection(configuration=base_configuration(is_client=True))
        addr = (f"::ffff:10.1.0.{i}", 5000)
        client.connect(B, w.now)
        for data, _ in client.datagrams_to_send(w.now):
            w.b.receive(data, addr, w.now)
    assert w.b.pending_handshakes() == qe.MAX_PENDING_HANDSHAKES
    assert w.b.counters["quic_drop_handshake_limit"] == 5
    w.b.transmit(w.now)  # their answers go nowhere
    # a real peer is refused while the table is full, then accepted once they time out
    w.advance(qe.HANDSHAKE_TIMEOUT + 1)
    assert w.b.counters["quic_inbound_handshake_timeout"] == qe.MAX_PENDING_HANDSHAKES
    assert w.b.pending_handshakes() == 0
    link(w)


def test_peer_that_never_opens_the_stream_is_dropped() -> None:
    w = Wire()
    conn_a = w.a.dial(B, w.now)
    w.pump()
    assert conn_a.up
    w.advance(qe.HANDSHAKE_TIMEOUT + 1)
    assert w.b.counters["quic_inbound_handshake_timeout"] == 1
    assert not [e for e in w.b.events if isinstance(e, LinkUp)]
    w.advance(1)
    assert any(isinstance(e, LinkDown) and e.conn is conn_a for e in w.a.events)


def test_dial_to_nobody_fails_in_time() -> None:
    w = Wire()
    w.drop_to_b = True
    conn = w.a.dial(B, w.now)
    w.advance(qe.DIAL_TIMEOUT + 1)
    assert any(isinstance(e, DialFailed) and e.conn is conn for e in w.a.events)
    assert not w.a.conns or all(c.closed for c in w.a.conns)


def test_keep_alive_keeps_an_idle_link() -> None:
    w = Wire()
    conn_a, conn_b = link(w)
    w.advance(qe.IDLE_TIMEOUT * 2)
    assert conn_a.up and not conn_a.closed and not conn_b.closed
    assert not [e for e in w.a.events + w.b.events if isinstance(e, LinkDown)]


def test_close_reaches_the_other_side() -> None:
    w = Wire()
    conn_a, conn_b = link(w)
    w.a.close(conn_a, "bye")
    w.pump()
    assert any(isinstance(e, LinkDown) and e.conn is conn_b for e in w.b.events)
    assert not [e for e in w.a.events if isinstance(e, LinkDown)]  # the closer knows already


def test_control_in_a_datagram_is_accepted() -> None:
    w = Wire()
    conn_a, _ = link(w)
    conn_a.quic.send_datagram_frame(hello(9))
    w.a.dirty.add(conn_a)
    w.pump()
    assert [p.tlv.seqno for e in w.b.events if isinstance(e, ControlIn) for p in e.packets] == [9]
    assert isinstance(decode_packet(hello(9)), ControlPacket)


def test_static_cost() -> None:
    assert ip_cost("10.0.0.1", COST_QUIC) == 12 and ip_cost("::ffff:10.0.0.1", COST_QUIC) == 12
    assert ip_cost("2001:db8::1", COST_QUIC) == 7 and ip_cost("fe80::1%eth0", COST_QUIC) == 7
    assert qe.socket_addr("10.0.0.1", 5) == ("::ffff:10.0.0.1", 5)
    assert qe.socket_addr("2001:0db8:0::1", 5) == ("2001:db8::1", 5)
    assert qe.peer_host(("::ffff:10.0.0.1", 5)) == "10.0.0.1"


def test_a_library_fault_ends_only_that_connection(monkeypatch: object) -> None:
    w = Wire()
    conn_a, conn_b = link(w)
    other_a = w.a.dial(B, w.now)
    w.pump()
    w.a.send_control(other_a, hello(1))
    w.pump()

    def boom(*_: object) -> None:
        raise RuntimeError("unexpected")

    conn_b.quic.receive_datagram = boom  # type: ignore[method-assign]
    w.a.send_control(conn_a, hello(2))
    w.a.send_control(other_a, hello(3))
    w.pump()
    assert w.b.counters["quic_library_errors"] == 1
    assert any(isinstance(e, LinkDown) and e.conn is conn_b for e in w.b.events)
    assert [p.tlv.seqno for e in w.b.events if isinstance(e, ControlIn) for p in e.packets][-1] == 3
