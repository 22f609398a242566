"""The sans-IO part of the SOCKS5 proxy feature: how a probe's answer is
classified, the table of probe results, and the rules for the remote
address a user may give (TRANSPORTS.md 3.1, the reference's proxy.rs).

Nothing here does I/O; the service (service.py) connects, writes
``GREETING``, reads at most ``REPLY_LEN`` bytes and hands what it got (or
None for a failed connect, a reset or a timeout) to ``classify``.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable

from common.endpoint import EndpointError, parse_socket_address
from common.identity import address_of

SOCKS_PORT = 1080  # IANA's SOCKS port: probed on every node, and the local relay port
PROBE_INTERVAL = 60.0  # seconds between probe rounds (the reference's)
PROBE_TIMEOUT = 5.0  # connect + greeting + reply, per probe
GREETING = b"\x05\x01\x00"  # version 5, one method offered: 0 = no authentication
REPLY_LEN = 2
REPLY_VALID = b"\x05\x00"  # the server chose "no authentication"
REPLY_AUTH_REQUIRED = b"\x05\xff"  # "no acceptable methods": it wants authentication
MAX_TABLE = 65_536  # probe results kept (one per node address)


class ProbeStatus(enum.Enum):
    """The reference's ProxyProbeStatus."""

    NOT_LISTENING = "notListening"  # connect failed, reset, short read or timeout
    VALID = "valid"  # an open SOCKS5 proxy (no authentication)
    AUTH_REQUIRED = "authenticationRequired"
    NOT_A_PROXY = "notAProxy"  # something answered, but not as a SOCKS5 server


def classify(reply: bytes | None) -> ProbeStatus:
    """What the first two bytes answered to ``GREETING`` say. ``None`` or
    fewer than two bytes: nothing (valid) is listening, as the reference's
    ``read_exact`` failure. Bytes past the second are not looked at."""
    if reply is None or len(reply) < REPLY_LEN:
        return ProbeStatus.NOT_LISTENING
    head = bytes(reply[:REPLY_LEN])
    if head == REPLY_VALID:
        return ProbeStatus.VALID
    if head == REPLY_AUTH_REQUIRED:
        return ProbeStatus.AUTH_REQUIRED
    return ProbeStatus.NOT_A_PROXY


class ProbeTable:
    """Latest probe result per node address, bounded: past ``limit`` entries
    a new address replaces the oldest result (results of a later round
    overwrite, as the reference's cache does)."""

    def __init__(self, limit: int = MAX_TABLE) -> None:
        self.limit = limit
        self._results: dict[ipaddress.IPv6Address, ProbeStatus] = {}

    def record(self, address: ipaddress.IPv6Address, status: ProbeStatus) -> None:
        self._results.pop(address, None)
        if len(self._results) >= self.limit:
            del self._results[next(iter(self._results))]
        self._results[address] = status

    def status(self, address: ipaddress.IPv6Address) -> ProbeStatus | None:
        return self._results.get(address)

    def valid(self) -> list[ipaddress.IPv6Address]:
        """The proxies that are listed and raced: no-auth ones only (API.md 6.9)."""
        return sorted(a for a, s in self._results.items() if s is ProbeStatus.VALID)

    def results(self) -> dict[str, str]:
        """Every result, for status answers and tests: address -> status value."""
        return {str(a): s.value for a, s in self._results.items()}

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in ProbeStatus}
        for s in self._results.values():
            out[s.value] += 1
        return out

    def __len__(self) -> int:
        return len(self._results)


def probe_targets(node_keys: Iterable[bytes], own: ipaddress.IPv6Address) -> list[ipaddress.IPv6Address]:
    """The addresses a round probes: the node address of each selected
    route's router (derived from its public key), once each, not our own."""
    seen: dict[ipaddress.IPv6Address, None] = {}
    for key in node_keys:
        if isinstance(key, bytes | bytearray) and len(key) == 32:
            addr = address_of(bytes(key))
            if addr != own:
                seen[addr] = None
    return list(seen)


class RemoteError(ValueError):
    """A remote that is not a socket address."""


def parse_remote(text: object) -> tuple[str, int]:
    """A remote as the reference's ``SocketAddr``: ``[ipv6]:port`` or
    ``ipv4:port``, a literal IP (no names), port 1-65535. Returns (host, port)."""
    try:
        ep = parse_socket_address(text)
    except EndpointError as exc:
        raise RemoteError(str(exc)) from exc
    return ep.host, ep.port


def show_remote(host: str, port: int) -> str:
    """Rust's ``SocketAddr`` display: brackets around IPv6."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
