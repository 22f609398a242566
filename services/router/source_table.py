"""Feasibility distances (PROTOCOL.md 6.1, 6.2; RFC 8966 3.5.1).

The table records what *this node advertised* per (subnet, router id). A
neighbour's route is only usable if it is strictly better than anything we
told others, which is what keeps next-hop chains loop-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from .metric import INFINITE
from .seqno import seqno_gt

SourceKey = tuple[int, bytes]  # (subnet key: routing_table.subnet_key, router id)


@dataclass(slots=True)
class FeasibilityDistance:
    metric: int
    seqno: int
    expires: float


class SourceTable:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: dict[SourceKey, FeasibilityDistance] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: SourceKey) -> FeasibilityDistance | None:
        return self.entries.get(key)

    def feasible(self, key: SourceKey, seqno: int, metric: int) -> bool:
        """Retractions are always feasible; otherwise newer seqno, or same seqno and smaller metric."""
        if metric == INFINITE:
            return True
        fd = self.entries.get(key)
        if fd is None:
            return True
        return seqno_gt(seqno, fd.seqno) or (seqno == fd.seqno and metric < fd.metric)

    def can_record(self, key: SourceKey) -> bool:
        return key in self.entries or len(self.entries) < self.capacity

    def record(self, key: SourceKey, metric: int, seqno: int, expires: float) -> bool:
        """Apply an Update we are about to send. Returns True when the entry's
        lifetime changed (so the caller re-arms its timer)."""
        fd = self.entries.get(key)
        if fd is None:
            self.entries[key] = FeasibilityDistance(metric, seqno, expires)
            return True
        return refresh_distance(fd, metric, seqno, expires)

    def try_record(self, key: SourceKey, metric: int, seqno: int, expires: float) -> bool:
        """``record`` unless the table is full and ``key`` new (then False):
        ``can_record`` and ``record`` in one lookup, for the hot path."""
        fd = self.entries.get(key)
        if fd is None:
            if len(self.entries) >= self.capacity:
                return False
            self.entries[key] = FeasibilityDistance(metric, seqno, expires)
        else:
            refresh_distance(fd, metric, seqno, expires)
        return True

    def remove(self, key: SourceKey) -> None:
        self.entries.pop(key, None)

    def sweep(self, now: float) -> int:
        """Purge expired entries; returns how many went."""
        expired = [key for key, fd in self.entries.items() if fd.expires <= now]
        for key in expired:
            del self.entries[key]
        return len(expired)


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
