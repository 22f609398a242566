"""vsock links (PROTOCOL.md 2.6, TRANSPORTS.md 3.2): ``vsock://CID:PORT``,
the TCP packet stream over an AF_VSOCK stream socket, static cost 5,
never TLS-wrapped. Listens on ``VMADDR_CID_ANY:vsock_listen_port`` when
that is set (the reference's ``--vsock-listen-port``; no default)."""

from __future__ import annotations

import socket

from common.endpoint import Endpoint
from common.nodeconfig import NodeConfig

from .base import COST_VSOCK, LinkError, LinkFactory, LinkHost
from .stream import StreamFactory, StreamLink, bound_listener

DIAL_TIMEOUT = 5.0
AF_VSOCK: int | None = getattr(socket, "AF_VSOCK", None)
CID_ANY = 0xFFFFFFFF  # VMADDR_CID_ANY


def vsock_problem() -> str | None:
    """Why this host cannot make vsock sockets, or None."""
    if AF_VSOCK is None:
        return "this Python has no socket.AF_VSOCK (not Linux?)"
    try:
        socket.socket(AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError as exc:
        return f"no vsock in this kernel ({exc.strerror}; modprobe vsock_loopback or vhost_vsock)"
    return None


class VsockLink(StreamLink):
    """An AF_VSOCK stream carrying the packet stream."""

    link_type = "vsock"


def make_link(host: LinkHost, sock: socket.socket, inbound: bool, cls: type[VsockLink] = VsockLink) -> VsockLink:
    """Wrap a connected vsock socket, named as the reference names it."""
    lcid, lport = sock.getsockname()[:2]
    rcid, rport = sock.getpeername()[:2]
    ep = Endpoint("vsock", str(rcid), int(rport))
    return cls(host, sock, ep, f"VSOCK {lcid}:{lport} <-> {rcid}:{rport}", COST_VSOCK, inbound)


class VsockFactory(StreamFactory):
    """The vsock listener (if a port is configured) and dialler."""

    link_type = "vsock"

    def __init__(self, cfg: NodeConfig, host: LinkHost, port: int | None = None) -> None:
        super().__init__(cfg, host)
        self.port = cfg.vsock_listen_port if port is None else port

    def make_listener(self) -> socket.socket | None:
        """``VMADDR_CID_ANY:port``, or no listener without a port."""
        if self.port is None:
            return None
        if AF_VSOCK is None:
            raise OSError("vsock listen port set but this platform has no AF_VSOCK")
        return bound_listener(AF_VSOCK, (CID_ANY, self.port))

    def wrap(self, sock: socket.socket, inbound: bool) -> VsockLink:
        """A connected vsock socket as a link."""
        return make_link(self.host, sock, inbound)

    async def dial(self, endpoint: Endpoint) -> VsockLink:
        """Connect to ``vsock://cid:port``."""
        if endpoint.proto != "vsock":
            raise LinkError(f"{endpoint} is not a vsock endpoint")
        if AF_VSOCK is None:
            raise LinkError("this platform has no AF_VSOCK")
        sock = socket.socket(AF_VSOCK, socket.SOCK_STREAM)
        await self.connect(sock, (int(endpoint.host), endpoint.port), DIAL_TIMEOUT)
        return self.wrap(sock, inbound=False)

    def describe(self) -> str:
        """For the start-up log."""
        return "vsock (dial only)" if self.port is None else f"vsock port {self.port}"


def make_factory(cfg: NodeConfig, host: LinkHost) -> LinkFactory | None:
    """peerd's entry point: vsock can always be dialled where the kernel has
    it; in a private network inside TLS-PSK (links/tls.py, unlike the reference)."""
    if cfg.network_name is not None:
        from .tls import make_vsock_factory

        return make_vsock_factory(cfg, host)
    return VsockFactory(cfg, host)
