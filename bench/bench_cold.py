"""What the data path's C calls cost cold: each after an idle spell, as an
idle ping meets them, against back to back.

Why: on a shared VM a process that sleeps finds its code and data out of
the caches when it wakes, so an idle round trip costs what each call
touches, not what it computes (docs/PERFORMANCE.md, sessions 17 and 18).
This measures one packet through the calls of a wake-up in one process:
tund's ``from_tun`` (seal), ``from_peer`` with the GRO flush (open), the
hand-over into a ring and its announcement, and the consumer's drain.

Usage: .venv/bin/python bench/bench_cold.py [--calls 15] [--sleep 0.3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import native
from common.datapath import DataIn, DataOut, hand_over
from common.fib import FibReplica
from common.identity import Identity
from services.tund.dataplane import DataPlane, KeyCache
from services.tund.tun import VNET_HDR_SIZE

NOW = 1000.0


def plane(me: Identity, peer: Identity, hop: str) -> DataPlane:
    fib = FibReplica()
    fib.load_snapshot(
        {"epoch": 1, "seq": 0, "entries": [[peer.address.packed[:8] + bytes(8), 64, hop, peer.public_key]]}
    )
    return DataPlane(me, fib, KeyCache(me.private_key), tun=True, vnet=True)


def tcp(src: Identity, dst: Identity, payload: bytes) -> bytes:
    head = struct.pack("!HHIIBBHHH", 5000, 443, 1, 77, 5 << 4, 0x18, 512, 0, 0)
    ip = struct.pack("!IHBB", 0x60000000, 20 + len(payload), 6, 64)
    return ip + src.address.packed + dst.address.packed + head + payload


def timed(step: Callable[[], object], calls: int, sleep: float) -> tuple[float, float]:
    """Median µs of one call after ``sleep`` seconds idle, and back to back."""
    cold, hot = [], []
    for _ in range(calls):
        time.sleep(sleep)
        t = time.perf_counter_ns()
        step()
        cold.append(time.perf_counter_ns() - t)
    for _ in range(calls * 10):
        t = time.perf_counter_ns()
        step()
        hot.append(time.perf_counter_ns() - t)
    return statistics.median(cold) / 1e3, statistics.median(hot) / 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=15, help="cold calls per step (default 15)")
    parser.add_argument("--sleep", type=float, default=0.3, help="idle seconds before each (default 0.3)")
    args = parser.parse_args()
    me, peer = Identity.from_secret(bytes([1]) * 32), Identity.from_secret(bytes([2]) * 32)
    tx, rx = plane(me, peer, "tcp-1"), plane(peer, me, "tcp-2")
    pkt = bytes(VNET_HDR_SIZE) + tcp(me, peer, bytes(56))  # a ping's size
    tx.from_tun([pkt], NOW)
    frames = tx.take_out()["tcp-1"]
    run = tempfile.mkdtemp(prefix="bench-cold-")
    conns: list[int] = []
    din = DataIn(run, "peerd-tcp", "-to-peerd-tcp", lambda fd, add: conns.append(fd) if add else None)
    dout = DataOut(run, "tund-to-peerd-tcp", "peerd-tcp")
    try:
        assert dout.send(b"hello", b"") is None
        list(din.receive(din.listener.fileno()))
        conn = next(iter(din.conns))
        din.drain(conn, lambda _t, _v: None)

        def seal() -> None:
            tx.from_tun([pkt], NOW)
            tx.take_out()

        def open_() -> None:
            rx.from_peer(frames, NOW)
            rx.gro.flush()

        def give() -> None:
            hand_over({"tcp-1": [frames]}, {"tcp": dout}, 1 << 20)

        def take() -> None:
            din.drain(conn, lambda _t, _v: None)

        python = sys.version.split()[0]
        print(f"{native.describe()}; {args.calls} calls, {args.sleep} s idle before each; Python {python}")
        print("| step | cold µs (median) | back to back µs |")
        print("|---|---:|---:|")
        for name, step in (("from_tun (seal one packet)", seal), ("from_peer + GRO flush", open_)):
            cold, hot = timed(step, args.calls, args.sleep)
            print(f"| {name} | {cold:.1f} | {hot:.1f} |")
        cold_give, cold_take = [], []
        for _ in range(args.calls):  # each hand-over drained, so the ring never fills
            time.sleep(args.sleep)
            t = time.perf_counter_ns()
            give()
            cold_give.append(time.perf_counter_ns() - t)
            time.sleep(args.sleep)
            t = time.perf_counter_ns()
            take()
            cold_take.append(time.perf_counter_ns() - t)
        print(f"| hand_over (ring + record) | {statistics.median(cold_give) / 1e3:.1f} | |")
        print(f"| drain (record + ring release) | {statistics.median(cold_take) / 1e3:.1f} | |")
    finally:
        dout.close()
        din.close()
        for f in os.listdir(run):
            os.unlink(os.path.join(run, f))
        os.rmdir(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
