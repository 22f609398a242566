"""Durability: engines rebuilt from their sqlite store after a crash keep
every accepted outbound message and every unpopped inbound message, and
never deliver a message twice."""

from __future__ import annotations

import gc
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import blake3
import pytest

from common.wire.message import Abort, Chunk, Done, Init
from services.msgbus.engine import FORGET_AFTER, MessageEngine
from services.msgbus.events import ForwardToSocket
from services.msgbus.store import MessageStore, OutboundRecord, StoreError
from services.msgbus.topics import TopicConfig

from .test_msgbus_helpers import Net, drain_inbox, ip, payload

WALL0 = 1_700_000_000.0
A, B = ip(1), ip(2)
ROOT = Path(__file__).resolve().parents[2]


def engine(addr: bytes, path: Path | None, now: float, seed: int = 0, **kw: object) -> MessageEngine:
    # NORMAL keeps the suite fast on slow disks; it survives a process crash just like FULL
    # (the kill -9 test below uses the FULL default)
    store = MessageStore(path, synchronous="NORMAL") if path is not None else None
    return MessageEngine(addr, now, wall_now=WALL0 + now, rng=random.Random(seed), store=store, **kw)  # type: ignore[arg-type]


def crash(net: Net, addr: bytes, path: Path, seed: int = 0, **kw: object) -> MessageEngine:
    """Drop the engine without closing anything (its pending output is lost too) and rebuild."""
    old = net.nodes.pop(addr)
    old.packets_to_send()
    del old
    gc.collect()
    return net.add(engine(addr, path, net.now, seed, **kw))  # type: ignore[return-value]


def test_store_uses_wal_and_full_sync(tmp_path: Path) -> None:
    s = MessageStore(tmp_path / "m.db")
    assert s.journal_mode == "wal"
    assert s.synchronous == 2  # FULL
    s.close()
    s = MessageStore(tmp_path / "m.db", synchronous="NORMAL")
    assert s.synchronous == 1
    s.close()
    with pytest.raises(ValueError):
        MessageStore(tmp_path / "m.db", synchronous="OFF")
    # bookkeeping commits skip the fsync but leave the connection at FULL
    s = MessageStore(tmp_path / "m.db")
    s.add_outbound(OutboundRecord(b"\1" * 8, A, B, b"", b"x", 1, False, WALL0, "active"))
    s.set_outbound_state(b"\1" * 8, "received")
    assert s.synchronous == 2
    assert [(r.state, r.data) for r in s.load().outbox] == [("received", None)]
    s.close()
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError):
        MessageStore(tmp_path / "junk.db")


def test_outbound_messages_survive_a_crash(tmp_path: Path) -> None:
    net = Net(seed=3, loss=0.2, delay=(0.005, 0.08), keep_log=False)
    a = net.add(engine(A, tmp_path / "a.db", 0.0, seed=1))
    b = net.add(engine(B, None, 0.0, seed=2))
    expected = {}
    for i in range(100):
        data = payload(i * 97, i)
        expected[a.push(B, b"t%d" % (i % 4), data, 0.0)] = data
    net.run(0.3)  # some done, some in flight
    got = {m.id: m.data for m in drain_inbox(b, net.now)}
    assert 0 < len(got) < 100
    a = crash(net, A, tmp_path / "a.db", seed=1)
    assert a.counters["restored_outbound"] == 100
    assert net.run(60.0, lambda: all(a.status(i, net.now)["state"] in ("received", "read") for i in expected))
    for m in drain_inbox(b, net.now):
        assert m.id not in got, "delivered twice"
        got[m.id] = m.data
    assert got == expected


def test_inbound_messages_survive_a_crash_and_popped_ones_stay_gone(tmp_path: Path) -> None:
    net = Net(seed=4, delay=(0.005, 0.02), keep_log=False)
    a = net.add(engine(A, None, 0.0, seed=1))
    b = net.add(engine(B, tmp_path / "b.db", 0.0, seed=2))
    sent = [a.push(B, b"topic", payload(n), 0.0) for n in (0, 10, 1300, 1400, 5000, 70_000)]
    assert net.run(10.0, lambda: all(a.status(i, net.now)["state"] == "received" for i in sent))
    arrival = [e.message.id for e in net.events[B]]
    assert sorted(arrival) == sorted(sent)
    b = crash(net, B, tmp_path / "b.db", seed=2)
    assert b.inbox_size() == 6
    first = b.pop(None, False, net.now)
    second = b.pop(b"topic", True, net.now)  # peek keeps it
    assert [first.id, second.id] == arrival[:2]
    b = crash(net, B, tmp_path / "b.db", seed=2)
    rest = drain_inbox(b, net.now)
    assert [m.id for m in rest] == arrival[1:]  # FIFO order survives the restart
    lengths = dict(zip(sent, (0, 10, 1300, 1400, 5000, 70_000), strict=True))
    assert [m.data for m in rest] == [payload(lengths[m.id]) for m in rest]
    # the sender retransmits the popped message from scratch (as after its own crash): acknowledged, not delivered
    n = lengths[first.id]
    data = payload(n)
    b.packets_to_send()  # the READs of the pops above
    b.receive(A, B, Init(first.id, n, b"topic"), net.now)
    if n:
        b.receive(A, B, Chunk(first.id, 0, 0, n, data), net.now)
    b.receive(A, B, Done(first.id, 1 if n else 0, blake3.blake3(data).digest()), net.now)
    expected = ["InitAck"] + ["ChunkAck"] * (n > 0) + ["DoneAck"]
    assert [type(p).__name__ for _, _, p in b.packets_to_send()] == expected
    assert b.inbox_size() == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_crashes_on_both_sides_deliver_exactly_once(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    net = Net(seed=seed, loss=0.15, dup=0.05, delay=(0.005, 0.1), keep_log=False)
    a = net.add(engine(A, tmp_path / "a.db", 0.0, seed=seed))
    net.add(engine(B, tmp_path / "b.db", 0.0, seed=seed + 100))
    expected = {}
    for i in range(30):
        data = payload(rng.choice([0, 1, 300, 1301, 2600, 9000, 40_000]), i + seed)
        expected[a.push(B, b"", data, 0.0)] = data
    got: dict[bytes, bytes] = {}

    def collect() -> None:
        for m in drain_inbox(net.engine(B), net.now):
            assert m.id not in got, "delivered twice"
            got[m.id] = m.data

    for _ in range(12):
        net.run(net.now + rng.uniform(0.02, 0.6))
        if rng.random() < 0.5:
            collect()
        addr, name, node_seed = rng.choice([(A, "a.db", seed), (B, "b.db", seed + 100)])
        crash(net, addr, tmp_path / name, node_seed)
    a = net.engine(A)
    assert net.run(net.now + 120.0, lambda: collect() or len(got) == len(expected))
    net.run(net.now + 20.0)
    collect()
    assert got == expected


def test_receiver_crash_between_last_chunk_ack_and_done(tmp_path: Path) -> None:
    """The sender never starts over once every chunk is acknowledged, so the receiver keeps the
    assembled chunks across its crash and completes on the next DONE."""
    net = Net(delay=(0.02, 0.02))
    a = net.add(engine(A, None, 0.0))
    net.add(engine(B, tmp_path / "b.db", 0.0))
    net.drop_if = lambda src, dst, pkt: isinstance(pkt, Done)
    mid = a.push(B, b"t", payload(5000), 0.0)
    assert net.run(2.0, lambda: a.status(mid, net.now)["state"] == {"sending": {"pending": 0, "sent": 0, "acked": 4}})
    b = crash(net, B, tmp_path / "b.db")
    assert b.counters["restored_assembled"] == 1 and b.inbox_size() == 0
    net.drop_if = None
    assert net.run(net.now + 5.0, lambda: a.status(mid, net.now)["state"] == "received")
    assert b.pop(b"t", False, net.now).data == payload(5000)
    assert a.counters["send_restarted"] == 0
    b = crash(net, B, tmp_path / "b.db")
    assert b.inbox_size() == 0 and b.queue_depths()["pending"] == 0


def test_assembled_message_dropped_by_abort(tmp_path: Path) -> None:
    b = engine(B, tmp_path / "b.db", 0.0)
    b.receive(A, B, Init(b"\1" * 8, 3, b""), 0.0)
    b.receive(A, B, Chunk(b"\1" * 8, 0, 0, 3, b"abc"), 0.0)
    assert len(MessageStore(tmp_path / "b.db").load().inbox) == 1
    b.receive(A, B, Abort(b"\1" * 8), 0.0)
    assert MessageStore(tmp_path / "b.db").load().inbox == []
    assert b.queue_depths()["pending"] == 0


def test_deadlines_continue_across_restarts(tmp_path: Path) -> None:
    net = Net()
    a = net.add(engine(A, tmp_path / "a.db", 0.0))
    mid = a.push(ip(9), b"", b"lost", 0.0)  # nobody answers
    net.run(100.0)
    a = crash(net, A, tmp_path / "a.db")
    assert a.status(mid, net.now)["created"] == int(WALL0)
    net.run(250.0)
    net.nodes.pop(A)
    net.now = 400.0  # down across the abort deadline
    a = net.add(engine(A, tmp_path / "a.db", net.now))
    assert a.get_timer() is not None and a.get_timer() <= net.now
    net.run(401.0)
    assert a.status(mid, net.now)["state"] == "aborted"
    assert len(net.sent(Abort)) == 1
    a = crash(net, A, tmp_path / "a.db")
    assert a.status(mid, net.now)["state"] == "aborted"  # final states are persisted
    net.run(FORGET_AFTER + 1.0)
    assert a.status(mid, net.now) is None
    a = crash(net, A, tmp_path / "a.db")
    assert a.status(mid, net.now) is None
    assert MessageStore(tmp_path / "a.db").load().outbox == []


def test_message_being_forwarded_survives_a_crash(tmp_path: Path) -> None:
    topics = TopicConfig()
    topics.add_source(b"svc", "400::/7")
    topics.set_forward_socket(b"svc", "/s")
    net = Net()
    a = net.add(engine(A, None, 0.0))
    b = net.add(engine(B, tmp_path / "b.db", 0.0, topics=topics))
    mid = a.push(B, b"svc", b"job", 0.0)
    assert net.run(5.0, lambda: a.status(mid, net.now)["state"] == "received")
    assert [type(e) for e in net.events[B]] == [ForwardToSocket]
    b = crash(net, B, tmp_path / "b.db", topics=topics)
    (again,) = b.events()  # at-least-once: handed to the socket again
    assert isinstance(again, ForwardToSocket) and again.message.data == b"job"
    b.forward_done(again.message, None, net.now)
    b = crash(net, B, tmp_path / "b.db", topics=topics)
    assert b.events() == []
    assert b.pop(b"svc", False, net.now).data == b"job"


def test_forward_reply_is_atomic_with_removal(tmp_path: Path) -> None:
    topics = TopicConfig()
    topics.add_source(b"svc", "400::/7")
    topics.set_forward_socket(b"svc", "/s")
    net = Net()
    a = net.add(engine(A, None, 0.0))
    b = net.add(engine(B, tmp_path / "b.db", 0.0, topics=topics))
    a.push(B, b"svc", b"job", 0.0)
    assert net.run(5.0, lambda: bool(net.events.get(B)))
    b.forward_done(net.events[B][0].message, b"result", net.now)
    state = MessageStore(tmp_path / "b.db").load()
    assert state.inbox == []
    assert [(r.data, r.reply, r.dst_ip) for r in state.outbox] == [(b"result", True, A)]


def test_store_failure_withholds_the_done_ack(tmp_path: Path) -> None:
    store = MessageStore(tmp_path / "b.db")
    b = MessageEngine(B, 0.0, store=store)
    data = b"abc"
    b.receive(A, B, Init(b"\1" * 8, 3, b""), 0.0)
    b.receive(A, B, Chunk(b"\1" * 8, 0, 0, 3, data), 0.0)
    store.close()
    b.receive(A, B, Done(b"\1" * 8, 1, blake3.blake3(data).digest()), 0.0)
    assert [type(p).__name__ for _, _, p in b.packets_to_send()] == ["InitAck", "ChunkAck"]
    assert b.counters["store_error"] == 1 and b.inbox_size() == 0


def test_completed_ids_are_bounded(tmp_path: Path) -> None:
    from services.msgbus.engine import Limits

    b = engine(B, tmp_path / "b.db", 0.0, limits=Limits(max_completed=3))
    for i in range(5):
        mid = bytes([i]) * 8
        b.receive(A, B, Init(mid, 0, b""), 0.0)
        b.receive(A, B, Done(mid, 0, blake3.blake3(b"").digest()), 0.0)
    assert b.inbox_size() == 5
    assert b.queue_depths()["completed_ids"] == 3 and b.counters["completed_evicted"] == 2
    assert len(MessageStore(tmp_path / "b.db").load().completed) == 3


def test_version_1_database_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / "old.db")
    db.executescript(
        "CREATE TABLE inbox (seq INTEGER PRIMARY KEY, id BLOB NOT NULL, src BLOB NOT NULL, dst BLOB NOT NULL,"
        " topic BLOB NOT NULL, data BLOB NOT NULL, reply INTEGER NOT NULL, forward_socket TEXT,"
        " received REAL NOT NULL);"
        f"INSERT INTO inbox VALUES (7, x'{'01' * 8}', x'{A.hex()}', x'{B.hex()}', x'', x'6869', 0, NULL, 0);"
        "PRAGMA user_version=1;"
    )
    db.close()
    b = engine(B, tmp_path / "old.db", 0.0)
    assert b.pop(None, False, 0.0).data == b"hi"
    db = sqlite3.connect(tmp_path / "new.db")
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(StoreError):
        MessageStore(tmp_path / "new.db")


def test_topic_config_round_trip(tmp_path: Path) -> None:
    cfg = TopicConfig(default_accept=False)
    cfg.add_source(b"\xffbin", "400::/7")
    cfg.add_source(b"\xffbin", "5ab:1234::1")
    cfg.set_forward_socket(b"\xffbin", "/run/x.sock")
    cfg.add_topic(b"empty")
    s = MessageStore(tmp_path / "m.db")
    assert s.load_topic_config() is None
    s.save_topic_config(cfg.to_dict())
    s.close()
    back = TopicConfig.from_dict(MessageStore(tmp_path / "m.db").load_topic_config())
    assert back.to_dict() == cfg.to_dict()
    assert not back.default_accept and back.forward_socket(b"\xffbin") == "/run/x.sock"


def test_outbound_record_replaced_for_second_reply(tmp_path: Path) -> None:
    s = MessageStore(tmp_path / "m.db")
    rec = OutboundRecord(b"\1" * 8, A, B, b"", b"one", 3, True, WALL0, "active")
    s.add_outbound(rec)
    s.add_outbound(OutboundRecord(b"\1" * 8, A, B, b"", b"two", 3, True, WALL0, "active"))
    assert [r.data for r in s.load().outbox] == [b"two"]


# --- real kill -9 -------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import random, sys
    sys.path.insert(0, {root!r})
    from services.msgbus.engine import MessageEngine
    from services.msgbus.store import MessageStore
    from tests.unit.test_msgbus_helpers import Net, ip
    A, B = ip(1), ip(2)
    net = Net(seed=1, loss=0.1, delay=(0.001, 0.01), keep_log=False)
    a = net.add(MessageEngine(A, 0.0, rng=random.Random(1), store=MessageStore({a!r})))
    b = net.add(MessageEngine(B, 0.0, rng=random.Random(2), store=MessageStore({b!r})))
    reported = set()
    i = 0
    while True:
        i += 1
        mid = a.push(B, b"", i.to_bytes(4, "big") * (i % 700), net.now)
        print("pushed", mid.hex(), flush=True)
        net.run(net.now + 0.05)
        for m in list(a._outbox.values()):
            if m.state.value == "received" and m.id not in reported:
                reported.add(m.id)
                print("acked", m.id.hex(), flush=True)
        if i % 3 == 0:
            print("popping -", flush=True)
            m = b.pop(None, False, net.now)
            print("popped", m.id.hex() if m is not None else "-", flush=True)
    """
)


def test_kill_9_loses_no_accepted_message(tmp_path: Path) -> None:
    script = _CHILD.format(root=str(ROOT), a=str(tmp_path / "a.db"), b=str(tmp_path / "b.db"))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    lines: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 20.0
    while len(lines) < 150 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.split())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    lines.extend(line.split() for line in proc.stdout.read().splitlines())
    proc.stdout.close()
    lines = [t for t in lines if len(t) == 2]  # the kill may cut the last line short
    pushed = {bytes.fromhex(h) for kind, h in lines if kind == "pushed"}
    acked = {bytes.fromhex(h) for kind, h in lines if kind == "acked"}
    popped = {bytes.fromhex(h) for kind, h in lines if kind == "popped" and h != "-"}
    assert len(pushed) > 20 and acked and popped, lines[-5:]
    # killed inside pop(): that message may be gone from the store without its caller having seen it
    in_pop = lines[-1][0] == "popping"

    a_state = MessageStore(tmp_path / "a.db").load()
    b_state = MessageStore(tmp_path / "b.db").load()
    assert pushed <= {r.id for r in a_state.outbox}  # every id handed out is durable
    inbox = {r.id for r in b_state.inbox}
    assert not popped & inbox  # a pop is durable before it returns
    assert len(acked - inbox - popped) <= in_pop  # a DONE ACK is only sent for a stored message

    # rebuild both and finish: every pushed message arrives exactly once overall
    net = Net(seed=9, keep_log=False)
    a = net.add(MessageEngine(A, 0.0, store=MessageStore(tmp_path / "a.db")))
    b = net.add(MessageEngine(B, 0.0, store=MessageStore(tmp_path / "b.db")))
    seen = set(popped)
    delivered_before = len(inbox)

    def finish() -> bool:
        for m in drain_inbox(b, net.now):
            assert m.id not in seen, "delivered twice"
            seen.add(m.id)
        return all(a.status(i, net.now)["state"] in ("received", "read") for i in pushed)

    assert net.run(30.0, finish)
    finish()
    assert len(pushed - seen) <= in_pop
    assert len(seen) >= delivered_before
