"""Leases for push subscribers (MessageEngine.lease/ack/release): a leased
message is nobody else's until it lapses or is released, is removed (and
read) only when acked, and comes back after a crash between delivery and ack."""

from __future__ import annotations

from pathlib import Path

from .test_msgbus_helpers import Net
from .test_msgbus_store import A, B, crash, engine


def delivered(tmp_path: Path | None, topics: list[bytes]) -> tuple[Net, object, object]:
    net = Net(seed=7, delay=(0.005, 0.01), keep_log=False)
    a = net.add(engine(A, None, 0.0, seed=1))
    b = net.add(engine(B, None if tmp_path is None else tmp_path / "b.db", 0.0, seed=2))
    sent = [a.push(B, t, f"m{i}".encode(), 0.0) for i, t in enumerate(topics)]
    assert net.run(10.0, lambda: all(a.status(i, net.now)["state"] == "received" for i in sent))
    return net, a, b


def test_a_leased_message_is_held_then_acked() -> None:
    net, a, b = delivered(None, [b"x", b"y"])
    m, lease = b.lease(None, 30.0, net.now)
    assert lease
    other = b.pop(None, True, net.now)
    assert other.id != m.id  # the leased one is invisible to pop and peek
    assert b.lease(m.topic, 30.0, net.now) is None  # and to other subscribers
    assert b.inbox_size() == 2
    assert b.ack(m.seq, lease) is True
    assert b.inbox_size() == 1
    assert b.ack(m.seq, lease) is False  # once only
    net.run(net.now + 1.0)
    sent_id = m.id
    assert a.status(sent_id, net.now)["state"] == "read"  # the READ goes out on ack


def test_a_lapsed_or_released_lease_lets_others_have_it() -> None:
    net, _, b = delivered(None, [b"x"])
    m, lease = b.lease(None, 5.0, net.now)
    assert b.pop(None, False, net.now + 4.9) is None
    again, second = b.lease(None, 5.0, net.now + 5.0)  # lapsed: someone else may have it
    assert again.id == m.id and second != lease
    assert b.ack(m.seq, lease) is False  # the first holder's ack is stale
    assert b.release(m.seq, second) is True
    assert b.pop(None, False, net.now + 5.0).id == m.id  # released: poppable at once
    assert b.release(m.seq, second) is False and b.ack(m.seq, second) is False


def test_release_all_frees_every_lease() -> None:
    net, _, b = delivered(None, [b"x", b"y", b"z"])
    held = [b.lease(None, 60.0, net.now) for _ in range(3)]
    assert all(h is not None for h in held) and b.lease(None, 60.0, net.now) is None
    assert b.release_all() == 3
    assert sorted(b.pop(None, False, net.now).data for _ in range(3)) == [b"m0", b"m1", b"m2"]


def test_a_crash_before_ack_delivers_again(tmp_path: Path) -> None:
    net, _, b = delivered(tmp_path, [b"x", b"y"])
    m, lease = b.lease(None, 60.0, net.now)
    b = crash(net, B, tmp_path / "b.db", seed=2)  # leases live in memory only
    again, _ = b.lease(None, 60.0, net.now)
    assert again.id == m.id and again.data == m.data
    assert b.ack(again.seq, lease) is False  # a lease from before the crash means nothing now
    m2, lease2 = b.lease(None, 60.0, net.now)
    assert b.ack(m2.seq, lease2) is True
    b = crash(net, B, tmp_path / "b.db", seed=2)
    assert b.pop(None, False, net.now).id == again.id  # the acked one stays gone, the other is back
    assert b.pop(None, False, net.now) is None
