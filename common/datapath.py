"""The data path between tund and peerd: batches of packets in a
shared-memory ring (shmring.py), each announced by a small record on a
Unix SOCK_SEQPACKET connection to the consumer.

Why not a ZeroMQ message per batch: on a 2-core VM a ZeroMQ message
between two mostly idle processes costs ~64 µs of CPU (two IO threads
woken on top of the receiver, three context switches), a SEQPACKET
record ~30 µs (the kernel wakes the receiver directly). At ~7,000
batches a second on the two hops that is a tenth of the machine. Control
traffic stays on ZeroMQ.

Records are bounded by the connection's socket buffer: when it is full
(the consumer is not keeping up) or the consumer is not there, the batch
is dropped and counted, never queued (drop-newest, as for data on the
bus). SEQPACKET keeps record boundaries and, unlike an unconnected
datagram socket, is not limited to net.unix.max_dgram_qlen (10 by
default) records in flight. Either side may restart: the producer
reconnects (at most every RECONNECT seconds), the consumer accepts.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Protocol

from .native import fields
from .native import kernel as _kernel
from .shmring import RingReader, RingWriter, ring_path, valid_name

RECORD = struct.Struct("=QQIBB")  # generation, start, length, len(ring name), len(tag); then name, tag
MAX_RECORD = RECORD.size + 255 + 255
RECONNECT = 0.5  # seconds between attempts to reach an absent consumer
SOCKET_BUFFER = 1 << 20
MAX_CONNECTIONS = 16
READ_BURST = 512  # records read per readable event


def socket_path(run_dir: str, consumer: str) -> str:
    return os.path.join(run_dir, f"{consumer}.data")


def recv_records(fd: int, max_records: int, max_size: int) -> tuple[list[bytes], int]:
    """Records waiting on a non-blocking SEQPACKET ``fd``: (records, state),
    state 0 when drained or ``max_records`` are in, -1 when the producer
    went away, else the errno of a failed read (the C kernel's drain_ring
    reads the same way, without an exception to end a burst)."""
    recs: list[bytes] = []
    for _ in range(max_records):
        try:
            record = os.read(fd, max_size)
        except BlockingIOError:
            break
        except InterruptedError:
            continue
        except OSError as exc:
            return recs, exc.errno or errno.EIO
        if not record:
            return recs, -1
        recs.append(record)
    return recs, 0


if TYPE_CHECKING:
    _OutFields = object
else:
    _OutFields = fields("OutFields")  # fd, ring and name_bytes in slots for the kernel


class DataOut(_OutFields):
    """Producer side: one ring, one connection to the consumer."""

    def __init__(self, run_dir: str, name: str, consumer: str) -> None:
        self.name = name
        self.name_bytes = name.encode()
        self.ring = RingWriter(ring_path(run_dir, name))
        self.path = socket_path(run_dir, consumer)
        self.sock: socket.socket | None = None
        self.fd = -1  # the connection's descriptor, -1 while there is none
        self.next_attempt = 0.0

    def _connect(self, now: float) -> socket.socket | None:
        if now < self.next_attempt:
            return None
        self.next_attempt = now + RECONNECT
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            sock.setblocking(False)  # a full backlog fails at once instead of blocking
            sock.connect(self.path)
        except OSError:
            sock.close()
            return None
        self.sock = sock
        self.fd = sock.fileno()
        return sock

    def send(self, data: bytes | bytearray | memoryview, tag: bytes = b"") -> str | None:
        """Put a batch in the ring and announce it; None when done, else why
        it was dropped ("too_big": over half the ring, never fits; "ring_full",
        "unreachable", "backlog")."""
        ring = self.ring
        if len(data) > ring.max_record:
            return "too_big"
        sock = self.sock or self._connect(time.monotonic())
        if sock is None:
            return "unreachable"
        if _kernel is not None and data and len(tag) <= 255:
            # the same put and record in one C call (_kernel.c ring_send): the
            # hand-over ends every wake-up of tund and peerd
            status, start, ring.tail = _kernel.ring_send(
                ring.map, ring.size, ring.head, ring.tail, ring.generation, self.fd, self.name_bytes, tag, data
            )
            if status == 0:
                ring.advance(start, len(data))
                return None
            if status != 1:
                return self._failed(status == 2)
            # no room: put below counts it and starts a new ring once the reader is gone for good
        desc = ring.put(data, time.monotonic())
        if desc is None:
            return "ring_full"
        try:
            sock.send(RECORD.pack(*desc, len(self.name_bytes), len(tag)) + self.name_bytes + tag)
        except BlockingIOError:
            ring.unput(desc)
            return "backlog"
        except OSError:
            ring.unput(desc)
            return self._failed(False)
        return None

    def _failed(self, backlog: bool) -> str:
        if backlog:
            return "backlog"
        self.close_socket()  # the consumer restarted: reconnect on the next batch
        self.next_attempt = 0.0
        return "unreachable"

    def put_and_announce(self, data: bytes, tag: bytes) -> bool:
        """``send`` without its slow paths (connecting, a full ring, a failed
        record: each left to ``send``, which retries and counts): hand_over's reference."""
        ring = self.ring
        start = ring.room(len(data))
        if start is None or self.sock is None:
            return False
        ring.write_at(start, data)
        try:
            record = RECORD.pack(ring.generation, start, len(data), len(self.name_bytes), len(tag))
            self.sock.send(record + self.name_bytes + tag)
        except OSError:
            return False
        ring.advance(start, len(data))
        return True

    def close_socket(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            self.fd = -1

    def close(self) -> None:
        self.close_socket()
        self.ring.close()


def hand_over(out: dict[str, list[bytes]], rings: dict[str, DataOut], max_batch: int) -> int:
    """Each next hop's packets in ``out`` (next hop -> parts) to the ring of
    its family (the link id's first word) as one batch, each hop handed
    over taken out of ``out``; in one C call when the kernel is built (it
    copies the parts into the ring without joining them first). What
    cannot go at once (no ring or connection, over ``max_batch``, a full
    ring, a backlog) stays in ``out`` for the caller's slow path, which
    cuts, retries and counts. Returns how many hops went."""
    if _kernel is not None:
        handed: int = _kernel.hand_over(out, rings, max_batch)
        return handed
    handed = 0
    for hop, parts in list(out.items()):
        data_out = rings.get(hop.split("-", 1)[0])
        tag = hop.encode()
        if data_out is None or data_out.fd < 0 or not parts or len(tag) > 255:
            continue
        blob = b"".join(parts)
        if not blob or len(blob) > max_batch or len(blob) > data_out.ring.max_record:
            continue
        if data_out.put_and_announce(blob, tag):
            del out[hop]
            handed += 1
    return handed


class DirectWriter(Protocol):
    """What ``write_direct`` needs of a link's send queue (services/peerd/sendqueue.py)."""

    write_fd: int  # the socket while nothing waits in the queue, else -1
    tx_bytes: int

    def keep(self, rest: bytes) -> None: ...

    def fail(self, why: str) -> None: ...


def write_direct(queue: DirectWriter, batch: memoryview) -> bool:
    """A batch straight from the ring to a link's socket while its queue
    is idle (nothing may go before it): what the socket does not take the
    queue keeps (a copy) and writes in order, a failed write fails the
    queue. False when the queue is not idle (the caller's handler takes
    the batch). The C kernel's drain_ring does the same (direct_write)."""
    fd = queue.write_fd
    if fd < 0:
        return False
    try:
        sent = os.write(fd, batch)
    except BlockingIOError:
        sent = 0
    except OSError as exc:
        queue.fail(f"write error: {exc}")
        return True
    queue.tx_bytes += sent
    if sent < len(batch):
        queue.keep(bytes(batch[sent:]))
    return True


def _deliver(
    tag: bytes,
    view: memoryview,
    handle: Callable[[bytes, memoryview], object],
    direct: Mapping[bytes, DirectWriter] | None,
    min_direct: int,
) -> int:
    if direct is not None and len(view) >= min_direct:
        queue = direct.get(tag)
        if queue is not None and write_direct(queue, view):
            return 1
    handle(tag, view)
    return 0


class DataIn:
    """Consumer side: a listening socket, the producers' connections and
    a reader per ring. ``watch(fd, True/False)`` is called as descriptors
    come and go, for the caller's poller; ``receive(fd)`` when one is
    readable."""

    def __init__(
        self,
        run_dir: str,
        consumer: str,
        ring_suffix: str,
        watch: Callable[[int, bool], None],
        counters: Counter[str] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.suffix = ring_suffix
        self.watch = watch
        self.path = socket_path(run_dir, consumer)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(self.path)
        os.chmod(self.path, 0o600)
        self.listener.listen(MAX_CONNECTIONS)
        self.listener.setblocking(False)
        self.conns: dict[int, socket.socket] = {}
        self.readers: dict[str, RingReader] = {}
        self.counters: Counter[str] = Counter() if counters is None else counters  # gets "data_in_<why>"
        watch(self.listener.fileno(), True)

    def _drop(self, why: str) -> None:
        self.counters[f"data_in_{why}"] += 1

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(self.conns) >= MAX_CONNECTIONS:
                conn.close()
                self._drop("too_many_producers")
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            self.conns[conn.fileno()] = conn
            self.watch(conn.fileno(), True)

    def _forget(self, fd: int) -> None:
        conn = self.conns.pop(fd, None)
        if conn is not None:
            self.watch(fd, False)
            conn.close()

    def receive(self, fd: int) -> Iterator[tuple[bytes, memoryview]]:
        """(tag, batch) for each record waiting on ``fd``; each batch is
        valid until the loop asks for the next one (then it is released)."""
        if fd == self.listener.fileno():
            self._accept()
            return
        if fd not in self.conns:
            return
        records, state = recv_records(fd, READ_BURST, MAX_RECORD)
        yield from self._resolved(records)
        self._finish(fd, state)

    def drain(
        self,
        fd: int,
        handle: Callable[[bytes, memoryview], object],
        direct: Mapping[bytes, DirectWriter] | None = None,
        min_direct: int = 1,
    ) -> int:
        """``handle(tag, batch)`` for each record waiting on ``fd`` (the batch
        is valid only during the call): ``receive``, with the records whose
        ring is mapped already resolved and released in one C call. A batch
        of at least ``min_direct`` bytes whose tag is in ``direct`` goes to
        that writer instead while it is idle (``write_direct``: peerd's links,
        written straight from the ring). Returns how many went that way."""
        if _kernel is None or fd not in self.conns:
            taken = 0
            for tag, view in self.receive(fd):
                taken += _deliver(tag, view, handle, direct, min_direct)
            return taken
        left, state, n, went = _kernel.drain_ring(fd, self.readers, handle, READ_BURST, MAX_RECORD, direct, min_direct)
        return went + self.drain_after(fd, handle, left, state, READ_BURST - n, direct, min_direct)

    def drain_after(
        self,
        fd: int,
        handle: Callable[[bytes, memoryview], object],
        left: bytes | None,
        state: int,
        budget: int,
        direct: Mapping[bytes, DirectWriter] | None = None,
        min_direct: int = 1,
    ) -> int:
        """The rest of a burst the kernel's drain_ring began on ``fd`` (here
        and in tund's C wait): ``left``, the record that needs Python, then
        the records after it up to ``budget`` more; the connection
        forgotten when the burst found it ended."""
        assert _kernel is not None
        taken = 0
        while left is not None:
            for tag, view in self._resolved([left]):  # malformed, or a ring to map first: counted or opened
                taken += _deliver(tag, view, handle, direct, min_direct)
            if budget <= 0:
                return taken
            left, state, n, went = _kernel.drain_ring(fd, self.readers, handle, budget, MAX_RECORD, direct, min_direct)
            budget -= n
            taken += went
        self._finish(fd, state)
        return taken

    def _resolved(self, records: list[bytes]) -> Iterator[tuple[bytes, memoryview]]:
        """(tag, batch) for each record that resolves, each released when the loop asks for the next."""
        for record in records:
            item = self._resolve(record)
            if item is None:
                continue
            reader, generation, end, tag, view = item
            try:
                yield tag, view
            finally:
                with contextlib.suppress(BufferError):
                    view.release()
                reader.release(generation, end)

    def _finish(self, fd: int, state: int) -> None:
        """After a burst: a connection that ended or failed is forgotten."""
        if state:
            if state not in (-1, errno.ECONNRESET, errno.EPIPE):
                self._drop("read_error")
            self._forget(fd)

    def _resolve(self, record: bytes) -> tuple[RingReader, int, int, bytes, memoryview] | None:
        if len(record) < RECORD.size:
            self._drop("malformed")
            return None
        generation, start, length, name_len, tag_len = RECORD.unpack_from(record)
        if len(record) != RECORD.size + name_len + tag_len:
            self._drop("malformed")
            return None
        try:
            name = record[RECORD.size : RECORD.size + name_len].decode()
        except UnicodeDecodeError:
            self._drop("malformed")
            return None
        reader = self.readers.get(name)
        if reader is None:
            if not (valid_name(name) and name.endswith(self.suffix)) or len(self.readers) >= MAX_CONNECTIONS:
                self._drop("unknown_ring")
                return None
            reader = self.readers[name] = RingReader(ring_path(self.run_dir, name))
        view = reader.get(generation, start, length)
        if view is None:
            self._drop("unreachable_record")
            return None
        return reader, generation, start + length, record[RECORD.size + name_len :], view

    def close(self) -> None:
        for fd in list(self.conns):
            self._forget(fd)
        self.watch(self.listener.fileno(), False)
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        for reader in self.readers.values():
            reader.close()
