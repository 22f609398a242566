"""Shared-memory rings for the data path between tund and peerd.

Measured on a 2-core VM, a 150 KB batch of packets costs ~50 µs of CPU on
each side of a ZeroMQ IPC hop (IO-thread hand-offs, the kernel copying
it into and out of a Unix socket), about 1 µs per packet per hop: with
two hops per packet, 15 % of everything the node spends on a packet.
So the bytes of a batch go through a ring in shared memory, and the
ZeroMQ message only names where they are (generation, start, length).

One writer, one reader, records in FIFO order (the order ZeroMQ delivers
their descriptors). The writer owns the file and the head; the reader
owns the ``tail`` word in the file's header and advances it past each
record once it has used or copied it. A record never wraps: if it does
not fit before the end, the writer starts it at offset 0 (the tail jumps
the gap, as positions are counted monotonically).

Restarts: the writer makes a new file (new random generation) on start
and whenever the ring has been full without the tail moving for
``STALL_RESET`` seconds (the reader was restarted and the descriptors of
the old records were lost with it); it replaces the old file by rename,
so the reader's mapping of the old one stays valid for the descriptors
still in flight. The reader maps a file when a descriptor names a
generation it has not mapped yet. Nothing here trusts a descriptor:
out-of-range ones are refused.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import mmap
import os
import struct
import time
from typing import TYPE_CHECKING

from .native import fields

MAGIC = b"MYCRING1"
HEADER = struct.Struct("=8sQQ")  # magic, generation, data size
TAIL_AT = 64  # the reader's word, on its own cache line
DATA_AT = 4096
DEFAULT_SIZE = 8 * 1024 * 1024
STALL_RESET = 1.0  # seconds full with no progress before starting a new generation
SHM_DIR = "/dev/shm"


def ring_path(run_dir: str, name: str) -> str:
    """/dev/shm (memory, never written back to a disk) named after the run
    directory, so nodes side by side do not collide; the run directory
    itself where there is no /dev/shm."""
    if os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK | os.X_OK):
        tag = hashlib.sha256(os.path.realpath(run_dir).encode()).hexdigest()[:16]
        return os.path.join(SHM_DIR, f"mycelium-{tag}-{name}.ring")
    return os.path.join(run_dir, f"{name}.ring")


def remove_rings(run_dir: str) -> None:
    """Every ring file of this run directory (a node stopping or starting)."""
    for path in glob.glob(ring_path(run_dir, "*")) + glob.glob(ring_path(run_dir, "*") + ".*.tmp"):
        with contextlib.suppress(OSError):
            os.unlink(path)


def valid_name(name: object) -> bool:
    return isinstance(name, str) and 0 < len(name) <= 64 and all(c.isalnum() or c in "-_" for c in name)


if TYPE_CHECKING:
    _RingFields = object
else:
    _RingFields = fields("RingFields")  # size, head, tail, generation and map in slots for the kernel


class RingWriter(_RingFields):
    def __init__(self, path: str, size: int = DEFAULT_SIZE) -> None:
        self.path = path
        self.size = size
        self.generation = 0
        self.head = 0
        self.tail = 0
        self.full_since = 0.0
        self.drops = 0  # batches refused for want of room
        self._undo = 0
        self._map: mmap.mmap | None = None
        self.map: mmap.mmap | None = None  # the mapped file (header, tail word, data), for the C kernel
        self._view: memoryview | None = None
        self._tail_word: memoryview | None = None
        self.renew()

    @property
    def max_record(self) -> int:
        """The largest record ``put`` takes: half the ring, so one always fits once the reader catches up."""
        return self.size // 2

    def renew(self) -> None:
        """A fresh file and generation; the old file stays mapped by whoever has it."""
        self.close(unlink=False)
        self.generation = int.from_bytes(os.urandom(8), "little") or 1
        tmp = f"{self.path}.{self.generation:x}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, DATA_AT + self.size)
            self._map = mmap.mmap(fd, DATA_AT + self.size)
        finally:
            os.close(fd)
        self.map = self._map
        HEADER.pack_into(self._map, 0, MAGIC, self.generation, self.size)
        self._view = memoryview(self._map)
        self._tail_word = self._view[TAIL_AT : TAIL_AT + 8].cast("Q")
        self.head = self.tail = 0
        self.full_since = 0.0
        os.rename(tmp, self.path)

    def _read_tail(self) -> int:
        assert self._tail_word is not None
        tail = self._tail_word[0]
        if self.tail <= tail <= self.head:  # anything else is a torn or bogus value: keep what we had
            self.tail = tail
        return self.tail

    def room(self, n: int) -> int | None:
        """Where a record of ``n`` bytes would start, or None while the
        reader has not made room for it (reads the reader's tail word)."""
        pos = self.head % self.size
        start = self.head if pos + n <= self.size else self.head + (self.size - pos)
        if start + n - self._read_tail() > self.size:
            return None
        return start

    def write_at(self, start: int, data: bytes | bytearray | memoryview) -> None:
        """Copy a record's bytes in at ``start`` (from ``room``); ``advance`` makes it the head."""
        at = DATA_AT + start % self.size
        assert self._view is not None
        self._view[at : at + len(data)] = data

    def put(self, data: bytes | bytearray | memoryview, now: float | None = None) -> tuple[int, int, int] | None:
        """Copy ``data`` in; (generation, start, length) for the descriptor,
        or None when there is no room (the caller drops and counts)."""
        n = len(data)
        if n == 0 or n > self.max_record:
            return None
        start = self.room(n)
        if start is None:
            if now is None:
                now = time.monotonic()
            if not self.full_since:
                self.full_since = now
            elif now - self.full_since > STALL_RESET:
                self.renew()  # the reader lost track (restarted): start over
                return self.put(data, now)
            self.drops += 1
            return None
        self.write_at(start, data)
        self.advance(start, n)
        return self.generation, start, n

    def advance(self, start: int, n: int) -> None:
        """A record of ``n`` bytes is in at ``start``: it becomes the head (``unput`` can take it back)."""
        self.full_since = 0.0
        self._undo = self.head
        self.head = start + n

    def unput(self, desc: tuple[int, int, int]) -> None:
        """Take back the record ``put`` just returned (its descriptor could
        not be sent: nobody will read it)."""
        generation, start, n = desc
        if generation == self.generation and self.head == start + n:
            self.head = self._undo

    def close(self, unlink: bool = True) -> None:
        if self._tail_word is not None:
            self._tail_word.release()
        if self._view is not None:
            self._view.release()
        if self._map is not None:
            self._map.close()
        self._map = self._view = self._tail_word = self.map = None
        if unlink:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


class RingReader(_RingFields):
    def __init__(self, path: str) -> None:
        self.path = path
        self.generation = 0
        self.size = 0
        self.map: mmap.mmap | None = None
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._tail_word: memoryview | None = None

    def _open(self, generation: int) -> bool:
        self.close()
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return False
        try:
            length = os.fstat(fd).st_size
            if length <= DATA_AT:
                return False
            m = mmap.mmap(fd, length)
        except OSError:
            return False
        finally:
            os.close(fd)
        magic, gen, size = HEADER.unpack_from(m, 0)
        if magic != MAGIC or gen != generation or size != length - DATA_AT:
            m.close()
            return False
        self._map, self.generation, self.size = m, gen, size
        self.map = m  # for the C kernel's drain_ring
        self._view = memoryview(m)
        self._tail_word = self._view[TAIL_AT : TAIL_AT + 8].cast("Q")
        return True

    def get(self, generation: int, start: int, length: int) -> memoryview | None:
        """The record a descriptor names (valid until ``release``), or None
        if it names no record we can reach (the caller counts a drop)."""
        if generation != self.generation and not self._open(generation):
            return None
        pos = start % self.size if self.size else 0  # generation 0 matches an unmapped reader
        if length <= 0 or start < 0 or pos + length > self.size:
            return None
        assert self._view is not None
        return self._view[DATA_AT + pos : DATA_AT + pos + length]

    def release(self, generation: int, end: int) -> None:
        """Everything up to ``end`` (a record's start + length) is done with."""
        if generation == self.generation and self._tail_word is not None and end > self._tail_word[0]:
            self._tail_word[0] = end

    def close(self) -> None:
        if self._tail_word is not None:
            self._tail_word.release()
        if self._view is not None:
            self._view.release()
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()
        self._map = self._view = self._tail_word = self.map = None
        self.generation = 0
