"""Feasibility distances (PROTOCOL.md 6.1, 6.2; RFC 8966 3.5.1).

The table records what *this node advertised* per (subnet, router id). A
neighbour's route is only usable if it is strictly better than anything we
told others, which is what keeps next-hop chains loop-free.

Stored per subnet key (Subnet.key) rather than per (subnet,
router id) tuple: a subnet nearly always has one router id (its owner's; a
second one after the owner restarts, until the old entry expires), so the
distance carries its router id and any other router id's distance for the
same subnet hangs off it (``next``). That saves a key tuple per entry and
its building and hashing per lookup, on the hottest path of the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

from .metric import INFINITE
from .seqno import seqno_gt

SourceKey = tuple[int, bytes]  # (subnet key: Subnet.key, router id)


@dataclass(slots=True)
class FeasibilityDistance:
    metric: int
    seqno: int
    expires: float
    router_id: bytes = b""
    next: FeasibilityDistance | None = None  # another router id's distance for the same subnet


class SourceTable:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # subnet key -> the first of its distances (FeasibilityDistance.next links the rest)
        self.by_subnet: dict[Hashable, FeasibilityDistance] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[SourceKey]:
        for subnet, fd in self.by_subnet.items():
            node: FeasibilityDistance | None = fd
            while node is not None:
                yield subnet, node.router_id  # type: ignore[misc]
                node = node.next

    def lookup(self, subnet: Hashable, router_id: bytes) -> FeasibilityDistance | None:
        fd = self.by_subnet.get(subnet)
        while fd is not None and fd.router_id != router_id:
            fd = fd.next
        return fd

    def get(self, key: SourceKey) -> FeasibilityDistance | None:
        return self.lookup(key[0], key[1])

    def feasible(self, key: SourceKey, seqno: int, metric: int) -> bool:
        """Retractions are always feasible; otherwise newer seqno, or same seqno and smaller metric."""
        if metric == INFINITE:
            return True
        fd = self.lookup(key[0], key[1])
        if fd is None:
            return True
        return seqno_gt(seqno, fd.seqno) or (seqno == fd.seqno and metric < fd.metric)

    def can_record(self, key: SourceKey) -> bool:
        return self._count < self.capacity or self.lookup(key[0], key[1]) is not None

    def record(self, key: SourceKey, metric: int, seqno: int, expires: float) -> bool:
        """Apply an Update we are about to send. Returns True when the entry's
        lifetime changed (so the caller re-arms its timer)."""
        fd = self.lookup(key[0], key[1])
        if fd is None:
            self._insert(key, FeasibilityDistance(metric, seqno, expires, key[1]))
            return True
        return refresh_distance(fd, metric, seqno, expires)

    def try_record(self, key: SourceKey, metric: int, seqno: int, expires: float) -> bool:
        """``record`` unless the table is full and ``key`` new (then False):
        ``can_record`` and ``record`` in one lookup, for the hot path."""
        fd = self.lookup(key[0], key[1])
        if fd is None:
            if self._count >= self.capacity:
                return False
            self._insert(key, FeasibilityDistance(metric, seqno, expires, key[1]))
        else:
            refresh_distance(fd, metric, seqno, expires)
        return True

    def _insert(self, key: SourceKey, fd: FeasibilityDistance) -> None:
        first = self.by_subnet.get(key[0])
        if first is None:
            self.by_subnet[key[0]] = fd
        else:  # after the first router id: appended, so the first stays the common case
            while first.next is not None:
                first = first.next
            first.next = fd
        self._count += 1

    def remove(self, key: SourceKey) -> None:
        self._keep(key[0], lambda fd: fd.router_id != key[1])

    def sweep(self, now: float) -> int:
        """Purge expired entries; returns how many went."""
        before = self._count
        expired = []
        for subnet, fd in self.by_subnet.items():
            node: FeasibilityDistance | None = fd
            while node is not None:
                if node.expires <= now:
                    expired.append(subnet)
                    break
                node = node.next
        for subnet in expired:
            self._keep(subnet, lambda fd: fd.expires > now)
        return before - self._count

    def _keep(self, subnet: Hashable, keep: Callable[[FeasibilityDistance], bool]) -> None:
        """Drop the subnet's distances for which ``keep(fd)`` is false."""
        node = self.by_subnet.get(subnet)
        kept: list[FeasibilityDistance] = []
        while node is not None:
            if keep(node):
                kept.append(node)
            else:
                self._count -= 1
            node = node.next
        if not kept:
            self.by_subnet.pop(subnet, None)
            return
        for a, b in zip(kept, [*kept[1:], None], strict=True):
            a.next = b
        self.by_subnet[subnet] = kept[0]


def refresh_distance(fd: FeasibilityDistance, metric: int, seqno: int, expires: float) -> bool:
    """A newer seqno, or the same with a smaller metric, replaces the
    distance; any finite update refreshes its lifetime."""
    if seqno_gt(seqno, fd.seqno) or (seqno == fd.seqno and metric < fd.metric):
        fd.metric, fd.seqno, fd.expires = metric, seqno, expires
        return True
    if metric != INFINITE:
        fd.expires = expires
        return True
    return False
