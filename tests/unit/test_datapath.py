"""The tund <-> peerd data path (common/datapath.py): batches through a
shared-memory ring, announced over a SEQPACKET connection; either side
restarting; bad records refused and counted."""

from __future__ import annotations

import os
import select
import socket
from collections import Counter
from pathlib import Path

import pytest

from common import datapath, native
from common.datapath import RECORD, DataIn, DataOut, socket_path
from common.shmring import ring_path


@pytest.fixture(autouse=True, params=["native", "python"])
def hand_over(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test with the producer's C hand-over (ring_send) and with the Python one."""
    if request.param == "native" and native.kernel is None:
        pytest.skip(f"native kernel not in use: {native.REASON}")
    if request.param == "python":
        monkeypatch.setattr(datapath, "_kernel", None)
    return str(request.param)


class Consumer:
    def __init__(self, run: str, name: str = "tund") -> None:
        self.fds: set[int] = set()
        self.counters: Counter[str] = Counter()
        self.din = DataIn(run, name, f"-to-{name}", self.watch, self.counters)

    def watch(self, fd: int, add: bool) -> None:
        (self.fds.add if add else self.fds.discard)(fd)

    def drain(self, wait: float = 1.0) -> list[tuple[bytes, bytes]]:
        got: list[tuple[bytes, bytes]] = []
        for _ in range(5):
            ready, _, _ = select.select(list(self.fds), [], [], wait)
            if not ready:
                break
            for fd in ready:
                self.din.drain(fd, lambda tag, view: got.append((tag, bytes(view))))
            wait = 0.05
        return got


def test_batches_arrive_in_order_with_their_tags(tmp_path: Path) -> None:
    run = str(tmp_path)
    consumer = Consumer(run)
    out = DataOut(run, "peerd-tcp-to-tund", "tund")
    batches = [(os.urandom(1000 + i), f"link-{i % 3}".encode()) for i in range(300)]
    got: list[tuple[bytes, bytes]] = []
    for data, tag in batches:
        assert out.send(data, tag) is None
        if len(got) < 10:
            got += consumer.drain(0.2)  # accept the connection early on
    got += consumer.drain()
    assert got == [(tag, data) for data, tag in batches]
    assert not consumer.counters
    out.close()
    consumer.din.close()
    assert not os.path.exists(socket_path(run, "tund"))
    assert not os.path.exists(ring_path(run, "peerd-tcp-to-tund"))


def test_absent_consumer_is_reported_and_a_restarted_one_is_reached(tmp_path: Path) -> None:
    run = str(tmp_path)
    out = DataOut(run, "tund-to-peerd-tcp", "peerd-tcp")
    assert out.send(b"x" * 100, b"l") == "unreachable"  # nobody listens: the caller uses the bus
    first = Consumer(run, "peerd-tcp")
    out.next_attempt = 0.0
    assert out.send(b"a" * 100, b"l") is None
    assert first.drain() == [(b"l", b"a" * 100)]
    first.din.close()  # peerd restarts
    assert out.send(b"b" * 100, b"l") == "unreachable"
    second = Consumer(run, "peerd-tcp")
    assert out.send(b"c" * 100, b"l") is None  # reconnects at once after a broken connection
    assert second.drain() == [(b"l", b"c" * 100)]
    out.close()
    second.din.close()


def test_a_full_ring_drops_the_newest_batch(tmp_path: Path) -> None:
    run = str(tmp_path)
    consumer = Consumer(run)
    out = DataOut(run, "peerd-tcp-to-tund", "tund")
    consumer.drain(0.0)
    assert out.send(b"0", b"") is None
    consumer.drain(0.2)
    big = b"z" * (3 * 1024 * 1024)
    results = [out.send(big, b"") for _ in range(4)]  # 12 MiB into 8 MiB, nobody reading
    assert results[:2] == [None, None] and "ring_full" in results
    out.close()
    consumer.din.close()


def test_forged_or_stale_records_are_counted_not_trusted(tmp_path: Path) -> None:
    run = str(tmp_path)
    consumer = Consumer(run)
    out = DataOut(run, "peerd-tcp-to-tund", "tund")
    assert out.send(b"real", b"") is None
    rogue = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    rogue.connect(socket_path(run, "tund"))
    name = b"peerd-tcp-to-tund"
    rogue.send(b"short")
    rogue.send(RECORD.pack(out.ring.generation, 0, 4, len(name), 0) + name + b"extra")  # length mismatch
    rogue.send(RECORD.pack(out.ring.generation + 1, 0, 4, len(name), 0) + name)  # unknown generation
    rogue.send(RECORD.pack(out.ring.generation, out.ring.size - 2, 4, len(name), 0) + name)  # off the end
    evil = b"../../etc-to-tund"
    rogue.send(RECORD.pack(out.ring.generation, 0, 4, len(evil), 0) + evil)  # not a ring name
    other = b"peerd-tcp-to-tund-3"
    rogue.send(RECORD.pack(1, 0, 4, len(other), 0) + other)  # a ring for someone else
    got = consumer.drain()
    assert got == [(b"", b"real")]
    assert consumer.counters["data_in_malformed"] == 2
    assert consumer.counters["data_in_unreachable_record"] == 2
    assert consumer.counters["data_in_unknown_ring"] == 2
    rogue.close()
    out.close()
    consumer.din.close()


def test_a_batch_over_half_the_ring_is_refused_as_too_big_not_as_full(tmp_path: Path) -> None:
    """It would never fit, however fast the consumer: the producer must cut it
    (tund does, common.wire.rules.split_batch); counted apart from a full ring."""
    run = str(tmp_path)
    consumer = Consumer(run, "peerd-tcp")
    out = DataOut(run, "tund-to-peerd-tcp", "peerd-tcp")
    assert out.send(b"x" * 100, b"l") is None
    assert out.send(b"y" * (out.ring.max_record + 1), b"l") == "too_big"
    assert out.send(b"z" * out.ring.max_record, b"l") is None  # the largest record still goes
    assert [len(data) for _tag, data in consumer.drain()] == [100, out.ring.max_record]
    out.close()
    consumer.din.close()
