"""A link's bounded send queue and its write loop, for links that write a
byte stream (TCP, vsock; the QUIC control stream can use it too).

Control packets (up to a generous count, written first) and data (bounded
in bytes; whole batches of packets from tund or from transit forwarding)
wait in two queues. The write loop hands up to WRITE_BATCH_BUFFERS queued
buffers to one ``writev`` per turn (no joining, no copy into a transport
buffer) and waits for writability itself when the socket is full.

With nothing queued a batch is written at once, from the caller (no trip
through the event loop). A batch *borrowed* from a shared-memory ring is
valid only during the call: what of it cannot be written at once is copied.
A writer outside the queue may do the same (common/datapath.py
write_direct, in C from tund's ring): ``write_fd`` is the socket exactly
while the queue is idle, -1 otherwise, and ``keep`` takes what the socket
did not.

The queue knows nothing of sockets: it is given a ``writev`` (raises
BlockingIOError when the socket is full, OSError when it is broken) and
a ``wait_writable`` coroutine, so tests drive it with fakes.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from common.native import fields

Buffer = bytes | bytearray | memoryview

MAX_CONTROL_QUEUE = 10_000
MAX_DATA_QUEUE = 2_000  # packets of the largest size the reference originates ...
MAX_DATA_QUEUE_BYTES = MAX_DATA_QUEUE * 1472  # ... counted in bytes, since data moves in batches
WRITE_BATCH_BYTES = 256 * 1024
WRITE_BATCH_BUFFERS = 64  # iovecs per writev


if TYPE_CHECKING:
    _QueueFields = object
else:
    _QueueFields = fields("QueueFields")  # write_fd and tx_bytes in slots for the kernel's direct writes


class SendQueue(_QueueFields):
    """Bounded queues plus the partial-write remainder of one stream."""

    def __init__(
        self,
        writev: Callable[[Sequence[Buffer]], int],
        counters: Counter[str],
        max_control: int = MAX_CONTROL_QUEUE,
        max_data_bytes: int = MAX_DATA_QUEUE_BYTES,
        direct_fd: int = -1,
    ) -> None:
        self.writev = writev
        self.direct_fd = direct_fd  # the socket, for writers outside the queue (-1: none may write)
        self.write_fd = direct_fd  # direct_fd while idle, else -1 (kept in step with ``idle``)
        self.counters = counters
        self.max_control = max_control
        self.max_data_bytes = max_data_bytes
        self.control: deque[Buffer] = deque()
        self.data: deque[Buffer] = deque()
        self.data_bytes = 0
        self.pending: deque[memoryview] = deque()  # what a partial write left, in order
        self.blocked = False  # the socket buffer is full: the write loop waits for room
        self.closed = False
        self.error: str | None = None  # why a write failed (the link must end)
        self.tx_bytes = 0
        self.wake = asyncio.Event()

    @property
    def idle(self) -> bool:
        """Nothing waits: a new batch may be written straight away."""
        return not (self.blocked or self.closed or self.pending or self.control or self.data)

    def push_control(self, packets: Sequence[bytes]) -> None:
        """Queue control packets; the newest are dropped past the cap."""
        for packet in packets:
            if len(self.control) >= self.max_control:
                self.counters["control_queue_full"] += 1
                continue
            self.control.append(packet)
            self.write_fd = -1
        self.wake.set()

    def push_data(self, frame: Buffer, packets: int = 1, borrowed: bool = False) -> bool:
        """Write ``frame`` now if nothing waits, else queue it (copied if
        ``borrowed``); False when dropped because the data queue is full."""
        if self.idle:
            try:
                sent = self.writev((frame,))
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.fail(f"write error: {exc}")
                return True  # taken: the link is going down
            self.tx_bytes += sent
            if sent == len(frame):
                return True
            rest = memoryview(frame)[sent:]
            self.pending.append(memoryview(bytes(rest)) if borrowed else rest)
            self.write_fd = -1
            self.wake.set()
            return True
        if self.closed:
            return True
        if self.data_bytes + len(frame) > self.max_data_bytes:
            self.counters["data_queue_full"] += packets
            return False
        self.data.append(bytes(frame) if borrowed else frame)
        self.data_bytes += len(frame)
        self.write_fd = -1
        self.wake.set()
        return True

    def keep(self, rest: bytes) -> None:
        """The part of a batch a direct writer could not write (it wrote
        the rest while the queue was idle): written next, in order."""
        if self.closed:
            return
        self.pending.append(memoryview(rest))
        self.write_fd = -1
        self.wake.set()

    def fail(self, why: str) -> None:
        """A write failed: stop writing and remember why."""
        if self.error is None:
            self.error = why
        self.close()

    def close(self) -> None:
        """Stop; queued bytes are dropped, the write loop returns."""
        self.closed = True
        self.write_fd = -1
        self.wake.set()

    def take(self) -> tuple[list[Buffer], int]:
        """The buffers for one writev, in order (remainder, control, data)
        and their total size; at most WRITE_BATCH_BUFFERS buffers, about
        WRITE_BATCH_BYTES (whole buffers are never split)."""
        control, data, pending = self.control, self.data, self.pending
        bufs: list[Buffer] = list(pending)
        pending.clear()
        size = sum(len(b) for b in bufs)
        while control and size < WRITE_BATCH_BYTES and len(bufs) < WRITE_BATCH_BUFFERS:
            frame = control.popleft()
            bufs.append(frame)
            size += len(frame)
        data_size = 0
        while data and size < WRITE_BATCH_BYTES and len(bufs) < WRITE_BATCH_BUFFERS:
            frame = data.popleft()
            bufs.append(frame)
            size += len(frame)
            data_size += len(frame)
        self.data_bytes -= data_size
        return bufs, size

    def written(self, bufs: list[Buffer], sent: int) -> bool:
        """After a writev of ``bufs`` that wrote ``sent`` bytes: keep the
        unwritten rest, in order; True if everything went."""
        self.tx_bytes += sent
        total = sum(len(b) for b in bufs)
        if sent >= total:
            return True
        for b in bufs:
            n = len(b)
            if sent >= n:
                sent -= n
                continue
            self.pending.append(memoryview(b)[sent:])
            sent = 0
        self.write_fd = -1
        return False

    async def run(self, wait_writable: Callable[[], Awaitable[None]]) -> None:
        """The write loop: until closed, write what is queued, waiting for
        room when the socket is full. A write error ends it (``error``)."""
        writev = self.writev
        while not self.closed:
            await self.wake.wait()
            self.wake.clear()
            while (self.pending or self.control or self.data) and not self.closed:
                bufs, _ = self.take()
                try:
                    sent = writev(bufs)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError as exc:
                    self.fail(f"write error: {exc}")
                    return
                if not self.written(bufs, sent):
                    self.blocked = True
                    await wait_writable()
                    self.blocked = False
            if self.idle:  # everything written: a direct writer may write again
                self.write_fd = self.direct_fd
