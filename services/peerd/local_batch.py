"""The common case of a read from a link, in one pass of numpy instead of a
Python loop per packet: every data packet is for this node.

An endpoint of a bulk transfer receives ~100 packets per read, all for
itself. Checking each one's destination and hop limit, decrementing the
hop limit and finding the runs of one flow (for the packet statistics)
costs ~0.6 µs per packet in Python; as array operations it is ~20 µs per
read whatever its size. Anything else (transit packets, an expiring hop
limit, small reads) takes the per-packet path in service.py.
"""

from __future__ import annotations

from typing import Any

from common.native import kernel
from common.wire.rules import (
    DATA_PREFIX_SIZE,
    DST_OFFSET,
    DST_PREFIX_END,
    HOP_OFFSET,
    MIN_FORWARD_HOP_LIMIT,
    SRC_OFFSET,
)

MIN_PACKETS = 16  # below this the per-packet loop is cheaper than numpy
_HOP = HOP_OFFSET


def _all_local_numpy(
    buf: bytearray, offsets: list[int], own_prefix: bytes
) -> tuple[list[tuple[int, int]], list[tuple[bytes, int, int]]] | None:
    """If every data packet at ``offsets`` in ``buf`` is for ``own_prefix``
    (/64) and has a hop limit of at least 2: decrement the hop limits in
    place and return the contiguous byte ranges the packets fill and the
    runs of packets with the same addresses ((source + destination,
    packets, body bytes)). Otherwise None, and ``buf`` is untouched.
    The native kernel's ``all_local`` does the same in C (and spares
    peerd the numpy import)."""
    import numpy as np  # first use only; not imported at all with the native kernel

    addrs = np.arange(SRC_OFFSET, DATA_PREFIX_SIZE)  # source and destination
    dst_prefix = np.arange(DST_OFFSET, DST_PREFIX_END)
    arr = np.frombuffer(buf, dtype=np.uint8)
    offs = np.array(offsets, dtype=np.int64)
    hops = arr[offs + _HOP]
    if hops.min() < MIN_FORWARD_HOP_LIMIT:
        return None
    if not (arr[offs[:, None] + dst_prefix] == np.frombuffer(own_prefix, dtype=np.uint8)).all():
        return None
    arr[offs + _HOP] = hops - 1
    bodies = (arr[offs + 5].astype(np.int64) << 8) | arr[offs + 6]
    ends = offs + DATA_PREFIX_SIZE + bodies
    cuts = (np.flatnonzero(ends[:-1] != offs[1:]) + 1).tolist()  # where a new contiguous range starts
    starts = [0, *cuts]
    stops = [*cuts, len(offsets)]
    ranges = [(offsets[a], int(ends[b - 1])) for a, b in zip(starts, stops, strict=True)]
    keys = arr[offs[:, None] + addrs]
    changes = (np.flatnonzero((keys[1:] != keys[:-1]).any(axis=1)) + 1).tolist()
    run_starts = [0, *changes]
    run_stops = [*changes, len(offsets)]
    runs = [(keys[a].tobytes(), b - a, int(bodies[a:b].sum())) for a, b in zip(run_starts, run_stops, strict=True)]
    return ranges, runs


all_local: Any = _all_local_numpy if kernel is None else kernel.all_local
if kernel is not None:
    # the C pass costs less than the Python loop even for one packet, and an
    # idle ping's wake-up is where the loop costs most (cold, issue 13b)
    MIN_PACKETS = 1
