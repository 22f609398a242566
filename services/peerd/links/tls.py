"""TLS links: private networks (TRANSPORTS.md section 2). A stream link
like TCP whose bytes go through TLS 1.3 with the network's external PSK.

The TLS state machine is an ``ssl.SSLObject`` over memory BIOs
(``TlsSession``): the link reads and writes its own non-blocking socket,
as the TCP link does, and only feeds ciphertext in and takes ciphertext
out, so the handshake timeout, the alert sent on a refusal and the
counters are all ours. In private mode this module owns the TCP listen
port (the listener accepts only TLS), ``tcp://`` peers are dialled as TLS
and the same wrapping serves vsock (``wrap_server`` / ``wrap_client``),
which the reference leaves plain (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import ClassVar

from common import privnet
from common.endpoint import Endpoint
from common.nodeconfig import NodeConfig
from common.privnet import TlsSession
from common.wire.errors import CodecError
from common.wire.packet import MAX_PACKET_SIZE, StreamDecoder

from .base import COST_TLS, Buffer, Link, LinkError, LinkFactory, LinkHost, LinkStats, ip_cost

log = logging.getLogger("peerd.tls")

MAX_CONTROL_QUEUE = 10_000
MAX_DATA_QUEUE_BYTES = 2_000 * 1472  # as the TCP link: 2000 packets of the largest size the reference sends
READ_BUFFER = 512 * 1024
READ_CHUNK = 256 * 1024  # ciphertext read per call
ENCRYPT_BATCH = 256 * 1024  # plaintext encrypted per turn of the write loop
DIAL_TIMEOUT = 5.0
LOGGED_MAX = 1024  # remote addresses whose refusal was logged (each is logged once)


async def _send_all(sock: socket.socket, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, data)


async def handshake(sock: socket.socket, ctx: ssl.SSLContext, server_side: bool, timeout: float) -> TlsSession:
    """A TLS-PSK handshake on a connected non-blocking socket, bounded by
    ``timeout``; a refusal sends its alert before raising. Raises
    ``ssl.SSLError`` (refused), ``TimeoutError`` (stalled) or ``OSError``."""
    session = TlsSession(ctx, server_side)
    loop = asyncio.get_running_loop()

    async def run() -> None:
        while True:
            try:
                done = session.handshake()
            except ssl.SSLError:
                out = session.pending_out()
                if out:
                    with contextlib.suppress(OSError):
                        sock.send(out)  # the alert, best effort
                raise
            out = session.pending_out()
            if out:
                await _send_all(sock, out)
            if done:
                if not privnet.used_psk(session.obj):
                    raise ssl.SSLError(1, "the peer authenticated with a CERTIFICATE, not the network's PSK")
                return
            data = await loop.sock_recv(sock, READ_CHUNK)
            if not data:
                raise ConnectionResetError("closed during the TLS handshake")
            session.feed(data)

    await asyncio.wait_for(run(), timeout)
    return session


class Refusals:
    """Counts refused handshakes by reason and logs each remote once
    (bounded memory: the oldest remembered remote is forgotten first)."""

    def __init__(self, host: LinkHost) -> None:
        self.host = host
        self.logged: OrderedDict[tuple[str, str], None] = OrderedDict()

    def refused(self, remote_ip: str, remote: str, direction: str, exc: BaseException) -> str:
        reason = privnet.refusal_reason(exc)
        self.host.counters[f"tls_refused_{reason}"] += 1
        key = (remote_ip, reason)
        if key in self.logged:
            log.debug("TLS %s %s refused (%s): %s", direction, remote, reason, exc)
        else:
            self.logged[key] = None
            if len(self.logged) > LOGGED_MAX:
                self.logged.popitem(last=False)
            log.warning("TLS %s %s refused: %s (%s); further refusals from it are counted, not logged",
                        direction, remote, explain(reason), exc)  # fmt: skip
        return reason


def explain(reason: str) -> str:
    return {
        "wrong_key": "same network name, different network key",
        "wrong_name": "different network name (or no PSK at all)",
        "certificate": "the peer offered a certificate instead of the network's PSK",
        "not_tls": "the peer does not speak TLS 1.3 (a public node, or plain TCP)",
        "timeout": f"the handshake did not finish within {privnet.HANDSHAKE_TIMEOUT:.0f} s",
        "closed": "the peer closed the connection during the handshake (it refused us)",
    }.get(reason, "handshake failed")


def sockaddr_text(addr: tuple[object, ...] | str) -> str:
    if isinstance(addr, str) or len(addr) < 2:
        return str(addr)
    host, port = str(addr[0]), addr[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    scope = addr[3] if len(addr) >= 4 and addr[3] else 0
    if scope and "%" not in host:
        host = f"{host}%{scope}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TlsLink(Link):
    """One TLS connection: control packets first, data bounded in bytes,
    plaintext encrypted in batches and written with one ``send`` per
    record batch."""

    link_type: ClassVar[str] = "tls"

    def __init__(
        self,
        host: LinkHost,
        endpoint: Endpoint,
        sock: socket.socket,
        session: TlsSession,
        inbound: bool,
        name: str,
        static_cost: int,
    ) -> None:
        super().__init__(host, endpoint, name, static_cost, inbound)
        self.sock = sock
        self.session = session
        self.control: deque[bytes] = deque()
        self.data: deque[bytes] = deque()
        self.data_bytes = 0
        self.out = bytearray()  # ciphertext not yet written
        self.buf = bytearray(READ_BUFFER + MAX_PACKET_SIZE)
        self.view = memoryview(self.buf)
        self.have = 0
        self.decoder = StreamDecoder()
        self.tx = self.rx = 0
        self.wake = asyncio.Event()
        self.writable: asyncio.Future[None] | None = None  # set while the write loop waits for room
        self.started = False
        self.ended = False
        self.reason = ""

    # --- peerd's side ---------------------------------------------------

    def start(self) -> None:
        self.started = True
        loop = asyncio.get_running_loop()
        loop.add_reader(self.sock.fileno(), self._on_readable)
        self.host.spawn(self._write_loop(), f"tls-write-{self.link_id}")
        self._decrypt()  # application data that came with the handshake's last flight
        self.wake.set()

    def send_control(self, packets: Sequence[bytes]) -> None:
        for packet in packets:
            if len(self.control) >= MAX_CONTROL_QUEUE:
                self.host.counters["control_queue_full"] += 1
                continue
            self.control.append(bytes(packet))
        self.wake.set()

    def send_data(self, frame: Buffer, packets: int = 1, borrowed: bool = False) -> bool:
        if self.closed:
            return False
        if self.data_bytes + len(frame) > MAX_DATA_QUEUE_BYTES:
            self.host.counters["data_queue_full"] += packets
            return False
        data = bytes(frame)  # encrypted later: a borrowed ring slot must not be kept
        self.data.append(data)
        self.data_bytes += len(data)
        self.wake.set()
        return True

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.reason = self.reason or reason
        if self.started:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.wake.set()
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        if not self.started:
            self._finish()

    def stats(self) -> LinkStats:
        return LinkStats(self.tx, self.rx, len(self.control), self.data_bytes)

    def remote_ip(self) -> str | None:
        return self.endpoint.host if self.endpoint.proto != "vsock" else None

    # --- the loops ------------------------------------------------------

    def _finish(self) -> None:
        if self.ended:
            return
        self.ended = True
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.started:
            self.host.on_closed(self, self.reason or "closed")

    def _on_readable(self) -> None:
        if self.closed:
            return
        try:
            data = self.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"read error: {exc}")
            return
        if not data:
            self.close("eof inside a packet" if self.have else "eof")
            return
        self.rx += len(data)
        self.session.feed(data)
        self._decrypt()

    def _decrypt(self) -> None:
        while not self.closed:
            try:
                n = self.session.read_into(self.view[self.have :])
            except ssl.SSLZeroReturnError:
                self.close("closed by the peer (TLS close_notify)")
                return
            except ssl.SSLError as exc:
                self.host.counters["tls_bad_record"] += 1
                self.close(f"TLS error: {exc}")
                return
            if n == 0:
                break
            self.have += n
            if not self._deliver():
                return
        if self.session.outgoing.pending:  # e.g. a key update answer
            self.out += self.session.pending_out()
            self.wake.set()

    def _deliver(self) -> bool:
        try:
            control, offsets, used = self.decoder.cut(self.buf, self.have)
        except CodecError as exc:
            self.host.counters["stream_malformed"] += 1
            self.close(f"malformed stream: {exc}")
            return False
        if self.decoder.drops:
            for key, count in self.decoder.drops.items():
                self.host.counters[f"control_dropped_{key}"] += count
            self.decoder.drops.clear()
        if offsets:
            self.host.on_data(self, self.buf, offsets)
        if control:
            self.host.on_control(self, [pkt.encode() for pkt in control])
        if used:
            self.buf[: self.have - used] = self.view[used : self.have]
            self.have -= used
        return not self.closed

    async def _wait_writable(self) -> None:
        """Until the socket has room again, or the link closes."""
        loop = asyncio.get_running_loop()
        fut = self.writable = loop.create_future()
        fd = self.sock.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_writer(fd, ready)
        try:
            await fut
        finally:
            self.writable = None
            loop.remove_writer(fd)

    def _encrypt_queued(self) -> None:
        parts: list[bytes] = []
        size = 0
        while self.control and size < ENCRYPT_BATCH:
            parts.append(self.control.popleft())
            size += len(parts[-1])
        data_size = 0
        while self.data and size < ENCRYPT_BATCH:
            parts.append(self.data.popleft())
            size += len(parts[-1])
            data_size += len(parts[-1])
        self.data_bytes -= data_size
        if parts:
            self.out += self.session.encrypt(b"".join(parts))

    async def _write_loop(self) -> None:
        try:
            while not self.closed:
                await self.wake.wait()
                self.wake.clear()
                while not self.closed and (self.out or self.control or self.data):
                    if not self.out:
                        self._encrypt_queued()
                    try:
                        sent = self.sock.send(self.out)
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    except OSError as exc:
                        self.close(f"write error: {exc}")
                        break
                    self.tx += sent
                    del self.out[:sent]
                    if self.out:
                        await self._wait_writable()
        finally:
            self._finish()


# --- making links ---------------------------------------------------------


def network_of(cfg: NodeConfig) -> privnet.PrivateNetwork | None:
    if cfg.network_name is None or cfg.network_key_file is None:
        return None
    problem = privnet.psk_support_problem()
    if problem is not None:
        raise LinkError(problem)
    try:
        return privnet.PrivateNetwork(cfg.network_name, privnet.load_network_key(cfg.network_key_file))
    except privnet.PrivnetError as exc:
        raise LinkError(str(exc)) from exc


class TlsFactory(LinkFactory):
    """In private mode: the TLS listener on the TCP port and the dialler of
    ``tls://`` (and upgraded ``tcp://``) endpoints."""

    link_type: ClassVar[str] = "tls"

    def __init__(self, cfg: NodeConfig, host: LinkHost, net: privnet.PrivateNetwork) -> None:
        super().__init__(cfg, host)
        self.net = net
        self.server_ctx = privnet.server_context(net)
        self.client_ctx = privnet.client_context(net)
        self.refusals = Refusals(host)
        self.listener: socket.socket | None = None
        self.accept_task: asyncio.Task[None] | None = None

    async def listen(self) -> None:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            sock.bind(("::", self.cfg.tcp_listen_port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.listener = sock
        self.accept_task = self.host.spawn(self._accept_loop(), "tls-accept")

    def describe(self) -> str:
        return f"TLS (private network {self.net.name!r}) on TCP port {self.cfg.tcp_listen_port}"

    async def _accept_loop(self) -> None:
        assert self.listener is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(self.listener)
            except OSError as exc:
                if self.listener is None or self.listener.fileno() < 0:
                    return
                log.debug("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            self.host.spawn(self._inbound(conn, addr), "tls-handshake")

    async def _inbound(self, conn: socket.socket, addr: tuple[object, ...]) -> None:
        remote = sockaddr_text(addr)
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            session = await handshake(conn, self.server_ctx, True, privnet.HANDSHAKE_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            self.refusals.refused(str(addr[0]), remote, "from", exc)
            conn.close()
            return
        self.host.counters["tls_accepted"] += 1
        host_text = str(addr[0])
        if host_text.startswith("::ffff:") and "." in host_text:
            host_text = host_text[7:]
        scope = addr[3] if len(addr) >= 4 else 0
        if scope and "%" not in host_text:
            host_text = f"{host_text}%{scope}"
        ep = Endpoint("tls", host_text, int(str(addr[1])))
        self.host.accepted(self._link(conn, session, ep, inbound=True))

    def _link(self, conn: socket.socket, session: TlsSession, ep: Endpoint, inbound: bool) -> TlsLink:
        local = sockaddr_text(conn.getsockname())
        remote = sockaddr_text(conn.getpeername())
        return TlsLink(self.host, ep, conn, session, inbound, f"TLS {local} <-> {remote}", ip_cost(ep.host, COST_TLS))

    async def dial(self, endpoint: Endpoint) -> Link:
        if endpoint.proto not in ("tls", "tcp"):
            raise LinkError(f"{endpoint} is not a TLS endpoint")
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, sockaddr), DIAL_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, TimeoutError):
            sock.close()
            raise
        try:
            session = await handshake(sock, self.client_ctx, False, privnet.HANDSHAKE_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            sock.close()
            reason = self.refusals.refused(endpoint.host, str(endpoint), "to", exc)
            raise ConnectionRefusedError(f"TLS handshake with {endpoint} refused: {explain(reason)}") from exc
        self.host.counters["tls_dialled"] += 1
        return self._link(sock, session, Endpoint("tls", endpoint.host, endpoint.port), inbound=False)

    async def close(self) -> None:
        if self.accept_task is not None:
            self.accept_task.cancel()
        if self.listener is not None:
            self.listener.close()
            self.listener = None


def make_factory(cfg: NodeConfig, host: LinkHost) -> LinkFactory | None:
    """A TLS factory in private mode only (``tls://`` is refused otherwise)."""
    net = network_of(cfg)
    return None if net is None else TlsFactory(cfg, host, net)


async def wrap(sock: socket.socket, cfg: NodeConfig, server_side: bool) -> TlsSession | None:
    """For other stream link types (vsock) in private mode: the handshake
    on their connected socket, or None when not in private mode. Raises as
    ``handshake``."""
    net = network_of(cfg)
    if net is None:
        return None
    ctx = privnet.server_context(net) if server_side else privnet.client_context(net)
    sock.setblocking(False)
    return await handshake(sock, ctx, server_side, privnet.HANDSHAKE_TIMEOUT)
