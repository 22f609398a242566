"""Packets waiting for a route, bounded per destination /64 and in total.

Used by peerd (transit packets toward a subnet being queried) and tund
(packets whose key or next hop is not known yet). Entries expire with the
route query (15 s, PROTOCOL.md 4.4); nothing grows without bound.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from typing import Generic, TypeVar

T = TypeVar("T")
QUERY_TIMEOUT = 15.0


class PendingQueue(Generic[T]):
    def __init__(self, per_subnet: int, total: int, timeout: float = QUERY_TIMEOUT) -> None:
        self.per_subnet = per_subnet
        self.total = total
        self.timeout = timeout
        self._queues: OrderedDict[bytes, tuple[float, deque[T]]] = OrderedDict()
        self._count = 0
        self.drops: Counter[str] = Counter()

    def __len__(self) -> int:
        return self._count

    def subnets(self) -> list[bytes]:
        return list(self._queues)

    def push(self, prefix: bytes, item: T, now: float) -> bool:
        """Queue ``item`` under the /64 ``prefix``; True when this is the first
        packet for that prefix (the caller should ask for a route)."""
        entry = self._queues.get(prefix)
        if self._count >= self.total or (entry is not None and len(entry[1]) >= self.per_subnet):
            self.drops["pending_full"] += 1
            return False
        first = entry is None
        if entry is None:
            entry = self._queues[prefix] = (now + self.timeout, deque())
        entry[1].append(item)
        self._count += 1
        return first

    def pop(self, prefix: bytes) -> list[T]:
        entry = self._queues.pop(prefix, None)
        if entry is None:
            return []
        self._count -= len(entry[1])
        return list(entry[1])

    def expire(self, now: float) -> list[T]:
        """Drop (and return) queues whose route query timed out."""
        out: list[T] = []
        for prefix in [p for p, (deadline, _) in self._queues.items() if deadline <= now]:
            items = self.pop(prefix)
            self.drops["pending_expired"] += len(items)
            out.extend(items)
        return out
