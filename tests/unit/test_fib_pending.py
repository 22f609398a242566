from __future__ import annotations

import ipaddress

from common.fib import FibReplica
from common.pending import PendingQueue


def addr(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


def snapshot(seq: int, entries: list[tuple[str, int, str | None]], epoch: int = 7) -> dict[str, object]:
    return {"epoch": epoch, "seq": seq, "entries": [[addr(n), p, h, bytes(32)] for n, p, h in entries]}


def test_longest_prefix_and_deltas() -> None:
    fib = FibReplica()
    fib.load_snapshot(snapshot(3, [("400:1:2:3::", 64, "tcp-a-1"), ("400:1:2:3::1", 128, "tcp-a-2")]))
    assert fib.lookup(addr("400:1:2:3::1")).next_hop == "tcp-a-2"
    assert fib.lookup(addr("400:1:2:3::9")).next_hop == "tcp-a-1"
    assert fib.lookup(addr("400:1:2:4::9")) is None
    # an old delta is ignored, the next one applies, a gap asks for a snapshot
    assert fib.apply_delta({"epoch": 7, "seq": 2, "set": [[addr("400:9::"), 64, "x", bytes(32)]]})
    assert fib.lookup(addr("400:9::1")) is None
    assert fib.apply_delta({"epoch": 7, "seq": 4, "del": [[addr("400:1:2:3::1"), 128]]})
    assert fib.lookup(addr("400:1:2:3::1")).next_hop == "tcp-a-1"
    assert not fib.apply_delta({"epoch": 7, "seq": 6, "set": []})
    assert not fib.apply_delta({"epoch": 8, "seq": 5, "set": []})
    assert len(fib) == 1


def test_pending_queue_is_bounded_and_expires() -> None:
    q: PendingQueue[int] = PendingQueue(per_subnet=2, total=3, timeout=15)
    assert q.push(b"a" * 8, 1, now=0) is True  # first packet: ask for a route
    assert q.push(b"a" * 8, 2, now=0) is False
    assert q.push(b"a" * 8, 3, now=0) is False  # per-subnet cap
    assert q.push(b"b" * 8, 4, now=1) is True
    assert q.push(b"c" * 8, 5, now=1) is False  # total cap
    assert q.drops["pending_full"] == 2
    assert q.pop(b"a" * 8) == [1, 2]
    assert q.expire(now=15.5) == []
    assert q.expire(now=16) == [4]
    assert len(q) == 0
