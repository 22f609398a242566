"""QUIC links (TRANSPORTS.md 1) behind the link interface: the shell
around ``quic_endpoint.QuicEndpoint``.

One non-blocking dual-stack UDP socket on ``[::]:quic_listen_port`` both
accepts and dials, as the reference's quinn endpoint does. The event loop
reads it until empty (with UDP GRO a read may hold many datagrams), feeds
every datagram to the endpoint, hands out each connection's data packets
of that read as one ``on_data`` batch, and writes what aioquic has to send
once per loop turn: datagrams for one address leave in one ``sendmsg``
with UDP GSO (``UDP_SEGMENT``), so a batch of data packets from tund costs
a few system calls, not one per packet.

What aioquic still does per packet, in Python: building each QUIC packet
(frames, packet number, one AEAD seal and header protection, in C), a
sent-packet record for loss recovery and congestion control, and on
receipt one AEAD open, ACK bookkeeping and one ``DatagramFrameReceived``
event per data packet. bench/bench_quic.py measures what that costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections import deque
from collections.abc import Sequence

from common.endpoint import Endpoint
from common.identity import Identity, load_key_file
from common.nodeconfig import NodeConfig

from ..eventloop import add_data_reader, remove_data_reader
from .base import COST_QUIC, Buffer, Link, LinkError, LinkFactory, LinkHost, LinkStats, ip_cost
from .quic_endpoint import (
    DIAL_TIMEOUT,
    RECEIVE_BUFFER,
    Addr,
    ControlIn,
    DataIn,
    DialFailed,
    LinkDown,
    LinkUp,
    QuicEndpoint,
    QuicLinkConn,
    peer_host,
    server_configuration,
    socket_addr,
)

log = logging.getLogger("peerd")
logging.getLogger("quic").setLevel(logging.WARNING)  # aioquic logs every handshake and close at INFO

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
GSO_MAX_SEGMENTS = 44  # 44 x 1452 stays under the 64 KiB UDP limit
READS_PER_WAKE = 256  # datagrams (or GRO batches) read before yielding to the loop
SOCKET_BUFFER = 8 * 1024 * 1024
EARLY_EVENTS = 64  # what a link not yet started keeps (it delivers nothing before start)
_CMSG_SPACE = socket.CMSG_SPACE(4)


def sockaddr_text(addr: Addr) -> str:
    host, port = peer_host(addr), addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class QuicLink(Link):
    """One QUIC connection: control on its stream, data in datagrams."""

    link_type = "quic"

    def __init__(self, factory: QuicFactory, conn: QuicLinkConn, local: Addr) -> None:
        ep = Endpoint("quic", peer_host(conn.addr), conn.addr[1])
        name = f"QUIC {sockaddr_text(local)} <-> {sockaddr_text(conn.addr)}"
        super().__init__(factory.host, ep, name, ip_cost(conn.addr[0], COST_QUIC), conn.inbound)
        self.factory = factory
        self.conn = conn
        self.started = False
        self.early: deque[ControlIn | DataIn] = deque(maxlen=EARLY_EVENTS)
        conn.tag = self

    def start(self) -> None:
        """Deliver what arrived before peerd registered the link, then live."""
        self.started = True
        while self.early and not self.closed:
            self.factory.deliver(self, self.early.popleft())

    def send_control(self, packets: Sequence[bytes]) -> None:
        if self.closed:
            self.host.counters["control_to_closed_link"] += len(packets)
            return
        if not self.factory.endpoint.send_control(self.conn, b"".join(packets)):
            self.host.counters["control_queue_full"] += len(packets)
        self.factory.wake()

    def send_data(self, frame: Buffer, packets: int = 1, borrowed: bool = False) -> bool:
        """Each packet is copied into its own DATAGRAM frame here, so a
        borrowed ring slot is free again when this returns."""
        if self.closed:
            return False
        queued = self.factory.endpoint.send_data(self.conn, frame)
        self.factory.wake()
        if queued < packets:
            self.host.counters["data_queue_full"] += packets - queued
        return queued > 0

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.factory.endpoint.close(self.conn, reason)
        self.factory.wake()
        self.ended(reason)

    def ended(self, reason: str) -> None:
        """The one ``on_closed`` of a started link."""
        if self.closed:
            return
        self.closed = True
        if self.started:
            self.host.on_closed(self, reason)

    def stats(self) -> LinkStats:
        conn = self.conn
        pending = conn.quic._datagrams_pending
        return LinkStats(
            tx_bytes=conn.tx_bytes,
            rx_bytes=conn.rx_bytes,
            queued_control=0,
            queued_data_bytes=sum(len(d) for d in pending),
        )

    def remote_ip(self) -> str | None:
        return self.endpoint.host


class QuicFactory(LinkFactory):
    """The UDP socket, the endpoint on it, and the timer that drives it."""

    link_type = "quic"

    def __init__(self, cfg: NodeConfig, host: LinkHost, port: int | None = None) -> None:
        super().__init__(cfg, host)
        self.port = cfg.quic_listen_port if port is None else port
        identity = Identity.from_secret(load_key_file(cfg.key_file))
        self.endpoint = QuicEndpoint(server_configuration(identity.public_key), host.counters)
        self.sock: socket.socket | None = None
        self.local: Addr = ("::", self.port)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: float | None = None
        self.flush_pending = False
        self.gso = True
        self.dials: dict[QuicLinkConn, asyncio.Future[QuicLink]] = {}

    # --- socket -----------------------------------------------------------

    def open(self) -> socket.socket:
        if self.sock is not None:
            return self.sock
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", self.port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        try:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError:
            pass  # the kernel splits batches for us
        self.sock = sock
        self.local = sock.getsockname()[:2]
        self.loop = asyncio.get_running_loop()
        add_data_reader(sock.fileno(), self.readable)  # called straight from the wait (peerd/eventloop.py)
        return sock

    async def listen(self) -> None:
        self.open()

    async def close(self) -> None:
        for conn in list(self.endpoint.conns):
            self.endpoint.close(conn, "shutting down")
        self.flush()
        if self.timer is not None:
            self.timer.cancel()
        if self.sock is not None and self.loop is not None:
            remove_data_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def describe(self) -> str:
        return f"QUIC port {self.local[1]}/udp"

    # --- dialling ---------------------------------------------------------

    async def dial(self, endpoint: Endpoint) -> QuicLink:
        if endpoint.proto != self.link_type:
            raise LinkError(f"{endpoint} is not a quic endpoint")
        try:
            addr = socket_addr(endpoint.host, endpoint.port)
        except ValueError as exc:
            raise LinkError(f"{endpoint}: {exc}") from exc
        self.open()
        assert self.loop is not None
        conn = self.endpoint.dial(addr, self.loop.time())
        fut: asyncio.Future[QuicLink] = self.loop.create_future()
        self.dials[conn] = fut
        self.wake()
        try:
            return await asyncio.wait_for(fut, DIAL_TIMEOUT + 1)
        finally:
            self.dials.pop(conn, None)
            if not fut.done() or fut.cancelled():
                self.endpoint.close(conn, "dial abandoned")
                self.wake()

    # --- the loop ---------------------------------------------------------

    def readable(self) -> None:
        """Read everything waiting (bounded), then act on it."""
        sock = self.sock
        if sock is None or self.loop is None:
            return
        now = self.loop.time()
        receive = self.endpoint.receive
        counters = self.host.counters
        for _ in range(READS_PER_WAKE):
            try:
                data, anc, flags, addr = sock.recvmsg(RECEIVE_BUFFER, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. ICMP port unreachable reported on the socket
                counters[f"quic_recv_error_{errno.errorcode.get(exc.errno or 0, 'other')}"] += 1
                continue
            if flags & socket.MSG_TRUNC:
                counters["quic_drop_truncated_udp"] += 1
                continue
            src = (addr[0], addr[1])
            seg = 0
            for level, kind, value in anc:
                if level == SOL_UDP and kind == UDP_GRO and len(value) >= 2:
                    seg = int.from_bytes(value[:4] if len(value) >= 4 else value[:2], "little")
            if seg and len(data) > seg:
                counters["quic_gro_batches"] += 1
                for pos in range(0, len(data), seg):
                    receive(data[pos : pos + seg], src, now)
            else:
                receive(data, src, now)
        self.endpoint.flush_received()
        self.dispatch()
        self.flush()

    def wake(self) -> None:
        """Something to send: flush once this loop turn is over."""
        if not self.flush_pending and self.loop is not None:
            self.flush_pending = True
            self.loop.call_soon(self.flush)

    def on_timer(self) -> None:
        self.timer = None
        self.timer_at = None
        assert self.loop is not None
        self.endpoint.handle_timer(self.loop.time())
        self.dispatch()
        self.flush()

    def flush(self) -> None:
        """Write what the endpoint has to send; re-arm the timer."""
        self.flush_pending = False
        if self.sock is None or self.loop is None:
            return
        for group, addr in self.endpoint.transmit(self.loop.time()):
            self.send_group(group, addr)
        self.dispatch()  # closes found while sending
        at = self.endpoint.next_timer()
        if at != self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = None if at is None else self.loop.call_at(at, self.on_timer)
            self.timer_at = at

    def send_group(self, group: list[bytes], addr: Addr) -> None:
        """Datagrams for one address: runs of equal size (the last of a run
        may be shorter) as one GSO send each."""
        assert self.sock is not None
        sock, counters = self.sock, self.host.counters
        i, n = 0, len(group)
        while i < n:
            size = len(group[i])
            j = i + 1
            if self.gso:
                while j < n and j - i < GSO_MAX_SEGMENTS and len(group[j]) == size:
                    j += 1
                if j < n and j - i < GSO_MAX_SEGMENTS and len(group[j]) < size:
                    j += 1  # a shorter datagram may end the run
            run = group[i:j]
            try:
                if len(run) > 1:
                    sock.sendmsg(run, [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))], 0, addr)
                    counters["quic_gso_sends"] += 1
                else:
                    sock.sendto(run[0], addr)
            except (BlockingIOError, InterruptedError):
                counters["quic_send_dropped_full"] += len(run)  # QUIC's loss recovery resends what matters
            except OSError as exc:
                if len(run) > 1 and exc.errno in (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP):
                    log.info("UDP GSO unavailable (%s): one datagram per send", exc)
                    self.gso = False
                    for data in run:
                        with contextlib.suppress(OSError):
                            sock.sendto(data, addr)
                else:
                    counters["quic_send_error"] += len(run)
            i = j

    def dispatch(self) -> None:
        """Endpoint events to dial futures, peerd and the links."""
        events = self.endpoint.events
        while events:
            batch = list(events)
            events.clear()
            for event in batch:
                conn = event.conn
                link = conn.tag
                if isinstance(event, LinkUp):
                    link = QuicLink(self, conn, self.local)
                    if conn.inbound:
                        log.info(
                            "inbound QUIC link from %s (handshake %.0f ms)",
                            link.endpoint,
                            1000 * (conn.handshake_time or 0),
                        )
                        self.host.accepted(link)
                    else:
                        fut = self.dials.get(conn)
                        if fut is None or fut.done():
                            self.endpoint.close(conn, "dial abandoned")
                        else:
                            fut.set_result(link)
                elif isinstance(event, DialFailed):
                    fut = self.dials.get(conn)
                    if fut is not None and not fut.done():
                        fut.set_exception(TimeoutError(f"QUIC dial to {sockaddr_text(conn.addr)}: {event.reason}"))
                elif isinstance(event, LinkDown):
                    if isinstance(link, QuicLink):
                        link.ended(event.reason)
                elif isinstance(link, QuicLink) and not link.closed:
                    if link.started:
                        self.deliver(link, event)
                    else:
                        link.early.append(event)

    def deliver(self, link: QuicLink, event: ControlIn | DataIn) -> None:
        if isinstance(event, ControlIn):
            self.host.on_control(link, [p.encode() for p in event.packets])
        else:
            self.host.on_data(link, event.buf, event.offsets)


def make_factory(cfg: NodeConfig, host: LinkHost) -> QuicFactory | None:
    """peerd's entry point; None when QUIC is off (--disable-quic)."""
    if cfg.disable_quic:
        return None
    return QuicFactory(cfg, host)
