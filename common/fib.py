"""A local copy of the router's forwarding table (FIB), kept by every
data-path process so per-packet decisions never leave the process.

The router publishes deltas on ``router.fib`` with an (epoch, seq) pair;
a replica takes a snapshot over rpc, applies deltas in order, and asks for
a new snapshot on a gap or a new epoch (the router restarted). A gap shows
only when a later delta arrives, so the router also publishes its current
(epoch, seq) once a second (``make_head``): a replica whose SUB connection
came up just after the last delta (PUB drops what it sends before then:
every service starting at once) learns within a second that it is behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Route:
    next_hop: str | None  # peer id; None: known subnet without a selected route
    public_key: bytes


def _mask(addr: bytes, plen: int) -> bytes:
    full, rem = divmod(plen, 8)
    if rem == 0:
        return bytes(addr[:full])
    return bytes(addr[:full]) + bytes([addr[full] & (0xFF << (8 - rem)) & 0xFF])


class FibReplica:
    """Longest-prefix lookup over 16-byte IPv6 addresses; one dict probe per
    prefix length present (in practice only /64)."""

    def __init__(self) -> None:
        self.epoch: int | None = None
        self.seq = -1
        self._by_plen: dict[int, dict[bytes, Route]] = {}
        self._plens: list[int] = []

    def __len__(self) -> int:
        return sum(len(t) for t in self._by_plen.values())

    def lookup(self, addr: bytes) -> Route | None:
        for plen in self._plens:
            route = self._by_plen[plen].get(_mask(addr, plen))
            if route is not None:
                return route
        return None

    def entries(self) -> list[tuple[bytes, int, Route]]:
        return [(key, plen, route) for plen, table in self._by_plen.items() for key, route in table.items()]

    def _set(self, network: bytes, plen: int, route: Route) -> None:
        table = self._by_plen.get(plen)
        if table is None:
            table = self._by_plen[plen] = {}
            self._plens = sorted(self._by_plen, reverse=True)
        table[_mask(network, plen)] = route

    def _del(self, network: bytes, plen: int) -> None:
        table = self._by_plen.get(plen)
        if table is not None:
            table.pop(_mask(network, plen), None)

    def load_snapshot(self, snapshot: dict[str, Any]) -> None:
        self._by_plen.clear()
        self._plens = []
        for network, plen, next_hop, pk in snapshot["entries"]:
            self._set(network, plen, Route(next_hop, pk))
        self.epoch = snapshot["epoch"]
        self.seq = snapshot["seq"]

    def apply_delta(self, delta: dict[str, Any]) -> bool:
        """Apply one published delta or head; False means a snapshot is needed first."""
        if is_head(delta):
            return bool(delta["epoch"] == self.epoch and delta["seq"] <= self.seq)
        if delta["epoch"] != self.epoch or delta["seq"] > self.seq + 1:
            return False
        if delta["seq"] <= self.seq:
            return True  # already covered by the snapshot
        for network, plen, next_hop, pk in delta.get("set", ()):
            self._set(network, plen, Route(next_hop, pk))
        for network, plen in delta.get("del", ()):
            self._del(network, plen)
        self.seq = delta["seq"]
        return True


def make_delta(epoch: int, seq: int, changes: list[tuple[bytes, int, Route | None]]) -> dict[str, Any]:
    """The delta the router publishes for ``changes`` in the order they
    happened ((network, prefix length, route), None for a removal). Only the
    last change of each prefix is kept: a replica applies the sets before
    the dels, so a prefix removed and set again in one turn must not be in
    both lists."""
    last: dict[tuple[bytes, int], tuple[bytes, Route | None]] = {}
    for network, plen, route in changes:
        key = (_mask(network, plen), plen)
        last.pop(key, None)  # keep the order of the last change
        last[key] = (network, route)
    sets = [[net, plen, r.next_hop, r.public_key] for (_, plen), (net, r) in last.items() if r is not None]
    dels = [[net, plen] for (_, plen), (net, r) in last.items() if r is None]
    return {"epoch": epoch, "seq": seq, "set": sets, "del": dels}


def is_head(message: dict[str, Any]) -> bool:
    """A head changes no table: nothing downstream needs telling."""
    return isinstance(message, dict) and bool(message.get("head"))


def make_head(epoch: int, seq: int) -> dict[str, Any]:
    """What the router publishes between deltas: the (epoch, seq) its table
    is at, nothing to apply."""
    return {"epoch": epoch, "seq": seq, "head": True}
