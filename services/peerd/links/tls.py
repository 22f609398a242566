"""TLS links: private networks (TRANSPORTS.md section 2). A stream link
like TCP whose bytes go through TLS 1.3 with the network's external PSK.

The TLS state machine is a sans-IO ``TlsSession`` (common/privnet.py: an
``ssl.SSLObject`` over memory BIOs) inside a ``StreamLink``: the link reads
and writes its own non-blocking socket as the TCP link does, only feeding
ciphertext in and taking ciphertext out, so the handshake timeout, the
alert sent on a refusal and the counters are all ours. In private mode
this module owns the TCP listen port (the listener accepts only TLS),
dials ``tls://`` and upgraded ``tcp://`` peers, and wraps vsock links the
same way, which the reference leaves plain (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from common import privnet
from common.endpoint import Endpoint
from common.nodeconfig import NodeConfig
from common.privnet import TlsSession

from ..sendqueue import Buffer
from .base import LinkError, LinkFactory, LinkHost
from .stream import StreamFactory
from .tcp import TcpFactory, TcpLink
from .vsock import VsockFactory, VsockLink
from .vsock import make_link as make_vsock_link

log = logging.getLogger("peerd.tls")

READ_CHUNK = 256 * 1024  # ciphertext read per call
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
        if key in self.logged or direction == "to":  # a failed dial is logged by peerd, with this reason
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


class TlsLink(TcpLink):
    """A stream socket carrying the packet stream inside TLS. The send
    queue's ``writev`` encrypts (so a borrowed buffer is copied at once) and
    writes the ciphertext; what the socket did not take waits in ``out``
    and is written when it has room."""

    link_type = "tls"

    def __init__(
        self, host: LinkHost, sock: socket.socket, endpoint: Endpoint, name: str, static_cost: int, inbound: bool
    ) -> None:
        super().__init__(host, sock, endpoint, name, static_cost, inbound)
        self.session: TlsSession | None = None  # attached right after the handshake, before start()
        self.out = memoryview(b"")  # ciphertext the socket has not taken yet (of one batch: no more is encrypted)

    def attach(self, session: TlsSession) -> TlsLink:
        self.session = session
        return self

    def start(self) -> None:
        super().start()
        self._early_data()

    def close(self, reason: str) -> None:
        if not self.closed and self.started:  # our own writer (ciphertext remainder) goes with the socket
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_writer(self.fd)
        super().close(reason)

    # --- writing ----------------------------------------------------------

    def _flush(self) -> None:
        """Write what ciphertext the socket takes; raises OSError if broken."""
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        self.out = self.out[sent:]

    def _drain(self) -> None:
        """The loop says the socket has room: more of ``out``."""
        loop = asyncio.get_running_loop()
        try:
            self._flush()
        except OSError as exc:
            loop.remove_writer(self.fd)
            self.close(f"write error: {exc}")
            return
        if not self.out:
            loop.remove_writer(self.fd)

    def _writev(self, bufs: Sequence[Buffer]) -> int:
        assert self.session is not None
        if self.out:
            self._flush()
            if self.out:
                raise BlockingIOError  # the queue keeps the plaintext and waits for room
        size = sum(len(b) for b in bufs)
        self.out = memoryview(self.session.encrypt(bufs[0] if len(bufs) == 1 else b"".join(bufs)))
        self._flush()
        if self.out and not self.closed:
            asyncio.get_running_loop().add_writer(self.fd, self._drain)
        return size

    # --- reading ----------------------------------------------------------

    def read_into(self, view: memoryview) -> int:
        """StreamLink's read hook: ciphertext from the socket, plaintext into
        ``view`` (0: end of stream or close_notify). It always fits: one
        read's plaintext is at most READ_CHUNK (plus a partial record) and
        the link's buffer has READ_BUFFER free after every turn."""
        session = self.session
        assert session is not None
        data = self.sock.recv(READ_CHUNK)  # BlockingIOError when empty
        if not data:
            return 0
        session.feed(data)
        return self._plaintext(view)

    def _plaintext(self, view: memoryview) -> int:
        session = self.session
        assert session is not None
        try:
            n = session.read_into(view)
        except ssl.SSLZeroReturnError:
            return 0
        except ssl.SSLError:
            self.host.counters["tls_bad_record"] += 1
            raise  # an OSError: the link ends with it as the reason
        if session.outgoing.pending and not self.closed:  # post-handshake messages (a key update's answer)
            self.out = memoryview(bytes(self.out) + session.pending_out())
            asyncio.get_running_loop().add_writer(self.fd, self._drain)
        if n == 0:
            raise BlockingIOError  # only part of a record so far
        return n

    def _early_data(self) -> None:
        """Plaintext that came with the handshake's last flight (the socket
        may stay quiet after it)."""
        try:
            n = self._plaintext(self.view[self.have :])
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(f"read error: {exc}")
            return
        if n:
            self.rx_bytes += n
            self.have += n
            why = self.process()
            if why is not None:
                self.close(why)


class TlsVsockLink(TlsLink, VsockLink):
    """A vsock stream inside TLS (private mode; the reference leaves it plain)."""

    link_type = "vsock"

    def remote_ip(self) -> str | None:
        return None  # no IP: nothing for the interface watch


class PskWrapping(StreamFactory):
    """What the TLS factories add to a stream factory (mixed in before it):
    an accepted connection is handshaken (bounded, counted, logged once)
    before it becomes a link, and so is a dialled one before ``dial``
    returns. The stream factory's ``wrap`` must make a ``TlsLink``."""

    def setup(self, net: privnet.PrivateNetwork) -> None:
        self.net = net
        self.server_ctx = privnet.server_context(net)
        self.client_ctx = privnet.client_context(net)
        self.refusals = Refusals(self.host)

    def on_accepted(self, conn: socket.socket, addr: Any) -> None:
        self.host.spawn(self._inbound(conn, addr), "tls handshake")

    async def _inbound(self, conn: socket.socket, addr: Any) -> None:
        conn.setblocking(False)
        remote = str(addr[0]) if isinstance(addr, tuple) else str(addr)
        shown = f"{remote} port {addr[1]}" if isinstance(addr, tuple) and len(addr) > 1 else remote
        try:
            session = await handshake(conn, self.server_ctx, True, privnet.HANDSHAKE_TIMEOUT)
            link = self.wrap(conn, inbound=True)
        except (OSError, TimeoutError) as exc:
            self.refusals.refused(remote, shown, "from", exc)
            conn.close()
            return
        assert isinstance(link, TlsLink)
        self.host.counters["tls_accepted"] += 1
        self.host.accepted(link.attach(session))

    async def dial(self, endpoint: Endpoint) -> TlsLink:
        link = await super().dial(endpoint)  # type: ignore[safe-super]  # the stream factory's: connected, wrapped
        assert isinstance(link, TlsLink)
        try:
            session = await handshake(link.sock, self.client_ctx, False, privnet.HANDSHAKE_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            link.sock.close()
            reason = self.refusals.refused(endpoint.host, str(endpoint), "to", exc)
            raise ConnectionRefusedError(f"TLS handshake with {endpoint} refused: {explain(reason)}") from exc
        self.host.counters["tls_dialled"] += 1
        return link.attach(session)


class TlsFactory(PskWrapping, TcpFactory):
    """Private mode: the TLS listener on the TCP port, and the dialler of
    ``tls://`` and (upgraded) ``tcp://`` endpoints."""

    link_type = "tls"
    link_class = TlsLink

    def __init__(self, cfg: NodeConfig, host: LinkHost, net: privnet.PrivateNetwork) -> None:
        super().__init__(cfg, host)
        self.setup(net)

    async def listen(self) -> None:
        if self.listener is None:  # also serves tcp:// (one object under two names)
            await super().listen()

    async def dial(self, endpoint: Endpoint) -> TlsLink:
        if endpoint.proto not in ("tls", "tcp"):
            raise LinkError(f"{endpoint} is not a TLS endpoint")
        return await super().dial(Endpoint("tls", endpoint.host, endpoint.port))

    def describe(self) -> str:
        return f"TLS (private network {self.net.name!r}) on TCP port {self.port}"


class VsockTlsFactory(PskWrapping, VsockFactory):
    """Private mode: vsock links inside the same TLS-PSK (unlike the reference)."""

    def __init__(self, cfg: NodeConfig, host: LinkHost, net: privnet.PrivateNetwork) -> None:
        super().__init__(cfg, host)
        self.setup(net)

    def wrap(self, sock: socket.socket, inbound: bool) -> TlsVsockLink:
        link = make_vsock_link(self.host, sock, inbound, cls=TlsVsockLink)
        assert isinstance(link, TlsVsockLink)
        return link

    async def dial(self, endpoint: Endpoint) -> TlsVsockLink:
        link = await super().dial(endpoint)
        assert isinstance(link, TlsVsockLink)
        return link

    def describe(self) -> str:
        return "vsock inside TLS-PSK, " + super().describe()


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


def make_factory(cfg: NodeConfig, host: LinkHost) -> LinkFactory | None:
    """A TLS factory in private mode only (``tls://`` is refused otherwise)."""
    net = network_of(cfg)
    return None if net is None else TlsFactory(cfg, host, net)


def make_vsock_factory(cfg: NodeConfig, host: LinkHost) -> LinkFactory | None:
    """vsock in private mode (None otherwise: the plain vsock factory serves)."""
    net = network_of(cfg)
    return None if net is None else VsockTlsFactory(cfg, host, net)
