"""Peer endpoints: ``<proto>://<socket address>`` (PROTOCOL.md 2.1)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

PROTOCOLS = ("tcp", "quic", "tls", "vsock")


class EndpointError(ValueError):
    """Text that is not a valid endpoint; the message is user-facing."""


@dataclass(frozen=True)
class Endpoint:
    proto: str
    host: str  # IP text (with %scope for link-local), or the vsock cid
    port: int

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        if "://" not in text:
            raise EndpointError(f"invalid endpoint {text!r}: missing '://' (expected e.g. tcp://192.0.2.6:9651)")
        proto, _, rest = text.partition("://")
        proto = proto.lower()
        if proto not in PROTOCOLS:
            raise EndpointError(f"invalid endpoint {text!r}: unknown protocol {proto!r}")
        if proto == "vsock":
            cid, sep, port = rest.partition(":")
            if not (sep and cid.isdigit() and port.isdigit()) or int(cid) >= 1 << 32 or int(port) >= 1 << 32:
                raise EndpointError(f"invalid endpoint {text!r}: expected vsock://<cid>:<port>")
            return cls(proto, str(int(cid)), int(port))
        host, port_text = _split_host_port(text, rest)
        if not port_text.isdigit() or not 0 < int(port_text) <= 0xFFFF:
            raise EndpointError(f"invalid endpoint {text!r}: bad port {port_text!r}")
        return cls(proto, host, int(port_text))

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.host.split("%", 1)[0])

    @property
    def socket_text(self) -> str:
        if self.proto == "vsock":
            return f"{self.host}:{self.port}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        """The reference's serialisation (API.md section 1, PeerStats.endpoint)."""
        if self.proto == "vsock":
            return {"proto": "vsock", "addr": {"vsock": {"cid": int(self.host), "port": self.port}}}
        return {"proto": self.proto, "addr": {"socket": self.socket_text}}

    def __str__(self) -> str:
        return f"{self.proto}://{self.socket_text}"


def parse_socket_address(text: object) -> Endpoint:
    """A bare socket address as Rust's ``SocketAddr`` parses it (``[ipv6]:port``
    or ``ipv4:port``, literal IPs only), e.g. a proxy remote; as a tcp Endpoint."""
    if not isinstance(text, str) or not text or len(text) > 64 or text != text.strip() or "://" in text:
        raise EndpointError(f"expected a socket address like [407:...]:1080, got {text!r}")
    return Endpoint.parse(f"tcp://{text}")


def _split_host_port(text: str, rest: str) -> tuple[str, str]:
    if rest.startswith("["):
        host, sep, tail = rest[1:].partition("]")
        if not sep or not tail.startswith(":"):
            raise EndpointError(f"invalid endpoint {text!r}: expected [ipv6]:port")
        port = tail[1:]
        addr, _, scope = host.partition("%")
        try:
            if ipaddress.ip_address(addr).version != 6:
                raise ValueError(addr)
        except ValueError as exc:
            raise EndpointError(f"invalid endpoint {text!r}: bad IPv6 address {host!r}") from exc
        if "%" in host and not scope:
            raise EndpointError(f"invalid endpoint {text!r}: empty scope id")
        return str(ipaddress.ip_address(addr)) + (f"%{scope}" if scope else ""), port
    host, sep, port = rest.rpartition(":")
    if not sep:
        raise EndpointError(f"invalid endpoint {text!r}: missing port")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise EndpointError(
            f"invalid endpoint {text!r}: {host!r} is not an IP address (host names are not supported)"
        ) from exc
    if ip.version != 4:
        raise EndpointError(f"invalid endpoint {text!r}: IPv6 addresses must be in brackets")
    return str(ip), port
