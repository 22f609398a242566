"""Hostile or broken input to the message engine: everything is dropped and
counted, nothing raises, nothing from the wire grows without bound."""

from __future__ import annotations

import random
import tracemalloc

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.wire.message import (
    Abort,
    Chunk,
    ChunkAck,
    Done,
    DoneAck,
    Init,
    InitAck,
    Read,
    ReadAck,
    encode_message,
)
from services.msgbus.engine import Limits, MessageEngine, OutboxFull, TopicTooLong

from .test_msgbus_helpers import Net, drain_inbox, ip

A, B = ip(1), ip(2)
MID = bytes(range(8))


def kinds(engine: MessageEngine) -> list[str]:
    return [type(p).__name__ for _, _, p in engine.packets_to_send()]


def fresh(**kw: object) -> MessageEngine:
    return MessageEngine(B, 0.0, **kw)  # type: ignore[arg-type]


def test_chunk_and_done_without_init() -> None:
    e = fresh()
    e.receive(A, B, Chunk(MID, 0, 0, 5, b"hello"), 0.0)
    e.receive(A, B, Done(MID, 1, blake3.blake3(b"hello").digest()), 0.0)
    assert kinds(e) == []
    assert e.counters["drop_chunk_unknown"] == 1 and e.counters["drop_done_unknown"] == 1
    assert e.inbox_size() == 0


def test_chunk_checks() -> None:
    e = fresh()
    e.receive(A, B, Init(MID, 3000, b"t"), 0.0)
    assert kinds(e) == ["InitAck"]
    e.receive(A, B, Chunk(MID, 12, 0, 300, b"x" * 300), 0.0)  # index > ceil(3000/250) - 1 = 11
    e.receive(A, B, Chunk(MID, 0, 2800, 300, b"x" * 300), 0.0)  # offset + size > length
    e.receive(A, B, Chunk(MID, 0, 0, 100, b"x" * 100), 0.0)  # small, not last index, not at end
    assert kinds(e) == []
    assert (e.counters["drop_chunk_index"], e.counters["drop_chunk_bounds"], e.counters["drop_chunk_small"]) == (
        1,
        1,
        1,
    )
    # the size field is capped by the bytes present: 1300 claimed, 300 present -> a 300-byte chunk
    e.receive(A, B, Chunk(MID, 0, 0, 1300, b"y" * 300), 0.0)
    assert kinds(e) == ["ChunkAck"]
    # buffered bytes may never exceed the declared length
    for i in range(1, 10):
        e.receive(A, B, Chunk(MID, i, 0, 300, b"z" * 300), 0.0)
    assert e.counters["drop_chunk_overflow"] == 0
    assert kinds(e) == ["ChunkAck"] * 9
    e.receive(A, B, Chunk(MID, 10, 0, 300, b"z" * 300), 0.0)  # 3300 bytes buffered for a 3000-byte message
    assert e.counters["drop_chunk_overflow"] == 1
    e.receive(A, B, Chunk(MID, 9, 0, 300, b"w" * 300), 0.0)  # replacing a chunk is fine
    assert kinds(e) == ["ChunkAck"]
    assert e.queue_depths()["pending_bytes"] == 3000


def test_done_checks() -> None:
    e = fresh()
    data = bytes(range(256)) * 10  # 2560 bytes -> 2 slots
    e.receive(A, B, Init(MID, len(data), b""), 0.0)
    e.receive(A, B, Chunk(MID, 0, 0, 1300, data[:1300]), 0.0)
    good = blake3.blake3(data).digest()
    e.receive(A, B, Done(MID, 2, good), 0.0)  # chunk 1 missing
    e.receive(A, B, Chunk(MID, 1, 1300, 1260, data[1300:]), 0.0)
    e.receive(A, B, Done(MID, 3, good), 0.0)  # wrong count
    e.receive(A, B, Done(MID, 2, blake3.blake3(b"other").digest()), 0.0)  # wrong checksum
    assert kinds(e) == ["InitAck", "ChunkAck", "ChunkAck"]
    assert e.counters["drop_done_incomplete"] == 1
    assert e.counters["drop_done_count"] == 1
    assert e.counters["drop_done_checksum"] == 1
    assert e.inbox_size() == 0
    e.receive(A, B, Done(MID, 2, good), 0.0)
    assert kinds(e) == ["DoneAck"]
    assert e.pop(None, False, 0.0).data == data


def test_duplicate_init_after_completion_is_not_delivered_twice() -> None:
    e = fresh()
    data = b"payload"
    checksum = blake3.blake3(data).digest()

    def send_all(t: float) -> None:
        e.receive(A, B, Init(MID, len(data), b"t"), t)
        e.receive(A, B, Chunk(MID, 0, 0, len(data), data), t)
        e.receive(A, B, Done(MID, 1, checksum), t)

    send_all(0.0)
    assert kinds(e) == ["InitAck", "ChunkAck", "DoneAck"]
    assert e.pop(None, False, 0.0).data == data
    kinds(e)
    send_all(1.0)  # a sender that restarted: everything is acknowledged, nothing delivered
    assert kinds(e) == ["InitAck", "ChunkAck", "DoneAck"]
    assert e.pop(None, False, 1.0) is None
    assert e.counters["delivered"] == 1
    # an INIT reusing the id with another length is refused outright
    e.receive(A, B, Init(MID, 99, b"t"), 2.0)
    assert kinds(e) == [] and e.counters["drop_init_completed"] == 1
    # the same id from another sender is a different message
    e.receive(ip(3), B, Init(MID, len(data), b"t"), 2.0)
    assert kinds(e) == ["InitAck"]
    # after the completed-id lifetime the id is forgotten
    e.handle_timer(1000.0)
    assert e.queue_depths()["completed_ids"] == 0


def test_huge_declared_length_is_not_allocated() -> None:
    e = fresh()
    e.receive(A, B, Init(MID, (1 << 64) - 1, b""), 0.0)
    assert kinds(e) == [] and e.counters["drop_init_too_large"] == 1
    tracemalloc.start()
    try:
        e.receive(A, B, Init(b"\2" * 8, Limits().max_message_size, b""), 0.0)  # accepted, 64 MiB declared
        e.receive(A, B, Chunk(b"\2" * 8, 50_000, 50_000 * 1300, 1300, b"q" * 1300), 0.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kinds(e) == ["InitAck", "ChunkAck"]
    assert peak < 1 << 20


def test_many_incomplete_messages_from_one_sender() -> None:
    limits = Limits(max_pending_per_sender=5, max_pending_bytes_per_sender=10_000, max_pending_total=8)
    e = fresh(limits=limits)
    for i in range(20):
        e.receive(A, B, Init(i.to_bytes(8, "big"), 100, b""), 0.0)
    assert kinds(e).count("InitAck") == 5
    assert e.counters["drop_init_sender_limit"] == 15
    # another address in the same /64 is the same sender
    e.receive(A[:8] + b"\x99" * 8, B, Init(b"\x77" * 8, 100, b""), 0.0)
    assert kinds(e) == []
    # bytes count too
    e.receive(ip(3), B, Init(b"\x55" * 8, 9_000, b""), 0.0)
    e.receive(ip(3), B, Init(b"\x56" * 8, 2_000, b""), 0.0)
    assert kinds(e) == ["InitAck"]
    # the global cap protects against many senders
    for n in range(4, 10):
        e.receive(ip(n), B, Init(b"\x33" * 8, 10, b""), 0.0)
    assert e.queue_depths()["pending"] == 8
    assert e.counters["drop_init_pending_limit"] == 4
    # an ABORT frees a slot; only the sender itself can abort its message
    e.receive(ip(3), B, Abort(bytes(8)), 0.0)
    assert e.queue_depths()["pending"] == 8
    e.receive(A, B, Abort(bytes(8)), 0.0)
    assert e.queue_depths()["pending"] == 7
    # idle incomplete messages expire
    e.handle_timer(e.get_timer() or 0.0)
    e.handle_timer(Limits().pending_idle_timeout + 20.0)
    assert e.queue_depths()["pending"] == 0 and e.queue_depths()["pending_bytes"] == 0


def test_full_inbox_withholds_done_ack_until_popped() -> None:
    net = Net()
    a = net.add(MessageEngine(A, 0.0))
    b = net.add(MessageEngine(B, 0.0, limits=Limits(max_inbox_messages=2)))
    ids = [a.push(B, b"", b"m%d" % i, 0.0) for i in range(4)]
    net.run(5.0)
    states = [a.status(i, net.now)["state"] for i in ids]
    assert states.count("received") == 2
    assert b.counters["drop_init_inbox_full"] + b.counters["drop_done_inbox_full"] > 0
    got = drain_inbox(b, net.now)
    assert net.run(20.0, lambda: got.extend(drain_inbox(b, net.now)) or len(got) == 4)
    assert sorted(m.data for m in got) == [b"m0", b"m1", b"m2", b"m3"]


def test_push_errors() -> None:
    e = MessageEngine(A, 0.0, limits=Limits(max_outbox_messages=2, max_outbox_bytes=1000))
    with pytest.raises(TopicTooLong):
        e.push(B, b"x" * 256, b"", 0.0)
    e.push(B, b"x" * 255, b"", 0.0)
    with pytest.raises(OutboxFull):
        e.push(B, b"", b"y" * 1001, 0.0)
    e.push(B, b"", b"y" * 1000, 0.0)
    with pytest.raises(OutboxFull):
        e.push(B, b"", b"", 0.0)
    with pytest.raises(ValueError):
        e.push(b"\0" * 4, b"", b"", 0.0)
    # finished messages do not count against the outbox
    e.handle_timer(300.0)
    e.push(B, b"", b"", 300.0)


def test_stray_answers_are_counted() -> None:
    e = MessageEngine(A, 0.0)
    for pkt in (InitAck(MID, 1, 0), ChunkAck(MID, 0, 0, 1), DoneAck(MID, 0, bytes(32)), Read(MID)):
        e.receive(B, A, pkt, 0.0)
    e.receive(B, A, ReadAck(MID), 0.0)
    mid = e.push(B, b"", b"z" * 2000, 0.0)
    e.receive(B, A, ChunkAck(mid, 0, 0, 1), 0.0)  # before INIT ACK
    e.receive(B, A, InitAck(mid, 2000, 0), 0.0)
    e.receive(B, A, ChunkAck(mid, 2, 0, 1), 0.0)  # out of range (the reference would panic)
    e.receive(B, A, ChunkAck(mid, 1 << 63, 0, 1), 0.0)
    e.receive(B, A, InitAck(mid, 2000, 0), 0.0)  # duplicate
    c = e.counters
    assert c["drop_initack_unknown"] == c["drop_chunkack_unknown"] == c["drop_doneack_unknown"] == 1
    assert c["drop_read_unknown"] == 1 and c["rx_read_ack"] == 1
    assert c["drop_chunk_ack_state"] == 1 and c["drop_chunk_ack_index"] == 2 and c["drop_init_ack_state"] == 1


def test_raw_bytes_input() -> None:
    e = fresh()
    e.receive(A, B, b"\0" * 5, 0.0)
    e.receive(A, B, bytes(8) + b"\x00\x00\x00\x00", 0.0)  # no type flag
    e.receive(A, B, encode_message(Init(MID, 3, b"")), 0.0)
    e.receive(A[:4], B, encode_message(Init(MID, 3, b"")), 0.0)
    assert e.counters["drop_malformed"] == 2 and e.counters["drop_bad_address"] == 1
    assert kinds(e) == ["InitAck"]


ids = st.sampled_from([MID, b"\1" * 8, bytes(8)])
u64 = st.one_of(st.integers(0, 4000), st.integers(0, (1 << 64) - 1))
packets = st.one_of(
    st.builds(Init, ids, u64, st.binary(max_size=255), st.booleans()),
    st.builds(InitAck, ids, u64, st.integers(0, 255), st.booleans()),
    st.builds(Chunk, ids, st.integers(0, 20), u64, u64, st.binary(max_size=1400)),
    st.builds(ChunkAck, ids, u64, u64, u64),
    st.builds(Done, ids, st.integers(0, 5), st.binary(min_size=32, max_size=32)),
    st.builds(DoneAck, ids, st.integers(0, 5), st.binary(min_size=32, max_size=32)),
    st.builds(Read, ids),
    st.builds(ReadAck, ids),
    st.builds(Abort, ids),
    st.binary(max_size=80),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([A, ip(3)]), packets, st.floats(0, 1000)), max_size=40))
def test_random_input_never_raises(inputs: list) -> None:
    e = MessageEngine(B, 0.0, rng=random.Random(0))
    e.push(A, b"", b"k" * 3000, 0.0)
    for src, pkt, t in sorted(inputs, key=lambda x: x[2]):
        e.receive(src, B, pkt, t)
        e.handle_timer(t)
        e.pop(None, False, t)
        e.packets_to_send()
    depths = e.queue_depths()
    assert depths["pending_bytes"] <= Limits().max_pending_bytes_total
    assert all(v >= 0 for v in depths.values())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([A, ip(3)]), packets, st.floats(0, 1000)), max_size=30))
def test_random_input_with_a_store_never_raises(inputs: list) -> None:
    import tempfile
    from pathlib import Path

    from services.msgbus.store import MessageStore

    with tempfile.TemporaryDirectory() as tmp:
        store = MessageStore(Path(tmp) / "m.db", synchronous="NORMAL")
        e = MessageEngine(B, 0.0, rng=random.Random(0), store=store)
        for src, pkt, t in sorted(inputs, key=lambda x: x[2]):
            e.receive(src, B, pkt, t)
            e.handle_timer(t)
            if t > 500:
                e.pop(None, False, t)
        inbox = e.inbox_size()
        store.close()
        again = MessageEngine(B, 1000.0, store=MessageStore(Path(tmp) / "m.db"))
        assert again.inbox_size() == inbox
        assert e.counters["store_error"] == 0


@settings(max_examples=150, deadline=None)
@given(
    st.integers(0, 4000),
    st.lists(st.tuples(st.integers(0, 1000), st.sampled_from(["as-is", "trunc", "shift", "flip"])), max_size=60),
)
def test_shuffled_duplicated_and_corrupted_packets_deliver_at_most_once_and_intact(length: int, ops: list) -> None:
    """Any sequence of (possibly damaged) packets of one real transfer delivers the message at
    most once, and only with its true contents."""
    data = random.Random(length).randbytes(length)
    sender = MessageEngine(A, 0.0, rng=random.Random(1))
    mid = sender.push(B, b"t", data, 0.0)
    sender.receive(B, A, InitAck(mid, length, 1), 0.0)
    sender.receive(B, A, InitAck(mid, length, 1), 0.0)
    legit = [p for _, _, p in sender.packets_to_send()]
    for i in range(len(legit)):
        if isinstance(legit[i], Chunk):
            sender.receive(B, A, ChunkAck(mid, legit[i].index, 0, 0), 0.0)
    legit += [p for _, _, p in sender.packets_to_send()]  # now includes DONE
    receiver = MessageEngine(B, 0.0)
    for pick, how in ops:
        pkt = legit[pick % len(legit)]
        if isinstance(pkt, Chunk) and how != "as-is":
            if how == "trunc":
                pkt = Chunk(pkt.id, pkt.index, pkt.offset, pkt.size, pkt.data[: len(pkt.data) // 2])
            elif how == "shift":
                pkt = Chunk(pkt.id, pkt.index + 1, pkt.offset, pkt.size, pkt.data)
            else:
                pkt = Chunk(pkt.id, pkt.index, pkt.offset, pkt.size, bytes(b ^ 1 for b in pkt.data))
        receiver.receive(A, B, pkt, 0.0)
    got = drain_inbox(receiver, 0.0)
    assert len(got) <= 1
    if got:
        assert got[0].data == data and got[0].topic == b"t"
    for pkt in legit * 2:  # clean retransmissions (a chunk may need two: see drop_chunk_overflow)
        receiver.receive(A, B, pkt, 1.0)
    got += drain_inbox(receiver, 1.0)
    assert len(got) <= 1 and all(m.data == data for m in got)
    if not any(how == "shift" for _, how in ops):
        # a chunk stored at a wrong index can grow the slot list for good (as in the reference);
        # anything else is repaired by the retransmissions
        assert len(got) == 1
