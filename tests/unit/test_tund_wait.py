"""tund's wait in C (common/_kernel.c tund_wait) against what TundWorker.run
does in Python: the wake-ups it handles itself (a TUN read sealed and
handed to peerd's ring; a ring record from peerd opened and written to the
TUN) give the same bytes the Python steps give, and every other wake-up
comes back to the caller unhandled. A SOCK_SEQPACKET pair stands in for the
TUN (one packet per read and write, as a TUN queue)."""

from __future__ import annotations

import contextlib
import os
import select
import selectors
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common import native
from common.datapath import RECORD, DataIn, DataOut, socket_path
from common.fib import FibReplica
from common.shmring import DATA_AT
from services.tund.tun import VNET_HDR_SIZE

from .test_native_kernel import ME, NOW, PEER, plane, tcp_to

K: Any = native.kernel
pytestmark = pytest.mark.skipif(K is None, reason=f"native kernel not in use: {native.REASON}")
MAX_BATCH, READ_BATCH, READ_BUDGET, READ_SIZE = 1 << 20, 256, 384 * 1024, 65536 + 128


class Tund:
    """A DataPlane with its rings, a stand-in TUN and an epoll set, as TundWorker has them."""

    def __init__(self, run: str) -> None:
        self.dp = plane(ME, True)
        self.dp.nonce_bytes = os.urandom  # the default scheme: the kernel draws them itself
        self.peerd = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # peerd-p's data socket
        self.peerd.bind(socket_path(run, "peerd-p"))
        self.peerd.listen(4)
        self.out = DataOut(run, "tund-to-peerd-p", "peerd-p")
        assert self.out.send(b"hello", b"") is None
        self.peerd_conn = self.peerd.accept()[0]
        self.peerd_conn.recv(1024)
        self.tun, self.host = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.tun.setblocking(False)
        self.ep = select.epoll()
        self.ep.register(self.tun.fileno(), select.EPOLLIN)
        self.data_in = DataIn(run, "tund", "-to-tund", self.watch)

    def watch(self, fd: int, add: bool) -> None:
        if add:
            self.ep.register(fd, select.EPOLLIN)
        else:
            self.ep.unregister(fd)

    def wait(self, timeout: float = 0.2) -> tuple[list[int], bool, int]:
        fd = self.tun.fileno()
        din = self.data_in
        return K.tund_wait(  # type: ignore[no-any-return]
            self.ep.fileno(), timeout, fd, fd, din.conns, din.readers, din, self.dp, {"p": self.out},
            MAX_BATCH, READ_BATCH, READ_BUDGET, READ_SIZE,
        )  # fmt: skip

    def handed(self) -> list[tuple[bytes, bytes]]:
        """(tag, batch) of each record tund handed peerd-p."""
        got = []
        self.peerd_conn.setblocking(False)
        while True:
            try:
                rec = self.peerd_conn.recv(1024)
            except BlockingIOError:
                return got
            _gen, start, length, name_len, _tag_len = RECORD.unpack_from(rec)
            assert self.out.ring.map is not None
            at = DATA_AT + start % self.out.ring.size
            got.append((rec[RECORD.size + name_len :], bytes(self.out.ring.map[at : at + length])))

    def close(self) -> None:
        for thing in (self.data_in, self.out, self.peerd_conn, self.peerd, self.tun, self.host, self.ep):
            thing.close()


@pytest.fixture
def tund(tmp_path: Path) -> Iterator[Tund]:
    t = Tund(str(tmp_path))
    yield t
    t.close()


def test_a_tun_read_is_sealed_and_handed_over_then_the_wait_goes_on(tund: Tund) -> None:
    pkt = bytes(VNET_HDR_SIZE) + tcp_to(PEER, b"ping" * 20)
    tund.host.send(pkt)
    before = K.tund_handled()
    assert tund.wait(0.2) == ([], False, 0)  # handled, then waited out the timeout
    assert K.tund_handled() == before + 1
    (tag, batch), = tund.handed()  # fmt: skip
    assert tag == b"p"  # the next hop, for peerd
    # the Python steps give the same frame (the nonce is the only random part)
    ref = plane(ME, False)
    ref.nonce_bytes = lambda n: batch[-12:] * (n // 12)
    ref.from_tun([pkt], NOW)
    assert ref.take_out() == {"p": batch}
    assert tund.dp.counters["tun_rx"] == 1 and tund.dp.counters["tx_sealed"] == 1


def test_a_ring_record_is_opened_and_written_to_the_tun(tund: Tund, tmp_path: Path) -> None:
    sender = plane(PEER, True)  # PEER's tund seals for us; its batch comes over peerd's ring
    back = FibReplica()
    back.load_snapshot({"epoch": 1, "seq": 0, "entries": [[ME.address.packed[:8] + bytes(8), 64, "m", ME.public_key]]})
    sender.fib = back
    ip = tcp_to(PEER, b"x" * 64)
    ip = ip[:8] + PEER.address.packed + ME.address.packed + ip[40:]  # from PEER to us
    sender.from_tun([bytes(VNET_HDR_SIZE) + ip], NOW)
    frames = sender.take_out()["m"]
    producer = DataOut(str(tmp_path), "peerd-p-to-tund", "tund")
    try:
        assert producer.send(frames, b"") is None  # connected and announced; not accepted yet
        ready, dirty, err = tund.wait(1.0)
        assert ready == [tund.data_in.listener.fileno()] and not dirty and not err  # the accept is Python's
        assert list(tund.data_in.receive(ready[0])) == [] and len(tund.data_in.conns) == 1
        before = K.tund_handled()
        assert tund.wait(0.2) == ([], False, 0)
        assert K.tund_handled() == before + 1
        written = tund.host.recv(70000, socket.MSG_DONTWAIT)
        assert written[:VNET_HDR_SIZE] == bytes(VNET_HDR_SIZE)
        assert written[VNET_HDR_SIZE:][:7] + written[VNET_HDR_SIZE + 8 :] == ip[:7] + ip[8:]  # as sent
        assert tund.dp.counters["rx_opened"] == 1 and tund.dp.counters["tun_tx"] == 1
        producer.close()  # the producer goes away: the connection is forgotten (DataIn.drain_after)
        assert tund.wait(0.2) == ([], False, 0) and tund.data_in.conns == {}
    finally:
        producer.close()


def test_other_descriptors_come_back_unhandled(tund: Tund) -> None:
    a, b = socket.socketpair()
    try:
        tund.ep.register(a.fileno(), select.EPOLLIN)
        b.send(b"!")
        tund.host.send(bytes(VNET_HDR_SIZE) + tcp_to(PEER, b"q"))
        ready, dirty, err = tund.wait(1.0)
        assert sorted(ready) == sorted([a.fileno(), tund.tun.fileno()]) and not dirty and not err
        assert tund.handed() == [] and tund.tun.recv(70000)  # the TUN packet is still there to read
    finally:
        a.close()
        b.close()


def test_a_packet_without_a_route_leaves_work_for_the_callers_flush(tund: Tund) -> None:
    stranger = bytes(VNET_HDR_SIZE) + struct.pack("!IHBB", 0x60000000, 8, 17, 64) + ME.address.packed
    stranger += bytes.fromhex("04aa") + bytes(14) + bytes(8)  # an overlay /64 nobody routes
    tund.host.send(stranger)
    assert tund.wait(1.0) == ([], True, 0)  # queued for a route: the need goes to the router from flush
    assert tund.dp.need and tund.dp.counters["tx_queued_for_route"] == 1


def test_a_timeout_returns_nothing(tund: Tund) -> None:
    assert tund.wait(0.0) == ([], False, 0)


def test_steady_traffic_still_returns_at_the_timeout(tund: Tund) -> None:
    """The caller's timers (stats, the 1 s tick) must run under load too: a
    wake-up past the deadline returns even though more is waiting."""
    pkt = bytes(VNET_HDR_SIZE) + tcp_to(PEER, b"s" * 20)
    sent = 0
    with contextlib.suppress(BlockingIOError):
        tund.host.setblocking(False)
        for _ in range(READ_BATCH * 3):  # more than one wake-up's burst
            tund.host.send(pkt)
            sent += 1
    assert sent > READ_BATCH
    before = K.tund_handled()
    assert tund.wait(0.0) == ([], False, 0)
    assert K.tund_handled() == before + 1  # one burst, then back to the caller
    assert tund.dp.counters["tun_rx"] == READ_BATCH and tund.tun.recv(70000)  # the rest still waits


# --- peerd's wait: data_wait ---------------------------------------------------------


class SendQueueStub:
    """What a direct write needs of a link's SendQueue (the kernel's QueueFields or attributes)."""

    def __init__(self, fd: int) -> None:
        self.write_fd = fd
        self.tx_bytes = 0

    def keep(self, rest: bytes) -> None:
        raise AssertionError("the socket took every byte")

    def fail(self, why: str) -> None:
        raise AssertionError(why)


def test_peerds_wait_writes_ring_batches_to_idle_links_and_returns_the_rest(tmp_path: Path) -> None:
    from collections import Counter, deque

    run = str(tmp_path)
    ep = select.epoll()
    din = DataIn(
        run, "peerd-p", "-to-peerd-p", lambda fd, add: ep.register(fd, select.EPOLLIN) if add else ep.unregister(fd)
    )
    out = DataOut(run, "tund-to-peerd-p", "peerd-p")
    link, far = socket.socketpair()
    link.setblocking(False)
    handled: list[bytes] = []
    counters: Counter[str] = Counter()
    direct = {b"l": SendQueueStub(link.fileno())}
    ready_queue: deque[object] = deque()

    first: dict[int, tuple[object, Any]] = {}
    keys: dict[int, selectors.SelectorKey] = {}
    counts = {"ran_first": 0}
    failed: list[tuple[object, Exception]] = []

    def wait(timeout: float | None) -> list[tuple[int, int]]:
        args = (din.conns, din.readers, lambda t, v: handled.append(bytes(v)), direct, 1, din, counters)
        tables = (first, keys, counts, lambda reader, exc: failed.append((reader, exc)))
        return K.data_wait(ep.fileno(), timeout, *args, ready_queue, *tables)  # type: ignore[no-any-return]

    try:
        assert out.send(b"a" * 100, b"l") is None
        assert wait(1.0) == [(din.listener.fileno(), select.EPOLLIN)]  # the accept is Python's
        assert list(din.receive(din.listener.fileno())) == []
        before = K.data_handled()
        assert wait(0.2) == []  # the record written to the link, then waited out
        assert far.recv(1000) == b"a" * 100 and counters["data_out_batches"] == 1
        assert K.data_handled() == before + 1
        assert out.send(b"b" * 50, b"z") is None  # no idle link of that name: the handler takes it
        ready_queue.append("a callback")  # asyncio has work: back at once after the wake-up
        assert wait(None) == [] and handled == [b"b" * 50]
        ready_queue.clear()
        other, other_far = socket.socketpair()
        ep.register(other.fileno(), select.EPOLLIN)
        other_far.send(b"!")
        assert wait(None) == [(other.fileno(), select.EPOLLIN)]  # not a ring, no data-first reader
        # a data-first reader (a link's socket) is called from the wait while asyncio holds its handle
        read: list[bytes] = []
        handle = object()
        first[other.fileno()] = (handle, lambda: read.append(other.recv(10)))
        keys[other.fileno()] = selectors.SelectorKey(other, other.fileno(), selectors.EVENT_READ, (handle, None))
        assert wait(0.2) == [] and read == [b"!"] and counts["ran_first"] == 1
        keys[other.fileno()] = selectors.SelectorKey(other, other.fileno(), selectors.EVENT_READ, (object(), None))
        other_far.send(b"?")
        assert wait(None) == [(other.fileno(), select.EPOLLIN)]  # asyncio has another handle: its dispatch
        boom = RuntimeError("reader failed")

        def fails() -> None:
            other.recv(10)
            raise boom

        first[other.fileno()] = (handle, fails)
        keys[other.fileno()] = selectors.SelectorKey(other, other.fileno(), selectors.EVENT_READ, (handle, None))
        assert wait(0.2) == [] and failed == [(fails, boom)]  # the loop's exception handler has it
        # a reader that leaves its socket readable: the wait still ends at its timeout (asyncio's timers)
        first[other.fileno()] = (handle, lambda: None)
        other_far.send(b"never read")
        ran = counts["ran_first"]
        t = time.monotonic()
        assert wait(0.05) == [] and time.monotonic() - t < 2.0 and counts["ran_first"] > ran + 1
        other.close()
        other_far.close()
    finally:
        din.close()
        out.close()
        link.close()
        far.close()
        ep.close()
