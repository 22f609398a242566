"""Route metric arithmetic (PROTOCOL.md 5.4): u16, 0xFFFF is infinite,
finite sums saturate at 0xFFFE so addition never makes a route infinite."""

from __future__ import annotations

INFINITE = 0xFFFF
MAX_FINITE = 0xFFFE


def metric_add(a: int, b: int) -> int:
    if a == INFINITE or b == INFINITE:
        return INFINITE
    return min(a + b, MAX_FINITE)


def metric_sub(a: int, b: int) -> int:
    if a == INFINITE:
        return INFINITE
    return max(a - b, 0)


def metric_delta(a: int, b: int) -> int:
    return abs(a - b)
