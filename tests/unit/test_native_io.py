"""The IO around the kernel in C (common/_kernel.c read_tun, write_tun,
ring_send, hand_over, drain_ring) against their Python references
(services/tund/tun.py read_packets / write_packets, common/datapath.py
DataOut.send, hand_over, DataIn.receive): the same input must give the
same packets, the same ring bytes and records, the same refusals.

Also run under AddressSanitizer by ``make asan``."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import datapath, native, shmring
from common.datapath import RECORD, DataIn, DataOut, socket_path
from common.shmring import DATA_AT, TAIL_AT
from services.tund.tun import read_packets, write_packets

K: Any = native.kernel
pytestmark = pytest.mark.skipif(K is None, reason=f"native kernel not in use: {native.REASON}")
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def loaded(packets: list[bytes]) -> tuple[socket.socket, socket.socket]:
    """A datagram pair with ``packets`` waiting: one read, one packet, as on a TUN."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    b.setblocking(False)
    for p in packets:
        a.send(p)
    return a, b


@SETTINGS
@given(
    sizes=st.lists(st.integers(1, 3000), max_size=40),
    max_packets=st.integers(0, 50),
    budget=st.integers(1, 40000),
    size=st.integers(1, 4000),
)
def test_read_tun_reads_what_the_reference_reads(sizes: list[int], max_packets: int, budget: int, size: int) -> None:
    packets = [os.urandom(n) for n in sizes]
    results = []
    for read in (read_packets, K.read_tun):
        a, b = loaded(packets)
        try:
            got, err = read(b.fileno(), max_packets, budget, size)
            results.append((got, err, len(read_packets(b.fileno(), 1000, 1 << 30, 4000)[0])))
        finally:
            a.close()
            b.close()
    assert results[0] == results[1]
    got, err, left = results[1]
    assert err == 0 and all(isinstance(p, bytes) for p in got)
    assert len(got) + left == len(packets)  # nothing lost, nothing read twice


def test_read_tun_reports_a_failed_read_with_what_it_had() -> None:
    r, w = os.pipe()
    os.close(w)
    os.close(r)
    assert read_packets(r, 4, 1000, 100) == K.read_tun(r, 4, 1000, 100) == ([], errno.EBADF)
    a, b = loaded([])
    assert read_packets(b.fileno(), 4, 1000, 100) == K.read_tun(b.fileno(), 4, 1000, 100) == ([], 0)
    a.close()  # the peer gone: a datagram socket then reads as empty, which ends the burst
    assert read_packets(b.fileno(), 4, 1000, 100) == K.read_tun(b.fileno(), 4, 1000, 100) == ([], 0)
    b.close()


def test_read_tun_refuses_bad_arguments() -> None:
    for args in ((-1, 1, 1, 1), (0, -1, 1, 1), (0, 1, 1, 0), (0, 1, 1, 1 << 21)):
        with pytest.raises(ValueError):
            K.read_tun(*args)
    with pytest.raises(TypeError):
        K.read_tun(0, 1, 1)


# --- ring_send ----------------------------------------------------------------------------


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A consumer's listening socket that never reads: records pile up as sent."""
    run = str(tmp_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(socket_path(run, "peerd-tcp"))
    sock.listen(4)
    yield run, sock
    sock.close()


def records(conn: socket.socket) -> list[tuple[Any, ...]]:
    got = []
    conn.setblocking(False)
    while True:
        try:
            rec = conn.recv(1024)
        except BlockingIOError:
            return got
        got.append((*RECORD.unpack_from(rec)[1:], rec[RECORD.size :]))  # the generation differs by design


ops = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(1, 700_000), st.binary(max_size=8)),
        st.tuples(st.just("release"), st.floats(0, 1), st.just(b"")),
        st.tuples(st.just("bogus_tail"), st.integers(0, 1 << 40), st.just(b"")),
    ),
    max_size=40,
)


@SETTINGS
@given(steps=ops)
def test_ring_send_writes_what_the_reference_writes(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, Any, bytes]]
) -> None:
    run = str(tmp_path_factory.mktemp("run"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(socket_path(run, "peerd-tcp"))
    listener.listen(4)
    outs, conns, results = [], [], []
    saved, stall = datapath._kernel, shmring.STALL_RESET
    shmring.STALL_RESET = 1e9  # a slow example must not start a new ring in one run only
    try:
        for kernel in (None, K):
            datapath._kernel = kernel
            out = DataOut(run, "tund-to-peerd-tcp", "peerd-tcp")  # the same name: the records compare
            assert out.send(b"hello", b"t") is None
            conn, _ = listener.accept()
            said = []
            for kind, value, tag in steps:
                tail_word = out.ring.map
                if kind == "send":
                    said.append(out.send(bytes([len(said) % 251]) * value, tag))
                elif kind == "release":  # the reader is done with part of what was written
                    seen = out.ring.tail + int((out.ring.head - out.ring.tail) * value)
                    tail_word[TAIL_AT : TAIL_AT + 8] = seen.to_bytes(8, "little")
                else:  # a torn or forged tail word: ignored by both
                    tail_word[TAIL_AT : TAIL_AT + 8] = value.to_bytes(8, "little")
            ring = out.ring
            data = bytes(ring.map[DATA_AT:])
            results.append((said, ring.head, ring.tail, ring.drops, records(conn), data))
            outs.append(out)
            conns.append(conn)
    finally:
        datapath._kernel, shmring.STALL_RESET = saved, stall
        for out in outs:
            out.close()
        for conn in conns:
            conn.close()
        listener.close()
    assert results[0] == results[1]


def test_ring_send_reports_a_backlog_and_a_vanished_consumer(listener: tuple[str, socket.socket]) -> None:
    run, sock = listener
    results = {}
    saved = datapath._kernel
    try:
        for which, kernel in (("python", None), ("native", K)):
            datapath._kernel = kernel
            out = DataOut(run, f"tund-{which}-to-peerd-tcp", "peerd-tcp")
            assert out.send(b"x", b"") is None
            conn, _ = sock.accept()
            said = None
            for _ in range(200_000):  # the consumer never reads: its socket buffer fills
                said = out.send(b"y" * 16, b"")
                if said is not None:
                    break
            head = out.ring.head
            assert said == "backlog" and out.ring.head == head
            conn.close()
            gone = out.send(b"z", b"")
            assert gone == "unreachable" and out.sock is None and out.ring.head == head
            results[which] = (said, gone)
            out.close()
    finally:
        datapath._kernel = saved
    assert results["python"] == results["native"]


def test_ring_send_refuses_bad_arguments(listener: tuple[str, socket.socket]) -> None:
    run, _ = listener
    out = DataOut(run, "tund-to-peerd-tcp", "peerd-tcp")
    ring = out.ring
    good = [ring.map, ring.size, 0, 0, 1, 0, b"n", b"t", b"data"]
    bad = {
        0: bytearray(100),  # a map smaller than the ring it claims
        1: 1 << 40,
        2: 0,
        6: b"n" * 256,
        7: b"t" * 256,
        8: b"d" * (ring.size // 2 + 1),
    }
    for at, value in bad.items():
        args = list(good)
        args[at] = value
        if at == 2:
            args[3] = 5  # a tail past the head
        with pytest.raises(ValueError):
            K.ring_send(*args)
    with pytest.raises(ValueError):
        K.ring_send(*good[:8], b"")
    with pytest.raises(BufferError):
        K.ring_send(bytes(ring.size + DATA_AT), *good[1:])  # a read-only buffer
    out.close()


# --- hand_over ----------------------------------------------------------------------------

batches = st.lists(
    st.tuples(
        st.sampled_from(["tcp-1-1", "tcp-1-2", "quic-1-1", "vsock-1-1", "tcp", "tcp-" + "x" * 260]),
        st.lists(st.integers(0, 300_000), max_size=4),
    ),
    max_size=12,
)


@SETTINGS
@given(rounds=st.lists(batches, min_size=1, max_size=4), released=st.lists(st.floats(0, 1), min_size=4, max_size=4))
def test_hand_over_hands_over_what_the_reference_does(
    tmp_path_factory: pytest.TempPathFactory, rounds: list[list[tuple[str, list[int]]]], released: list[float]
) -> None:
    run = str(tmp_path_factory.mktemp("run"))
    listeners = {}
    for family in ("tcp", "quic"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.bind(socket_path(run, f"peerd-{family}"))
        sock.listen(4)
        listeners[family] = sock
    results, opened = [], []
    saved, stall = datapath._kernel, shmring.STALL_RESET
    shmring.STALL_RESET = 1e9
    try:
        for kernel in (None, K):
            datapath._kernel = kernel
            rings = {f: DataOut(run, f"tund-to-peerd-{f}", f"peerd-{f}") for f in ("tcp", "quic")}
            conns = {}
            for f, out in rings.items():
                assert out.send(b"hello", b"t") is None
                conns[f] = listeners[f].accept()[0]
                opened += [out, conns[f]]
            said = []
            for i, batch in enumerate(rounds):
                pending: dict[str, list[bytes]] = {}
                for hop, sizes in batch:
                    pending.setdefault(hop, []).extend(bytes([(i + n) % 251]) * n for n in sizes)
                handed = datapath.hand_over(pending, rings, 1 << 20)  # type: ignore[arg-type]
                said.append((handed, sorted(pending)))
                for out in rings.values():  # the reader catches up on part of it
                    seen = out.ring.tail + int((out.ring.head - out.ring.tail) * released[i])
                    out.ring.map[TAIL_AT : TAIL_AT + 8] = seen.to_bytes(8, "little")
            state = [
                (o.ring.head, o.ring._undo, o.ring.tail, o.ring.drops, bytes(o.ring.map[DATA_AT:]))
                for o in rings.values()
            ]
            results.append((said, state, [records(c) for c in conns.values()]))
    finally:
        datapath._kernel, shmring.STALL_RESET = saved, stall
        for thing in opened:
            thing.close()
        for sock in listeners.values():
            sock.close()
    assert results[0] == results[1]


def test_hand_over_leaves_what_cannot_go_at_once(listener: tuple[str, socket.socket]) -> None:
    run, sock = listener
    saved = datapath._kernel
    try:
        for kernel in (None, K):
            datapath._kernel = kernel
            out = DataOut(run, "tund-to-peerd-tcp", "peerd-tcp")
            rings = {"tcp": out}
            pending = {"tcp-1-1": [b"a" * 100, b"b" * 50]}
            assert datapath.hand_over(pending, rings, 1 << 20) == 0 and pending  # not connected yet: send connects
            assert out.send(b"x", b"") is None
            conn, _ = sock.accept()
            assert datapath.hand_over(pending, rings, 120) == 0 and pending  # over the batch limit: the caller cuts
            pending["udp-1-1"] = [b"c"]  # a family without a ring
            pending["tcp-1-2"] = []
            out.ring.full_since = 5.0  # full a moment ago: a record that goes in ends that (RingWriter.advance)
            assert datapath.hand_over(pending, rings, 1 << 20) == 1
            assert out.ring.full_since == 0.0 and out.ring._undo == 1 and out.ring.head == 151
            assert sorted(pending) == ["tcp-1-2", "udp-1-1"]
            got = records(conn)
            assert [(start, length, tag) for start, length, _, _, tag in got] == [
                (0, 1, b"tund-to-peerd-tcp"),
                (1, 150, b"tund-to-peerd-tcptcp-1-1"),
            ]
            assert bytes(out.ring.map[DATA_AT + 1 : DATA_AT + 151]) == b"a" * 100 + b"b" * 50
            conn.close()
            assert datapath.hand_over({"tcp-1-1": [b"z"]}, rings, 1 << 20) == 0  # the consumer went: send reconnects
            out.close()
    finally:
        datapath._kernel = saved


# --- drain_ring ---------------------------------------------------------------------------

steps_in = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(1, 5000), st.binary(max_size=6)),
        st.tuples(st.just("renew"), st.just(0), st.just(b"")),  # the producer restarted: a new generation
        st.tuples(st.just("forged"), st.integers(0, 5), st.just(b"")),
        st.tuples(st.just("drain"), st.just(0), st.just(b"")),
    ),
    max_size=40,
)


def forged(out: DataOut, kind: int) -> bytes:
    name, gen, size = out.name_bytes, out.ring.generation, out.ring.size
    return [
        b"short",
        RECORD.pack(gen, 0, 4, len(name), 0) + name + b"extra",  # length mismatch
        RECORD.pack(gen + 1, 0, 4, len(name), 0) + name,  # unknown generation
        RECORD.pack(gen, size - 2, 4, len(name), 0) + name,  # off the end
        RECORD.pack(gen, 0, 0, len(name), 0) + name,  # empty
        RECORD.pack(gen, 0, 4, 3, 0) + b"\xff\xfe\xfd",  # not a name
    ][kind]


def drained(run: str, steps: list[tuple[str, int, bytes]]) -> tuple[object, ...]:
    """What a consumer's DataIn.drain handed over, counted and mapped for ``steps``."""
    fds: set[int] = set()
    counters: Counter[str] = Counter()
    din = DataIn(run, "tund", "-to-tund", lambda fd, add: (fds.add if add else fds.discard)(fd), counters)
    out = DataOut(run, "peerd-tcp-to-tund", "tund")
    got: list[tuple[bytes, bytes]] = []
    mapped = []

    def drain() -> None:
        for fd in sorted(fds):
            din.drain(fd, lambda tag, view: got.append((tag, bytes(view))))
        mapped.append(sorted((name, r.generation != 0, r.map is not None) for name, r in din.readers.items()))

    try:
        assert out.send(b"first", b"") is None
        drain()  # accepts the connection
        for i, (kind, value, tag) in enumerate(steps):
            if kind == "send":
                out.send(bytes([i % 251]) * value, tag)
            elif kind == "renew":
                out.ring.renew()
            elif kind == "forged":
                assert out.sock is not None
                out.sock.send(forged(out, value))
            else:
                drain()
        drain()
        drain()
        tail = int.from_bytes(out.ring.map[TAIL_AT : TAIL_AT + 8], "little")
        return got, dict(counters), mapped, tail - out.ring.head
    finally:
        out.close()
        din.close()


def with_each_kernel(run: Callable[[], tuple[object, ...]]) -> list[tuple[object, ...]]:
    """``run()`` with common/datapath.py on its Python reference, then on the C kernel."""
    results = []
    saved = datapath._kernel
    try:
        for kernel in (None, K):
            datapath._kernel = kernel
            results.append(run())
    finally:
        datapath._kernel = saved
    return results


@SETTINGS
@given(steps=steps_in)
def test_drain_ring_hands_over_what_receive_does(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, int, bytes]]
) -> None:
    results = with_each_kernel(lambda: drained(str(tmp_path_factory.mktemp("run")), steps))
    assert results[0] == results[1]
    assert results[1][3] == 0  # everything written was released


def test_drain_ring_passes_on_the_handlers_exception_and_keeps_the_ring_usable(tmp_path: Path) -> None:
    run = str(tmp_path)
    fds: set[int] = set()
    din = DataIn(run, "tund", "-to-tund", lambda fd, add: (fds.add if add else fds.discard)(fd))
    out = DataOut(run, "peerd-tcp-to-tund", "tund")
    assert out.send(b"a" * 10, b"") is None
    for fd in sorted(fds):
        din.drain(fd, lambda tag, view: None)  # accept
    kept: list[memoryview] = []
    assert out.send(b"b" * 10, b"") is None
    assert out.send(b"c" * 10, b"") is None

    def boom(tag: bytes, view: memoryview) -> None:
        kept.append(view)  # a handler that keeps the view: it is released anyway
        raise RuntimeError("handler failed")

    conn = next(fd for fd in fds if fd != din.listener.fileno())
    with pytest.raises(RuntimeError):
        din.drain(conn, boom)
    with pytest.raises(ValueError):
        bytes(kept[0])  # released: no access to the ring after the call
    got: list[bytes] = []
    din.drain(conn, lambda tag, view: got.append(bytes(view)))
    assert got == [b"b" * 10, b"c" * 10]  # the failed one is consumed, the rest still there
    assert int.from_bytes(out.ring.map[TAIL_AT : TAIL_AT + 8], "little") == out.ring.head
    out.close()
    din.close()
    with pytest.raises(ValueError):
        K.drain_ring(-1, {}, print, 1, 100, None, 1)
    with pytest.raises(ValueError):
        K.drain_ring(0, {}, print, 1, 100, [], 1)  # direct is a dict or None


def test_recv_records_reports_a_failed_read() -> None:
    r, w = os.pipe()
    os.close(w)
    os.close(r)
    assert datapath.recv_records(r, 4, 100) == ([], errno.EBADF)


# --- write_tun ----------------------------------------------------------------------------


@SETTINGS
@given(writes=st.lists(st.lists(st.binary(min_size=0, max_size=300), max_size=5), max_size=12))
def test_write_tun_writes_what_the_reference_writes(writes: list[list[bytes]]) -> None:
    results = []
    for write in (write_packets, K.write_tun):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)  # a write is one datagram, as on a TUN
        b.setblocking(False)
        try:
            said = write(a.fileno(), [[bytearray(x) if i % 2 else x for i, x in enumerate(w)] for w in writes])
            got = []
            while True:
                try:
                    got.append(b.recv(4096))
                except BlockingIOError:
                    break
            results.append((said, got))
        finally:
            a.close()
            b.close()
    assert results[0] == results[1]
    sent = [b"".join(w) for w in writes]
    assert results[1][0] == (len(writes), 0, 0) and results[1][1] == [d for d in sent if d]  # (empty ones vanish)


def test_write_tun_counts_failed_writes_and_refuses_bad_arguments() -> None:
    r, w = os.pipe()
    os.close(w)
    os.close(r)
    writes = [[b"a"], [b"b", b"c"]]
    assert write_packets(r, writes) == K.write_tun(r, writes) == (0, 2, errno.EBADF)
    assert write_packets(-1, writes) == K.write_tun(-1, writes) == (0, 2, errno.EBADF)  # --no-tun
    too_many = [[b"x"] * (os.sysconf("SC_IOV_MAX") + 1)]
    assert write_packets(1, too_many) == K.write_tun(1, too_many) == (0, 1, errno.EINVAL)
    with pytest.raises(TypeError):
        K.write_tun(1, [[1, 2]])
    with pytest.raises(TypeError):
        K.write_tun(1, ([b"x"],))


# --- link_rx ------------------------------------------------------------------------------

OWN = bytes.fromhex("04aa55aa00000001")


def wire_packet(kind: str, size: int, hop: int, n: int) -> bytes:
    """One packet of a link's stream: a data packet for us or elsewhere, a
    control packet, or a byte that is no packet version at all."""
    body = bytes([n % 251]) * size
    src = bytes(15) + bytes([n % 3])  # a few flows, for the statistics' runs
    if kind == "local":
        dst = OWN + bytes(7) + b"\x09"
    elif kind == "transit":
        dst = bytes.fromhex("05bb000000000001") + bytes(8)
    elif kind == "control":
        return bytes([1, 1, 0, 0, 42, 2]) + len(body).to_bytes(2, "big") + body
    else:
        return bytes([2, 0, 0, 0, 0]) + len(body).to_bytes(2, "big") + bytes([hop]) + bytes(32) + body
    return bytes([1, 0, 0, 0, 0]) + len(body).to_bytes(2, "big") + bytes([hop]) + src + dst + body


stream_parts = st.lists(
    st.tuples(
        st.sampled_from(["local", "local", "local", "transit", "control", "bad"]),
        st.integers(0, 1500),
        st.integers(0, 255),
    ),
    max_size=30,
)


def linked_rx(run: str, rx: Any, stream: bytes, have: int, connect: bool, full: bool) -> tuple[object, ...]:
    """One link_rx call on a socket that holds ``stream[have:]`` with
    ``stream[:have]`` already in the buffer; what it returned, the buffer
    after, and what tund's DataIn got."""
    fds: set[int] = set()
    counters: Counter[str] = Counter()
    din = DataIn(run, "tund", "-to-tund", lambda fd, add: (fds.add if add else fds.discard)(fd), counters)
    out = DataOut(run, "peerd-tcp-to-tund", "tund")
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    b.setblocking(False)
    got: list[tuple[bytes, bytes]] = []
    try:
        if connect:
            assert out.send(b"first", b"") is None
            for fd in sorted(fds):
                din.drain(fd, lambda tag, view: got.append((tag, bytes(view))))
        if full:  # a ring tund has not caught up on: 10 bytes of room
            out.ring.head = out.ring.tail + out.ring.size - 10
        buf = bytearray(1 << 17)
        buf[:have] = stream[:have]
        a.sendall(stream[have:])
        if len(stream) > have:  # one read takes what the socket holds, as a busy link's would
            select_ready(b)
        returned = rx(b.fileno(), buf, have, OWN, out, out.ring.max_record)
        for fd in sorted(fds):
            din.drain(fd, lambda tag, view: got.append((tag, bytes(view))))
        return returned, bytes(buf), got, dict(counters)
    finally:
        a.close()
        b.close()
        out.close()
        din.close()


def select_ready(sock: socket.socket) -> None:
    select.select([sock], [], [], 5)


@SETTINGS
@given(
    parts=stream_parts,
    cut=st.floats(0, 1),
    have_part=st.floats(0, 1),
    connect=st.booleans(),
    full=st.booleans(),
)
def test_link_rx_hands_over_what_the_reference_does(
    tmp_path_factory: pytest.TempPathFactory,
    parts: list[tuple[str, int, int]],
    cut: float,
    have_part: float,
    connect: bool,
    full: bool,
) -> None:
    from services.peerd.local_batch import _link_rx_python

    stream = b"".join(wire_packet(kind, size, hop, n) for n, (kind, size, hop) in enumerate(parts))
    stream = stream[: int(len(stream) * cut) if cut < 0.9 else len(stream)]  # often a partial packet at the end
    have = int(min(len(stream), 1 << 16) * have_part) if have_part < 0.7 else 0
    results = [
        linked_rx(str(tmp_path_factory.mktemp("run")), rx, stream, have, connect, full)
        for rx in (_link_rx_python, K.link_rx)
    ]
    assert results[0] == results[1]
    (n, end, runs), buf, got, _ = results[1]
    assert n == len(stream) - have or (n == -errno.EAGAIN and len(stream) == have)
    if not end:  # nothing went: the buffer is what was read, byte for byte
        assert buf[: len(stream)] == stream and runs is None
        return
    assert connect and not full
    assert got[-1] == (b"", buf[:end])  # one record: whole packets for us, their hop limits one lower
    pos, packets = 0, 0
    while pos < end:
        assert buf[pos + 24 : pos + 32] == OWN and buf[pos + 7] == stream[pos + 7] - 1 >= 1
        pos += 40 + int.from_bytes(buf[pos + 5 : pos + 7], "big")
        packets += 1
    assert pos == end and sum(p for _, p, _ in runs) == packets
    assert buf[end : len(stream)] == stream[end:]


def test_link_rx_reports_eof_errors_and_refuses_bad_arguments(tmp_path: Path) -> None:
    from services.peerd.local_batch import _link_rx_python

    run = str(tmp_path)
    out = DataOut(run, "peerd-tcp-to-tund", "tund")
    try:
        for rx in (_link_rx_python, K.link_rx):
            a, b = socket.socketpair()
            b.setblocking(False)
            buf = bytearray(4096)
            assert rx(b.fileno(), buf, 0, OWN, out, 1 << 16) == (-errno.EAGAIN, 0, None)
            a.close()
            assert rx(b.fileno(), buf, 0, OWN, out, 1 << 16) == (0, 0, None)  # the peer closed
            b.close()
            r, w = os.pipe()
            os.close(w)
            os.close(r)
            assert rx(r, buf, 0, OWN, out, 1 << 16) == (-errno.EBADF, 0, None)
        with pytest.raises(ValueError):
            K.link_rx(-1, bytearray(10), 0, OWN, out, 100)
        with pytest.raises(ValueError):
            K.link_rx(0, bytearray(10), 11, OWN, out, 100)  # have past the buffer
        with pytest.raises(ValueError):
            K.link_rx(0, bytearray(10), 0, b"short", out, 100)
        with pytest.raises(BufferError):
            K.link_rx(0, b"read-only", 0, OWN, out, 100)
    finally:
        out.close()


# --- drain_ring's direct writes -----------------------------------------------------------


class Queue:
    """What write_direct needs of a link's SendQueue: busy after a partial write (keep) or a failure."""

    def __init__(self, fd: int) -> None:
        self.write_fd = fd
        self.tx_bytes = 0
        self.kept: list[bytes] = []
        self.failed: list[str] = []

    def keep(self, rest: bytes) -> None:
        self.kept.append(rest)
        self.write_fd = -1

    def fail(self, why: str) -> None:
        self.failed.append(why)
        self.write_fd = -1


direct_steps = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(1, 9000), st.sampled_from([b"a", b"b", b"x", b"ab"])),
        st.tuples(st.just("drain"), st.just(0), st.just(b"")),
        st.tuples(st.just("read"), st.just(0), st.just(b"")),  # the link's peer reads: room again, queue idle
        st.tuples(st.just("break"), st.just(0), st.just(b"")),  # the link's peer goes away
    ),
    max_size=40,
)


def drained_direct(run: str, steps: list[tuple[str, int, bytes]]) -> tuple[object, ...]:
    fds: set[int] = set()
    din = DataIn(run, "peerd-tcp", "-to-peerd-tcp", lambda fd, add: (fds.add if add else fds.discard)(fd))
    out = DataOut(run, "tund-to-peerd-tcp", "peerd-tcp")
    a, peer = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # partial writes come soon
    a.setblocking(False)
    peer.setblocking(False)
    qa, qb = Queue(a.fileno()), Queue(-1)  # b's queue is busy: its batches go to the handler
    direct = {b"a": qa, b"b": qb}
    handled: list[tuple[bytes, bytes]] = []
    taken: list[int] = []
    received = bytearray()

    def drain() -> None:
        taken.append(sum(din.drain(fd, lambda t, v: handled.append((t, bytes(v))), direct, 40) for fd in sorted(fds)))

    try:
        assert out.send(b"first", b"") is None
        drain()
        for i, (kind, value, tag) in enumerate(steps):
            if kind == "send":
                out.send(bytes([i % 251]) * value, tag)
            elif kind == "drain":
                drain()
            elif kind == "read":
                with contextlib.suppress(BlockingIOError, OSError):
                    while True:
                        got = peer.recv(1 << 16)
                        if not got:
                            break
                        received.extend(got)
                if not qa.failed:
                    qa.write_fd = a.fileno()
            else:
                peer.close()
        drain()
        return handled, taken, received, qa.tx_bytes, qa.kept, qa.failed, qb.kept
    finally:
        a.close()
        peer.close()
        out.close()
        din.close()


@SETTINGS
@given(steps=direct_steps)
def test_drain_ring_writes_straight_to_idle_links_as_the_reference_does(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, int, bytes]]
) -> None:
    results = with_each_kernel(lambda: drained_direct(str(tmp_path_factory.mktemp("run")), steps))
    assert results[0] == results[1]
    received, tx = results[1][2], results[1][3]
    assert len(received) <= tx  # type: ignore[operator]  # every byte written was counted


@pytest.mark.parametrize("native", [False, True])
def test_drain_ring_direct_writes_keeps_the_rest_and_fails_on_a_broken_link(tmp_path: Path, native: bool) -> None:
    saved = datapath._kernel
    datapath._kernel = K if native else None
    try:
        steps = [
            ("send", 1000, b"a"),  # straight to the socket
            ("send", 1000, b"b"),  # b's queue is busy: the handler
            ("send", 20, b"a"),  # shorter than a packet header: the handler
            ("send", 100, b"x"),  # no such link here: the handler
            ("drain", 0, b""),
            ("send", 9000, b"a"),  # more than the socket takes: the rest is kept ...
            ("send", 500, b"a"),  # ... and the queue busy: the handler
            ("drain", 0, b""),
            ("read", 0, b""),
            ("break", 0, b""),
            ("send", 300, b"a"),  # the peer is gone: the write fails the queue
            ("drain", 0, b""),
        ]
        handled, taken, received, tx, kept, failed, _ = drained_direct(str(tmp_path), steps)  # type: ignore[misc]
    finally:
        datapath._kernel = saved
    assert [(tag, len(view)) for tag, view in handled] == [(b"", 5), (b"b", 1000), (b"a", 20), (b"x", 100), (b"a", 500)]
    assert taken[1:] == [1, 1, 1, 0]  # per drain: the first 1000, the 9000, the 300 that failed
    assert received[:1000] == bytes([0]) * 1000 and len(received) == tx == 1000 + 9000 - len(kept[0])
    assert bytes(received[1000:]) + kept[0] == bytes([5]) * 9000
    assert failed == ["write error: [Errno 32] Broken pipe"]
