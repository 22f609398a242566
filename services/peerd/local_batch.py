"""The common case of a read from a link, in one pass of numpy instead of a
Python loop per packet: every data packet is for this node.

``link_rx`` goes one step further for stream links: the read itself and
the hand-over of the packets for this node at the start of the buffer to
tund's ring, in one C call when the kernel is built, before any Python
bookkeeping (an idle ping's wake-up in peerd: 60-80 µs of interpreter
between the read and the hand-over, issue 13b). The Python version below
is its reference.

An endpoint of a bulk transfer receives ~100 packets per read, all for
itself. Checking each one's destination and hop limit, decrementing the
hop limit and finding the runs of one flow (for the packet statistics)
costs ~0.6 µs per packet in Python; as array operations it is ~20 µs per
read whatever its size. Anything else (transit packets, an expiring hop
limit, small reads) takes the per-packet path in service.py.
"""

from __future__ import annotations

import os
from typing import Any

from common.datapath import DataOut
from common.native import kernel
from common.wire.packet import TYPE_DATA, VERSION
from common.wire.rules import (
    DATA_PREFIX_SIZE,
    DST_OFFSET,
    DST_PREFIX_END,
    HOP_OFFSET,
    MIN_FORWARD_HOP_LIMIT,
    SRC_OFFSET,
)

Runs = list[tuple[bytes, int, int]]  # (source + destination, packets, body bytes)

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


def _link_rx_python(
    fd: int, buf: bytearray, have: int, own_prefix: bytes, data_out: DataOut, max_batch: int
) -> tuple[int, int, Runs | None]:
    """One read from a stream socket into ``buf[have:]``; then the whole
    data packets at the start of ``buf`` that are for ``own_prefix`` and
    forwardable go to tund's ring as one record (``data_out``), their hop
    limits decremented. Returns (bytes read, 0 at the end of the stream,
    -errno when the read failed; bytes handed over from the start of
    ``buf``, 0 when none went and ``buf`` is as read; their runs for the
    packet statistics). Whatever is not handed over is the caller's, as
    from any read: transit, control, a hop limit running out, a partial
    packet, a ring that is full or not connected (DataOut.send's slow
    paths retry, reconnect and count)."""
    try:
        n = os.readv(fd, [memoryview(buf)[have:]])
    except OSError as exc:
        return -(exc.errno or 0), 0, None
    if n == 0:
        return 0, 0, None
    end = have + n
    pos = 0
    offsets: list[int] = []
    while end - pos >= DATA_PREFIX_SIZE and buf[pos] == VERSION and buf[pos + 1] == TYPE_DATA:
        nxt = pos + DATA_PREFIX_SIZE + (buf[pos + 5] << 8 | buf[pos + 6])
        if nxt > end or buf[pos + HOP_OFFSET] < MIN_FORWARD_HOP_LIMIT:
            break
        if buf[pos + DST_OFFSET : pos + DST_PREFIX_END] != own_prefix:
            break
        offsets.append(pos)
        pos = nxt
    if not offsets or data_out.fd < 0 or pos > max_batch or pos > data_out.ring.max_record:
        return n, 0, None
    for off in offsets:
        buf[off + HOP_OFFSET] -= 1
    if not data_out.put_and_announce(bytes(buf[:pos]), b""):
        for off in offsets:
            buf[off + HOP_OFFSET] += 1
        return n, 0, None
    runs: Runs = []
    key = b""
    for off in offsets:
        addrs = bytes(buf[off + SRC_OFFSET : off + DATA_PREFIX_SIZE])
        body = buf[off + 5] << 8 | buf[off + 6]
        if runs and addrs == key:
            _, packets, nbytes = runs[-1]
            runs[-1] = (key, packets + 1, nbytes + body)
        else:
            key = addrs
            runs.append((addrs, 1, body))
    return n, pos, runs


link_rx: Any = _link_rx_python if kernel is None else kernel.link_rx
