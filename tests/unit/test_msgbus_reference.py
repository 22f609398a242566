"""Interoperability with the reference's chunking rules (PROTOCOL.md 7.5,
quirk 11.7): our sender against a literal reference receiver, and our
receiver against a literal reference sender."""

from __future__ import annotations

import random

from services.msgbus.engine import MessageEngine
from services.msgbus.inbound import max_chunk_index
from services.msgbus.outbound import CHUNK_SIZE, MIN_CHUNK_SIZE, plan_chunks

from .test_msgbus_helpers import Net, RefReceiver, RefSender, drain_inbox, ip, payload

LARGE = [5_000, 13_000, 13_001, 13_100, 13_249, 13_250, 65_535, 100_100, 1 << 20, (1 << 20) + 1]


def check_plan(length: int) -> None:
    plan = plan_chunks(length)
    n = -(-length // CHUNK_SIZE)
    assert len(plan) == n  # == the reference receiver's slot count == DONE chunk count
    offset = 0
    for index, (off, size) in enumerate(plan):
        assert off == offset  # chunk i at index i with its true offset
        assert 0 < size <= CHUNK_SIZE
        if size < MIN_CHUNK_SIZE:
            assert index == max_chunk_index(length)  # only a lone short message may be short
            assert n == 1
        offset += size
    assert offset == length
    if length > CHUNK_SIZE:
        assert plan[-1][1] >= MIN_CHUNK_SIZE


def test_plan_satisfies_reference_receiver() -> None:
    for length in [*range(0, 3001), *LARGE]:
        check_plan(length)


def test_plan_examples() -> None:
    assert plan_chunks(0) == []
    assert plan_chunks(100) == [(0, 100)]
    assert plan_chunks(1300) == [(0, 1300)]
    assert plan_chunks(1301) == [(0, 651), (651, 650)]
    assert plan_chunks(1400) == [(0, 700), (700, 700)]
    assert plan_chunks(1550) == [(0, 1300), (1300, 250)]
    assert plan_chunks(2701) == [(0, 1300), (1300, 701), (2001, 700)]


def run_to_reference_receiver(lengths: list[int], loss: float = 0.0, seed: int = 1) -> RefReceiver:
    net = Net(seed=seed, loss=loss, delay=(0.005, 0.05), keep_log=False)
    ours = net.add(MessageEngine(ip(1), 0.0, rng=random.Random(seed)))
    ref = net.add(RefReceiver(ip(2)))
    sent = {}
    for n in lengths:
        data = payload(n, seed)
        sent[ours.push(ip(2), b"t", data, 0.0)] = data
    assert net.run(120.0, lambda: len(ref.completed) == len(sent)), (len(ref.completed), ref.drops)
    assert {mid: data for _, mid, data in ref.completed} == sent
    assert not ref.drops["small"] and not ref.drops["index"] and not ref.drops["bounds"]
    net.run(net.now + 1.0)
    assert all(ours.status(mid, net.now)["state"] == "received" for mid in sent)
    return ref


def test_reference_receiver_accepts_every_length_up_to_3000() -> None:
    run_to_reference_receiver(list(range(0, 3001)))


def test_reference_receiver_accepts_large_messages_under_loss() -> None:
    run_to_reference_receiver(LARGE, loss=0.15, seed=4)


def test_reference_sender_to_our_receiver() -> None:
    lengths = [*range(0, 3001, 7), 1301, 1400, 1549, 1550, 2600, 2601, 2849, 13_100, 1 << 20]
    net = Net(seed=2, loss=0.1, delay=(0.005, 0.05), keep_log=False)
    ref = net.add(RefSender(ip(1)))
    ours = net.add(MessageEngine(ip(2), 0.0))
    sent = {}
    for n in lengths:
        data = payload(n, 2)
        sent[ref.push(ip(2), b"topic", data, 0.0)] = data
    got: dict[bytes, bytes] = {}

    def done() -> bool:
        for m in drain_inbox(ours, net.now):
            assert m.id not in got
            got[m.id] = m.data
        return all(m["state"] == "received" for m in ref.msgs.values())

    assert net.run(60.0, done)
    assert got == sent
    # the short tails (e.g. 100 bytes of a 1400-byte message) were accepted because they end at length
    assert ours.counters["drop_chunk_small"] == 0


def test_reference_sender_small_middle_chunk_still_rejected() -> None:
    """The relaxation is only for a chunk ending at ``length``: a short chunk in the middle is
    dropped exactly as the reference does."""
    from common.wire.message import Chunk, Init

    e = MessageEngine(ip(2), 0.0)
    mid = b"\1" * 8
    e.receive(ip(1), ip(2), Init(mid, 2000, b""), 0.0)
    e.receive(ip(1), ip(2), Chunk(mid, 0, 0, 100, b"a" * 100), 0.0)
    e.receive(ip(1), ip(2), Chunk(mid, 1, 1900, 100, b"a" * 100), 0.0)
    assert e.counters["drop_chunk_small"] == 1
    assert [type(p).__name__ for _, _, p in e.packets_to_send()] == ["InitAck", "ChunkAck"]
