"""Babel sequence numbers (RFC 8966 3.2.1): u16 with wrapping order.

Values exactly 32768 apart are neither less nor greater, as in the
reference.
"""

from __future__ import annotations

HALF = 1 << 15
MASK = 0xFFFF


def seqno_lt(a: int, b: int) -> bool:
    return a != b and ((b - a) & MASK) < HALF


def seqno_gt(a: int, b: int) -> bool:
    return a != b and ((b - a) & MASK) > HALF


def seqno_add(a: int, n: int) -> int:
    return (a + n) & MASK
