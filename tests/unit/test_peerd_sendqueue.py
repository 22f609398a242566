"""A link's bounded send queue and write loop (services/peerd/sendqueue.py),
driven by a fake socket that accepts a set number of bytes per write."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.peerd.sendqueue import WRITE_BATCH_BUFFERS, Buffer, SendQueue


class FakeSocket:
    """writev into a byte string; ``room`` bytes accepted until drained."""

    def __init__(self, room: int = 1 << 30) -> None:
        self.room = room
        self.out = bytearray()
        self.calls: list[int] = []  # buffers per writev
        self.error: OSError | None = None
        self.writable = asyncio.Event()

    def writev(self, bufs: Sequence[Buffer]) -> int:
        if self.error is not None:
            raise self.error
        self.calls.append(len(bufs))
        if self.room == 0:
            raise BlockingIOError
        n = 0
        for b in bufs:
            take = min(len(b), self.room - n)
            self.out += bytes(b[:take])
            n += take
            if n == self.room:
                break
        self.room -= n
        return n

    def drain(self, room: int) -> None:
        self.room += room
        self.writable.set()

    async def wait_writable(self) -> None:
        await self.writable.wait()
        self.writable.clear()


def test_idle_queue_writes_at_once_and_keeps_nothing() -> None:
    sock = FakeSocket()
    q = SendQueue(sock.writev, Counter())
    assert q.push_data(b"abc") and q.push_data(b"def")
    assert bytes(sock.out) == b"abcdef" and q.idle and q.tx_bytes == 6


def test_borrowed_remainder_is_copied_before_the_slot_is_reused() -> None:
    sock = FakeSocket(room=3)
    q = SendQueue(sock.writev, Counter())
    slot = bytearray(b"0123456789")  # stands for a shared-memory ring slot
    assert q.push_data(memoryview(slot), borrowed=True)
    slot[:] = b"XXXXXXXXXX"  # the ring reuses the slot once the call returned
    later = bytearray(b"abc")
    assert q.push_data(memoryview(later), borrowed=True)  # queued behind the remainder: copied too
    later[:] = b"ZZZ"
    sock.drain(100)
    bufs, _ = q.take()
    assert q.written(bufs, sock.writev(bufs))
    assert bytes(sock.out) == b"0123456789abc"


def test_owned_frames_are_queued_without_copy() -> None:
    sock = FakeSocket(room=0)
    q = SendQueue(sock.writev, Counter())
    frame = bytearray(b"hello")
    q.push_data(frame)  # partial (nothing) written: the rest is a view, not a copy
    assert q.pending and q.pending[0].obj is frame


def test_data_queue_is_bounded_in_bytes_and_counts_packets() -> None:
    counters: Counter[str] = Counter()
    sock = FakeSocket(room=0)
    q = SendQueue(sock.writev, counters, max_data_bytes=1000)
    q.push_data(b"x" * 10)  # goes to pending (the write would block)
    assert q.push_data(b"y" * 600, packets=3)
    assert not q.push_data(b"z" * 600, packets=4)
    assert counters["data_queue_full"] == 4 and q.data_bytes == 600


def test_control_queue_is_capped_and_goes_first() -> None:
    counters: Counter[str] = Counter()
    sock = FakeSocket(room=0)
    q = SendQueue(sock.writev, counters, max_control=2)
    q.push_data(b"D1")  # remainder (pending) keeps its place: first
    q.push_data(b"D2")
    q.push_control([b"C1", b"C2", b"C3"])
    assert counters["control_queue_full"] == 1
    sock.drain(100)
    bufs, _ = q.take()
    q.written(bufs, sock.writev(bufs))
    assert bytes(sock.out) == b"D1C1C2D2"


def test_take_caps_buffers_per_writev() -> None:
    sock = FakeSocket(room=0)
    q = SendQueue(sock.writev, Counter())
    for i in range(WRITE_BATCH_BUFFERS + 10):
        q.push_data(bytes([i]) * 4)
    bufs, size = q.take()
    assert len(bufs) == WRITE_BATCH_BUFFERS and size == 4 * WRITE_BATCH_BUFFERS


def test_partial_writev_keeps_the_rest_in_order() -> None:
    q = SendQueue(FakeSocket().writev, Counter())
    bufs: list[Buffer] = [b"aaaa", b"bbbb", b"cccc"]
    assert not q.written(bufs, 6)
    assert [bytes(p) for p in q.pending] == [b"bb", b"cccc"]


def test_write_loop_waits_for_room_and_delivers_everything_in_order() -> None:
    async def scenario() -> bytes:
        sock = FakeSocket(room=5)
        q = SendQueue(sock.writev, Counter())
        task = asyncio.create_task(q.run(sock.wait_writable))
        q.push_data(b"first-")
        for i in range(100):
            q.push_data(f"{i:03d}".encode())
        q.push_control([b"CTL"])
        for _ in range(200):
            await asyncio.sleep(0)
            sock.drain(7)
            if not (q.pending or q.data or q.control) and not q.blocked:
                break
        q.close()
        await asyncio.wait_for(task, 1)
        return bytes(sock.out)

    out = asyncio.run(scenario())
    assert out.startswith(b"first-")
    assert b"CTL" in out
    assert out.replace(b"CTL", b"") == b"first-" + b"".join(f"{i:03d}".encode() for i in range(100))


def test_write_error_ends_the_loop_with_a_reason() -> None:
    async def scenario() -> SendQueue:
        sock = FakeSocket(room=0)
        q = SendQueue(sock.writev, Counter())
        task = asyncio.create_task(q.run(sock.wait_writable))
        q.push_data(b"abc")
        sock.error = BrokenPipeError(32, "Broken pipe")
        sock.drain(10)
        await asyncio.wait_for(task, 1)
        return q

    q = asyncio.run(scenario())
    assert q.closed and q.error is not None and "Broken pipe" in q.error


@pytest.mark.parametrize("borrowed", [False, True])
def test_direct_write_error_marks_the_queue_failed(borrowed: bool) -> None:
    sock = FakeSocket()
    sock.error = ConnectionResetError(104, "reset")
    q = SendQueue(sock.writev, Counter())
    assert q.push_data(b"abc", borrowed=borrowed)
    assert q.closed and q.error is not None


ops = st.lists(
    st.one_of(
        st.tuples(st.just("data"), st.integers(1, 300)),
        st.tuples(st.just("control"), st.integers(1, 50)),
        st.tuples(st.just("keep"), st.integers(1, 300)),  # a direct writer's unwritten rest
        st.tuples(st.just("room"), st.integers(0, 500)),  # the peer reads: the socket takes more
        st.tuples(st.just("run"), st.just(0)),  # the write loop gets the CPU
    ),
    max_size=40,
)


@settings(max_examples=80, deadline=None)
@given(steps=ops, close_at=st.integers(0, 60))
def test_write_fd_is_the_socket_exactly_while_the_queue_is_idle(steps: list[tuple[str, int]], close_at: int) -> None:
    """A direct writer (common/datapath.py write_direct) writes whenever
    write_fd >= 0: if it ever did so with something queued, the stream
    would be out of order or cut inside a packet."""

    async def scenario() -> None:
        sock = FakeSocket(room=0)
        q = SendQueue(sock.writev, Counter(), direct_fd=7)
        loop = asyncio.get_running_loop().create_task(q.run(sock.wait_writable))
        sent = bytearray()
        for i, (kind, n) in enumerate(steps):
            if i == close_at:
                q.close()
            if kind == "data":
                part = bytes([i % 251]) * n
                if q.push_data(part) and not q.closed:
                    sent += part
            elif kind == "control":
                part = bytes([200 + i % 50]) * n
                q.push_control([part])
                if not q.closed and len(q.control) and q.control[-1] is part:
                    sent += part
            elif kind == "keep":
                if q.write_fd >= 0:  # only ever called right after a direct write while idle
                    part = bytes([i % 7]) * n
                    q.keep(part)
                    sent += part
            elif kind == "room":
                sock.drain(n)
            else:
                for _ in range(3):
                    await asyncio.sleep(0)
            assert (q.write_fd == 7) == (q.idle and not q.closed), (i, kind)
        q.close()
        sock.writable.set()  # a link's close ends a wait for room the same way
        await asyncio.wait_for(loop, 5)
        assert q.write_fd == -1
        # what went out is a prefix of what was queued, in order (control may go first: not checked here)
        assert len(sock.out) <= len(sent)

    asyncio.run(scenario())
