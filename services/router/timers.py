"""Keyed one-shot timers for the sans-IO router.

Every piece of routing state with a deadline (route entries, queries,
source-table entries, cache entries, per-peer Hello and liveness) gets one
key here. Deadlines usually move *later* (a refreshed route, a new IHU), so
instead of re-pushing on every refresh a key keeps only its earliest pending
deadline on the heap; the owner's handler re-checks the real deadline when it
fires and re-arms if needed. That keeps the heap at about one item per live
key no matter how often remote input refreshes state.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any

TimerKey = tuple[Any, ...]  # (kind, ...): what the engine schedules


class TimerQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerKey]] = []
        self._pending: dict[TimerKey, float] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._pending)

    def schedule(self, key: TimerKey, when: float) -> None:
        """Arm ``key`` for ``when`` unless it is already armed no later."""
        current = self._pending.get(key)
        if current is not None and current <= when:
            return
        self._pending[key] = when
        heapq.heappush(self._heap, (when, next(self._seq), key))
        if len(self._heap) > 4 * len(self._pending) + 256:
            self._compact()

    def cancel(self, key: TimerKey) -> None:
        """Forget ``key``; its heap item goes stale and is skipped later."""
        self._pending.pop(key, None)

    def next_time(self) -> float | None:
        heap = self._heap
        while heap:
            when, _, key = heap[0]
            if self._pending.get(key) == when:
                return when
            heapq.heappop(heap)  # stale: cancelled or superseded by an earlier push
        return None

    def pop_due(self, now: float) -> TimerKey | None:
        """The next key whose deadline is <= now, disarmed; None when nothing is due."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, key = heapq.heappop(heap)
            if self._pending.get(key) == when:
                del self._pending[key]
                return key
        return None

    def _compact(self) -> None:
        self._heap = [(when, next(self._seq), key) for key, when in self._pending.items()]
        heapq.heapify(self._heap)
