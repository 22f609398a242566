"""QUIC as the reference speaks it (TRANSPORTS.md section 1), sans-IO.

``QuicEndpoint`` is what one UDP socket sees: datagrams in (``receive``),
datagrams out (``transmit``), a clock (``handle_timer``/``next_timer``), and
events for the shell (link up, control packets, data packets, link down).
It drives aioquic's ``QuicConnection`` objects and demultiplexes them by
connection ID, so one socket both accepts and dials, as the reference's
quinn endpoint does (an outbound connection of a reference node comes from
its QUIC port).

Wire rules kept here, once:
* TLS: no ALPN either side; the accepting side presents a fresh self-signed
  P-256 certificate shaped like rcgen's; the dialling side sends SNI
  ``dummy.mycelium`` and does not verify (the CertificateVerify signature is
  still checked by aioquic).
* control packets on the first client-opened bidirectional stream, framed
  exactly like the TCP stream; data packets one per DATAGRAM frame; a data
  packet too large for a datagram goes on that stream (the reference
  accepts data there), never into aioquic's datagram queue, where it would
  block every later datagram (TRANSPORTS.md 1.3, point 4).
* idle timeout 60 s, a PING after 20 s without sending, at most 10
  inbound handshakes pending, 10 s for an inbound connection to finish its
  handshake *and* open the stream.

Everything a peer can send is bounded: per connection the datagram queue
(``MAX_PENDING_DATAGRAMS``) and the stream backlog (``MAX_STREAM_BACKLOG``)
drop and count when full; bad datagrams are counted and affect at most the
connection they name.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import itertools
import os
import socket
import ssl
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionState
from aioquic.quic.packet import QuicPacketType, encode_quic_version_negotiation, pull_quic_header
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.wire.errors import CodecError
from common.wire.packet import DATA_PREFIX_SIZE, TYPE_CONTROL, TYPE_DATA, VERSION, ControlPacket, StreamDecoder

SERVER_NAME = "dummy.mycelium"  # what the reference client sends as SNI
CID_LENGTH = 8  # quinn's HashedConnectionIdGenerator makes 8-byte IDs too
MAX_UDP_PAYLOAD = 1452  # static (aioquic has no PMTUD): IPv6-safe and below the reference's 1472 receive limit
RECEIVE_BUFFER = 65535  # receive UDP payloads up to the largest (a GRO batch is cut by segment size)
MAX_DATAGRAM_FRAME_SIZE = 65536  # advertised; without it the reference drops the link at the first data packet
IDLE_TIMEOUT = 60.0
KEEP_ALIVE = 20.0
HANDSHAKE_TIMEOUT = 10.0  # inbound: handshake and first stream data (INBOUND_QUIC_HANDSHAKE_TIMEOUT)
DIAL_TIMEOUT = 5.0  # outbound handshake, as the TCP dial timeout
MAX_PENDING_HANDSHAKES = 10  # MAX_INBOUND_CONCURRENT_QUICK_HANDSHAKES
MAX_CONNECTIONS = 4096  # every connection, linked or not: one peer cannot take the table
MAX_PENDING_DATAGRAMS = 2048  # per connection, in aioquic's queue (about 3 MB of full-size packets)
MAX_STREAM_BACKLOG = 4 * 1024 * 1024  # unacknowledged bytes on the control stream before drops
MAX_STREAM_DATA = 10 * 1024 * 1024  # the reference's stream receive window
MAX_DATA = 16 * 1024 * 1024
# what a DATAGRAM frame costs in one 1-RTT packet besides the payload: 1 header
# byte, the peer's CID, a 2-byte packet number, the 16-byte AEAD tag, the frame
# type and a 2-byte length
DATAGRAM_OVERHEAD = 1 + 2 + 16 + 1 + 2

Addr = tuple[str, int]
DRAIN_STATES = (QuicConnectionState.DRAINING, QuicConnectionState.TERMINATED)


def socket_addr(host: str, port: int) -> Addr:
    """The address as a dual-stack IPv6 socket reports it: IPv4 as
    v4-mapped, IPv6 in the kernel's own text (so a dialled peer's replies
    match the path aioquic recorded)."""
    bare, _, scope = host.partition("%")
    ip = ipaddress.ip_address(bare)
    if ip.version == 4:
        return f"::ffff:{ip}", port
    text = socket.inet_ntop(socket.AF_INET6, ip.packed)
    return (f"{text}%{scope}" if scope else text), port


def peer_host(addr: Addr) -> str:
    """The endpoint text of a socket address (v4-mapped back to IPv4)."""
    host = addr[0]
    if host.startswith("::ffff:") and "." in host:
        return host[len("::ffff:") :]
    return host


def make_certificate(router_id_text: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh key and a certificate shaped like rcgen 0.14's
    ``generate_simple_self_signed`` (TRANSPORTS.md 1.2): ECDSA P-256,
    serial from SHA-256 of the SPKI with the top bit cleared, CN "rcgen self
    signed cert", 1975-4096, one subjectAltName: the router-ID text."""
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    serial = bytearray(hashlib.sha256(spki).digest()[:20])
    serial[0] &= 0x7F
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rcgen self signed cert")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(serial) or 1)
        .not_valid_before(datetime.datetime(1975, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(4096, 1, 1, tzinfo=datetime.UTC))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(router_id_text)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def router_id_text(public_key: bytes) -> str:
    """The reference's ``format!("{router_id}")``: key hex, zone, random tail."""
    return f"{public_key.hex()}-0000-{os.urandom(6).hex()}"


def base_configuration(is_client: bool) -> QuicConfiguration:
    """Settings both sides share (TRANSPORTS.md 1.4); ALPN stays None."""
    return QuicConfiguration(
        alpn_protocols=None,
        is_client=is_client,
        connection_id_length=CID_LENGTH,
        idle_timeout=IDLE_TIMEOUT,
        max_datagram_size=MAX_UDP_PAYLOAD,
        max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE,
        max_data=MAX_DATA,
        max_stream_data=MAX_STREAM_DATA,
        congestion_control_algorithm="cubic",
        server_name=SERVER_NAME if is_client else None,
        verify_mode=ssl.CERT_NONE if is_client else None,
    )


def server_configuration(public_key: bytes) -> QuicConfiguration:
    cfg = base_configuration(is_client=False)
    cfg.certificate, cfg.private_key = make_certificate(router_id_text(public_key))
    return cfg


# --- events for the shell ---------------------------------------------------


@dataclass
class LinkUp:
    conn: QuicLinkConn


@dataclass
class ControlIn:
    conn: QuicLinkConn
    packets: list[ControlPacket]


@dataclass
class DataIn:
    """Data packets of one receive batch, back to back in ``buf`` at ``offsets``."""

    conn: QuicLinkConn
    buf: bytearray
    offsets: list[int]


@dataclass
class LinkDown:
    conn: QuicLinkConn
    reason: str


@dataclass
class DialFailed:
    conn: QuicLinkConn
    reason: str


Event = LinkUp | ControlIn | DataIn | LinkDown | DialFailed


@dataclass(eq=False)
class QuicLinkConn:
    """One QUIC connection and what this node keeps about it."""

    quic: QuicConnection
    addr: Addr
    inbound: bool
    deadline: float  # handshake (and, inbound, first stream data) must be done by then
    cids: set[bytes] = field(default_factory=set)
    stream_id: int | None = None  # the control stream, once known
    handshake_done: bool = False
    up: bool = False
    closed: bool = False  # locally closed or terminated: no more events
    decoder: StreamDecoder = field(default_factory=StreamDecoder)
    stream_buf: bytearray = field(default_factory=bytearray)  # the control stream's unframed tail
    last_tx: float = 0.0
    rx_data: bytearray = field(default_factory=bytearray)  # this batch's received data packets
    rx_offsets: list[int] = field(default_factory=list)
    tx_bytes: int = 0
    rx_bytes: int = 0
    tag: Any = None  # the shell's own object for this connection (its link)
    started: float = 0.0
    handshake_time: float | None = None

    @property
    def rtt(self) -> float | None:
        """aioquic's smoothed RTT in seconds, once measured."""
        loss = self.quic._loss
        return loss._rtt_smoothed if loss._rtt_initialized else None

    def datagram_limit(self) -> int:
        """The largest data packet that fits in one DATAGRAM frame here."""
        limit = MAX_UDP_PAYLOAD - DATAGRAM_OVERHEAD - len(self.quic._peer_cid.cid)
        remote = self.quic._remote_max_datagram_frame_size
        if remote is not None:
            limit = min(limit, remote - 3)
        return limit


class QuicEndpoint:
    """All QUIC connections of one UDP socket. Sans-IO: the caller passes
    ``now`` (seconds, monotonic) and moves the bytes."""

    def __init__(self, server_config: QuicConfiguration | None, counters: Counter[str] | None = None) -> None:
        self.server_config = server_config  # None: dial only, inbound Initials are dropped
        self.client_config = base_configuration(is_client=True)
        self.counters: Counter[str] = Counter() if counters is None else counters
        self.by_cid: dict[bytes, QuicLinkConn] = {}
        self.conns: set[QuicLinkConn] = set()
        self.dirty: set[QuicLinkConn] = set()
        self.events: list[Event] = []
        self.replies: list[tuple[bytes, Addr]] = []  # stateless answers (version negotiation)
        self._ping_ids = itertools.count(1)
        self._batch: set[QuicLinkConn] = set()  # connections with received data not yet handed out

    # --- inputs -----------------------------------------------------------

    def dial(self, addr: Addr, now: float) -> QuicLinkConn:
        """Start an outbound connection; ``LinkUp`` or ``DialFailed`` follows."""
        quic = QuicConnection(configuration=self.client_config)
        conn = QuicLinkConn(quic, addr, inbound=False, deadline=now + DIAL_TIMEOUT, started=now)
        quic.connect(addr, now)
        self._register(conn, quic.host_cid)
        self.dirty.add(conn)
        return conn

    def receive(self, data: bytes, addr: Addr, now: float) -> None:
        """One UDP payload from ``addr``. Call ``flush_received`` after a batch."""
        counters = self.counters
        if len(data) < 1 + CID_LENGTH:
            counters["quic_drop_short"] += 1
            return
        if not data[0] & 0x80:  # short header: the destination CID follows the first byte
            conn = self.by_cid.get(bytes(data[1 : 1 + CID_LENGTH]))
            if conn is None:
                counters["quic_drop_unknown_cid"] += 1
                return
            self._receive_on(conn, data, addr, now)
            return
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except ValueError:
            counters["quic_drop_malformed"] += 1
            return
        conn = self.by_cid.get(header.destination_cid)
        if conn is not None:
            self._receive_on(conn, data, addr, now)
            return
        if header.packet_type == QuicPacketType.VERSION_NEGOTIATION:
            counters["quic_drop_unknown_cid"] += 1
            return
        if header.version not in self.client_config.supported_versions:
            if len(data) >= SMALLEST_MAX_DATAGRAM_SIZE:  # never answer more than we were sent
                self.replies.append(
                    (
                        encode_quic_version_negotiation(
                            source_cid=header.destination_cid,
                            destination_cid=header.source_cid,
                            supported_versions=self.client_config.supported_versions,
                        ),
                        addr,
                    )
                )
                counters["quic_version_negotiation"] += 1
            else:
                counters["quic_drop_unknown_version"] += 1
            return
        if header.packet_type != QuicPacketType.INITIAL or len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
            counters["quic_drop_unknown_cid"] += 1
            return
        if self.server_config is None:
            counters["quic_drop_not_listening"] += 1
            return
        if self.pending_handshakes() >= MAX_PENDING_HANDSHAKES:
            counters["quic_drop_handshake_limit"] += 1
            return
        if len(self.conns) >= MAX_CONNECTIONS:
            counters["quic_drop_connection_limit"] += 1
            return
        quic = QuicConnection(
            configuration=self.server_config, original_destination_connection_id=header.destination_cid
        )
        conn = QuicLinkConn(quic, addr, inbound=True, deadline=now + HANDSHAKE_TIMEOUT, started=now)
        self._register(conn, header.destination_cid)
        self._register(conn, quic.host_cid)
        counters["quic_inbound_handshakes"] += 1
        self._receive_on(conn, data, addr, now)

    def flush_received(self) -> None:
        """Hand out each connection's data packets of the batch as one event."""
        for conn in self._batch:
            if conn.rx_offsets and not conn.closed:
                self.events.append(DataIn(conn, conn.rx_data, conn.rx_offsets))
            conn.rx_data = bytearray()
            conn.rx_offsets = []
        self._batch.clear()

    def handle_timer(self, now: float) -> None:
        for conn in list(self.conns):
            timer = conn.quic.get_timer()
            if timer is not None and timer <= now:
                try:
                    conn.quic.handle_timer(now)
                except Exception as exc:  # a library fault ends this connection only
                    self._library_fault(conn, exc)
                    continue
                self._drain(conn, now)
                self.dirty.add(conn)
            if conn.closed:
                continue
            if not conn.up and now >= conn.deadline:
                self.counters["quic_inbound_handshake_timeout" if conn.inbound else "quic_dial_timeout"] += 1
                self._fail(conn, "handshake timeout" if conn.handshake_done is False else "no control stream")
                continue
            if conn.up and now - conn.last_tx >= KEEP_ALIVE:
                conn.quic.send_ping(next(self._ping_ids))
                self.dirty.add(conn)
        self.flush_received()

    def next_timer(self) -> float | None:
        times = []
        for conn in self.conns:
            t = conn.quic.get_timer()
            if t is not None:
                times.append(t)
            if not conn.closed:
                times.append(conn.last_tx + KEEP_ALIVE if conn.up else conn.deadline)
        return min(times) if times else None

    # --- outputs ----------------------------------------------------------

    def transmit(self, now: float) -> list[tuple[list[bytes], Addr]]:
        """Every datagram due, grouped per connection (one group shares an
        address: the shell sends each group with one UDP GSO ``sendmsg``)."""
        out: list[tuple[list[bytes], Addr]] = []
        for data, addr in self.replies:
            out.append(([data], addr))
        self.replies.clear()
        for conn in list(self.dirty):
            try:
                datagrams = conn.quic.datagrams_to_send(now)
            except Exception as exc:
                self._library_fault(conn, exc)
                self._forget(conn)
                continue
            if datagrams:
                conn.last_tx = now
                group: list[bytes] = []
                addr = datagrams[0][1]
                for data, to in datagrams:
                    if to != addr:
                        out.append((group, addr))
                        group, addr = [], to
                    group.append(data)
                    conn.tx_bytes += len(data)
                out.append((group, addr))
        self.dirty.clear()
        return out

    def send_control(self, conn: QuicLinkConn, frame: bytes | bytearray | memoryview) -> bool:
        """Encoded control packets (back to back) on the control stream."""
        if conn.closed or conn.stream_id is None:
            self.counters["quic_control_to_closed"] += 1
            return False
        if self._stream_backlog(conn) + len(frame) > MAX_STREAM_BACKLOG:
            self.counters["quic_stream_backlog_full"] += 1
            return False
        conn.quic.send_stream_data(conn.stream_id, bytes(frame))
        self.dirty.add(conn)
        return True

    def send_data(self, conn: QuicLinkConn, blob: bytes | bytearray | memoryview) -> int:
        """Encoded data packets back to back: one DATAGRAM frame each, the
        ones too big for a datagram on the stream. Returns how many were
        queued; the rest are dropped and counted."""
        if conn.closed or not conn.up:
            self.counters["quic_data_to_closed"] += 1
            return 0
        quic = conn.quic
        pending = quic._datagrams_pending
        limit = conn.datagram_limit()
        view = memoryview(blob)
        pos, end, queued = 0, len(view), 0
        stream: list[memoryview] = []
        while pos + DATA_PREFIX_SIZE <= end:
            nxt = pos + DATA_PREFIX_SIZE + (view[pos + 5] << 8 | view[pos + 6])
            if nxt > end:
                self.counters["quic_data_out_malformed"] += 1
                break
            size = nxt - pos
            if size <= limit:
                if len(pending) >= MAX_PENDING_DATAGRAMS:
                    self.counters["quic_datagram_queue_full"] += 1
                else:
                    pending.append(bytes(view[pos:nxt]))
                    queued += 1
            else:
                stream.append(view[pos:nxt])
            pos = nxt
        if stream and self.send_control(conn, b"".join(stream)):
            self.counters["quic_data_on_stream"] += len(stream)
            queued += len(stream)
        if queued:
            self.dirty.add(conn)
        return queued

    def close(self, conn: QuicLinkConn, reason: str = "closed") -> None:
        """Close locally: CONNECTION_CLOSE goes out with the next transmit;
        no event follows (the caller knows)."""
        if not conn.closed:
            conn.closed = True
            conn.quic.close(reason_phrase=reason[:64])
            self.dirty.add(conn)

    def pending_handshakes(self) -> int:
        return sum(1 for c in self.conns if c.inbound and not c.up and not c.closed)

    def linked(self) -> Iterable[QuicLinkConn]:
        return [c for c in self.conns if c.up and not c.closed]

    # --- internals --------------------------------------------------------

    def _register(self, conn: QuicLinkConn, cid: bytes) -> None:
        conn.cids.add(cid)
        self.by_cid[cid] = conn
        self.conns.add(conn)

    def _forget(self, conn: QuicLinkConn) -> None:
        for cid in conn.cids:
            if self.by_cid.get(cid) is conn:
                del self.by_cid[cid]
        conn.cids.clear()
        self.conns.discard(conn)
        self.dirty.discard(conn)

    def _fail(self, conn: QuicLinkConn, reason: str) -> None:
        self.close(conn, reason)
        self._ended(conn, reason)

    def _ended(self, conn: QuicLinkConn, reason: str) -> None:
        """The event the shell waits for: nothing for an inbound connection it never saw."""
        if conn.up:
            self.events.append(LinkDown(conn, reason))
        elif not conn.inbound:
            self.events.append(DialFailed(conn, reason))

    def _library_fault(self, conn: QuicLinkConn, exc: Exception) -> None:
        """aioquic raised where it should not: end this connection, keep the rest."""
        self.counters["quic_library_errors"] += 1
        if not conn.closed:
            conn.closed = True
            self._ended(conn, f"QUIC library error: {type(exc).__name__}: {exc}")
        self._forget(conn)

    def _stream_backlog(self, conn: QuicLinkConn) -> int:
        stream = conn.quic._streams.get(conn.stream_id) if conn.stream_id is not None else None
        return 0 if stream is None else len(stream.sender._buffer)

    def _receive_on(self, conn: QuicLinkConn, data: bytes, addr: Addr, now: float) -> None:
        conn.rx_bytes += len(data)
        try:
            conn.quic.receive_datagram(data, addr, now)
        except Exception as exc:  # whatever a peer sends affects its own connection only
            self._library_fault(conn, exc)
            return
        self._drain(conn, now)
        self.dirty.add(conn)

    def _drain(self, conn: QuicLinkConn, now: float) -> None:
        quic = conn.quic
        while (event := quic.next_event()) is not None:
            if isinstance(event, events.DatagramFrameReceived):
                self._datagram(conn, event.data)
            elif isinstance(event, events.StreamDataReceived):
                self._stream_data(conn, event, now)
            elif isinstance(event, events.ConnectionIdIssued):
                self._register(conn, event.connection_id)
            elif isinstance(event, events.ConnectionIdRetired):
                if self.by_cid.get(event.connection_id) is conn:
                    del self.by_cid[event.connection_id]
                conn.cids.discard(event.connection_id)
            elif isinstance(event, events.HandshakeCompleted):
                conn.handshake_done = True
                conn.handshake_time = now - conn.started
                if not conn.inbound and not conn.closed:
                    # open the control stream: the router's first Update and Hello go on it
                    conn.stream_id = quic.get_next_available_stream_id()
                    self._link_up(conn, now)
            elif isinstance(event, events.ConnectionTerminated):
                if not conn.closed:
                    conn.closed = True
                    self._ended(conn, event.reason_phrase or f"closed by peer (error 0x{event.error_code:x})")
                self._forget(conn)
                return
        closing = quic._close_event
        if closing is not None and not conn.closed:
            # the peer closed, or aioquic did on a protocol error: the link ends
            # now; the connection stays (to absorb the peer's last packets)
            # until aioquic terminates it
            conn.closed = True
            self.counters["quic_closed_by_peer" if quic._state in DRAIN_STATES else "quic_closed_on_error"] += 1
            self._ended(conn, closing.reason_phrase or f"closed (error 0x{closing.error_code:x})")

    def _link_up(self, conn: QuicLinkConn, now: float) -> None:
        conn.up = True
        conn.last_tx = now
        self.events.append(LinkUp(conn))

    def _stream_data(self, conn: QuicLinkConn, event: events.StreamDataReceived, now: float) -> None:
        sid = event.stream_id
        if conn.stream_id is None and conn.inbound and sid % 4 == 0:
            conn.stream_id = sid  # the first client-opened bidirectional stream (accept_bi)
        if sid != conn.stream_id:
            self.counters["quic_other_stream_bytes"] += len(event.data)
            return
        if conn.inbound and not conn.up and conn.handshake_done and not conn.closed:
            self._link_up(conn, now)
        if conn.closed or not conn.up:
            return
        buf = conn.stream_buf
        buf += event.data
        try:
            control, offsets, used = conn.decoder.cut(buf, len(buf))
        except CodecError as exc:
            self.counters["quic_stream_malformed"] += 1
            self._fail(conn, f"malformed stream: {exc}")
            return
        if conn.decoder.drops:
            for key, count in conn.decoder.drops.items():
                self.counters[f"control_dropped_{key}"] += count
            conn.decoder.drops.clear()
        if control:
            self.events.append(ControlIn(conn, control))
        if offsets:  # data packets on the stream: too big for a datagram at the sender
            rx, rx_offsets = conn.rx_data, conn.rx_offsets
            with memoryview(buf) as view:
                for off in offsets:
                    rx_offsets.append(len(rx))
                    rx += view[off : off + DATA_PREFIX_SIZE + (buf[off + 5] << 8 | buf[off + 6])]
            self._batch.add(conn)
        if used:
            del buf[:used]  # what is left is less than one packet

    def _datagram(self, conn: QuicLinkConn, data: bytes) -> None:
        """One DATAGRAM frame: exactly one packet, data or control."""
        if not conn.up or conn.closed:
            self.counters["quic_datagram_before_link"] += 1
            return
        n = len(data)
        if n >= DATA_PREFIX_SIZE and data[0] == VERSION and data[1] == TYPE_DATA:
            if DATA_PREFIX_SIZE + (data[5] << 8 | data[6]) != n:
                self.counters["quic_datagram_bad_length"] += 1
                return
            self._add_data(conn, data)
            return
        if n >= 8 and data[0] == VERSION and data[1] == TYPE_CONTROL:
            decoder = StreamDecoder()
            try:
                packets = decoder.feed(data)
            except CodecError:
                packets = []
            if decoder.buffered or len(packets) != 1 or not isinstance(packets[0], ControlPacket):
                self.counters["quic_datagram_malformed"] += 1
                return
            self.events.append(ControlIn(conn, [packets[0]]))
            return
        self.counters["quic_datagram_malformed"] += 1

    def _add_data(self, conn: QuicLinkConn, packet: bytes) -> None:
        conn.rx_offsets.append(len(conn.rx_data))
        conn.rx_data += packet
        self._batch.add(conn)
