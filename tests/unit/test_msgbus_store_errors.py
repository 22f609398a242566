"""A real sqlite failure (the database locked by another process) during
push and pop: the engine raises, changes nothing, loses nothing, and works
again once the store does. The shell's answer is tested end to end in
tests/integration/test_msgbus_store_errors.py."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from services.msgbus import store as store_mod
from services.msgbus.engine import MessageEngine
from services.msgbus.store import MessageStore

from .test_msgbus_helpers import Net, ip, payload

A, B = ip(1), ip(2)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Another connection holds the write lock: every write of the store fails with
    'database is locked' after its busy timeout."""
    other = sqlite3.connect(str(path), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


@pytest.fixture(autouse=True)
def short_busy_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "BUSY_TIMEOUT", 0.05)


def engine(addr: bytes, path: Path | None, seed: int) -> MessageEngine:
    store = MessageStore(path, synchronous="NORMAL") if path is not None else None
    return MessageEngine(addr, 0.0, wall_now=1_700_000_000.0, rng=random.Random(seed), store=store)


def test_push_on_a_locked_store_fails_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    a = engine(A, path, 1)
    kept = a.push(B, b"t", payload(100), 0.0)
    depths = a.queue_depths()
    a.packets_to_send()
    with locked(path), pytest.raises(sqlite3.OperationalError, match="locked"):
        a.push(B, b"t", payload(200), 0.0)
    assert a.queue_depths() == depths
    assert a.packets_to_send() == []  # nothing of the refused message goes out
    again = a.push(B, b"t", payload(200), 0.0)  # the store works again: so does push
    assert a.status(kept, 0.0) is not None and a.status(again, 0.0) is not None
    reborn = engine(A, path, 1)  # both accepted messages are in the store, nothing else
    assert reborn.status(kept, 0.0) is not None and reborn.status(again, 0.0) is not None
    assert reborn.queue_depths() == a.queue_depths()


def test_pop_on_a_locked_store_keeps_the_message(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    net = Net(seed=3, delay=(0.005, 0.02), keep_log=False)
    a = net.add(engine(A, None, 1))
    b = net.add(engine(B, path, 2))
    sent = a.push(B, b"topic", payload(3000), 0.0)
    assert net.run(10.0, lambda: b.inbox_size() == 1)
    with locked(path), pytest.raises(sqlite3.OperationalError):
        b.pop(None, False, net.now)
    assert b.inbox_size() == 1
    assert b.pop(None, True, net.now).id == sent  # peek needs no write
    popped = b.pop(None, False, net.now)
    assert popped.id == sent and popped.data == payload(3000)
    assert engine(B, path, 2).inbox_size() == 0  # the pop that worked is durable


def test_a_failed_commit_leaves_no_transaction_open(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    s = MessageStore(path, synchronous="NORMAL")
    with locked(path), pytest.raises(sqlite3.OperationalError):
        s.save_topic_config({"x": 1})
    assert not s._db.in_transaction
    s.save_topic_config({"x": 2})
    assert s.load_topic_config() == {"x": 2}
