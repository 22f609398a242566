"""The internet checksum (RFC 1071), one definition for ICMPv6, GSO and GRO.

Two forms, each the fastest for its case (measured, docs/PERFORMANCE.md):

- ``ones_sum`` for one piece: ``int.from_bytes(...) % 0xFFFF`` is the
  one's complement sum of the 16-bit words (2**16 is 1 mod 0xFFFF), done
  in C by CPython's big-integer code; ~1 µs for 1500 bytes, no numpy call
  overhead (which is ~3 µs per call).
- ``ones_sums`` for the many pieces of a TCP super packet: one numpy
  ``reduceat`` sums all segments at once.

Sums are kept "not folded" or reduced mod 0xFFFF; ``finish`` turns one into
the value of a checksum field (0 is sent as 0xFFFF only by UDP, not here).
"""

from __future__ import annotations

from typing import Any

NEXT_TCP = 6
NEXT_ICMPV6 = 58


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """One's complement sum of big-endian 16-bit words mod 0xFFFF (an odd
    last byte is padded with zero)."""
    if len(data) & 1:
        return (int.from_bytes(data, "big") << 8) % 0xFFFF
    return int.from_bytes(data, "big") % 0xFFFF


def pseudo_header_sum(addrs: bytes | bytearray | memoryview, length: int, next_header: int) -> int:
    """Sum of the IPv6 pseudo header: ``addrs`` is source + destination (32 bytes)."""
    return (int.from_bytes(addrs, "big") + length + next_header) % 0xFFFF


def finish(total: int) -> int:
    """The checksum field for a sum: its one's complement, 16 bits."""
    return -total % 0xFFFF


def _numpy() -> Any:
    """numpy on first use: a process that never sums super packets here
    (tund with the native kernel, common/_kernel.c) saves the ~10 MiB it costs."""
    import numpy

    return numpy


def ones_sums(data: bytes | bytearray | memoryview, start: int, step: int, count: int) -> list[int]:
    """One's complement sums (not folded, big-endian 16-bit words) of
    ``count`` consecutive pieces of ``step`` bytes from ``start`` to the
    end of ``data`` (the last piece may be shorter, even odd)."""
    np = _numpy()
    length = len(data) - start
    if step & 1:  # pieces not word-aligned: the slow way (the kernel's MSS is even in practice)
        return [ones_sum(data[start + i * step : min(start + (i + 1) * step, len(data))]) for i in range(count)]
    words = np.frombuffer(data, dtype=">u2", offset=start, count=length // 2)
    sums: list[int] = np.add.reduceat(words, np.arange(0, length // 2, step // 2), dtype=np.uint64).tolist()
    if len(sums) < count:  # the last piece is a single odd byte
        sums.append(0)
    if length & 1:
        sums[-1] += data[len(data) - 1] << 8
    return sums
