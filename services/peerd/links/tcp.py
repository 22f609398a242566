"""TCP links (PROTOCOL.md 2.3): plain TCP to the endpoint, the packet
stream on it, static cost 15 over IPv4 / 10 over IPv6. One dual-stack
listener on ``tcp_listen_port``."""

from __future__ import annotations

import socket
from typing import Any

from common.endpoint import Endpoint
from common.nodeconfig import NodeConfig

from .base import COST_TCP, LinkError, LinkHost, ip_cost
from .stream import StreamFactory, StreamLink, bound_listener

DIAL_TIMEOUT = 5.0


def sockaddr_text(addr: tuple[Any, ...]) -> str:
    """A socket address as the reference prints it: v4-mapped as IPv4,
    IPv6 in brackets."""
    host, port = str(addr[0]), addr[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def unmapped(host: str) -> str:
    """An IPv4-mapped IPv6 address as plain IPv4 text."""
    return host[len("::ffff:") :] if host.startswith("::ffff:") and "." in host else host


class TcpLink(StreamLink):
    """A TCP connection carrying the packet stream."""

    link_type = "tcp"

    def remote_ip(self) -> str | None:
        """The peer's address, for the interface watch."""
        return self.endpoint.host


class StreamAsQuicLink(TcpLink):
    """Test double (MYCELIUM_DEBUG_STREAM_QUIC=1 only): ``quic://`` peers
    over a TCP packet stream, so a second peerd family can be tested
    before (or without) the QUIC link module."""

    link_type = "quic"


def make_link(host: LinkHost, sock: socket.socket, inbound: bool, cls: type[TcpLink] = TcpLink) -> TcpLink:
    """Wrap a connected TCP socket: Nagle off, the reference's link name."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    local = sock.getsockname()
    remote = sock.getpeername()
    ep = Endpoint(cls.link_type, unmapped(str(remote[0])), int(remote[1]))
    name = f"{cls.link_type.upper()} {sockaddr_text(local)} <-> {sockaddr_text(remote)}"
    return cls(host, sock, ep, name, ip_cost(str(remote[0]), COST_TCP), inbound)


class TcpFactory(StreamFactory):
    """The TCP listener (all addresses, both families) and dialler."""

    link_type = "tcp"

    link_class: type[TcpLink] = TcpLink

    def __init__(self, cfg: NodeConfig, host: LinkHost, port: int | None = None) -> None:
        super().__init__(cfg, host)
        self.port = cfg.tcp_listen_port if port is None else port

    def make_listener(self) -> socket.socket | None:
        """``[::]:port`` accepting IPv4 too."""
        opts = ((socket.SOL_SOCKET, socket.SO_REUSEADDR, 1), (socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0))
        return bound_listener(socket.AF_INET6, ("::", self.port), opts)

    def wrap(self, sock: socket.socket, inbound: bool) -> TcpLink:
        """A connected TCP socket as a link of this factory's class."""
        return make_link(self.host, sock, inbound, cls=self.link_class)

    async def dial(self, endpoint: Endpoint) -> TcpLink:
        """Connect to ``tcp://host:port`` (link-local with %scope too)."""
        if endpoint.proto != self.link_type:
            raise LinkError(f"{endpoint} is not a {self.link_type} endpoint")
        try:
            infos = socket.getaddrinfo(
                endpoint.host, endpoint.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
            )
        except socket.gaierror as exc:
            raise LinkError(f"{endpoint}: {exc}") from exc
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        await self.connect(sock, addr, DIAL_TIMEOUT)
        return self.wrap(sock, inbound=False)

    def describe(self) -> str:
        """For the start-up log."""
        return f"{self.link_type.upper()} over TCP port {self.port}"


class StreamAsQuicFactory(TcpFactory):
    """Test double for a second family (see StreamAsQuicLink): listens on
    ``quic_listen_port`` (TCP)."""

    link_type = "quic"
    link_class = StreamAsQuicLink

    def __init__(self, cfg: NodeConfig, host: LinkHost) -> None:
        super().__init__(cfg, host, cfg.quic_listen_port)


def make_factory(cfg: NodeConfig, host: LinkHost) -> TcpFactory | None:
    """peerd's entry point for this link type (none in a private network:
    links/tls.py owns the TCP port then and dials tcp:// peers as TLS)."""
    return None if cfg.network_name is not None else TcpFactory(cfg, host)
