"""QUIC link benchmark: a QUIC link against a TCP link, in one run.

    sudo .venv/bin/python bench/bench_quic.py [--seconds 5] [--packets 3000]

1. In process, no root: two QUIC endpoints (services/peerd/links/
   quic_endpoint.py) wired in memory. CPU microseconds per data packet on
   the sending side (aioquic builds and seals one QUIC packet per
   datagram) and on the receiving side (opens it, one event per DATAGRAM
   frame), for 1422-byte packets (the largest that fit one datagram) and
   for 1468-byte packets (a full 1400-byte TUN packet: too big for a
   datagram, so it goes on the control stream). What aioquic forces per
   packet, measured.
2. QUIC handshake time: in memory (CPU only) and between two QuicFactory
   sockets on loopback (median of 5).
3. With root: four network namespaces, q1-q2 linked over QUIC only and
   t1-t2 over TCP only, each pair on its own veth: a single-stream iperf3
   over each, user+system CPU seconds per GB of the nodes' processes, and
   the idle RTT (20 pings).

Prints markdown; docs/PERFORMANCE.md records one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_dataplane import Result, machine, measure, warm  # noqa: E402

from common.endpoint import Endpoint  # noqa: E402
from common.nodeconfig import NodeConfig  # noqa: E402
from common.wire.packet import ControlPacket, DataPacket  # noqa: E402
from common.wire.tlv import Hello  # noqa: E402
from services.peerd.links.quic import QuicFactory  # noqa: E402
from services.peerd.links.quic_endpoint import (  # noqa: E402
    DataIn,
    LinkUp,
    QuicEndpoint,
    QuicLinkConn,
    server_configuration,
)
from tests.integration.netns import NODE_PORT, Topology, cleanup_stale, have_privileges  # noqa: E402

A = ("::ffff:10.0.0.1", 9651)
B = ("::ffff:10.0.0.2", 9651)


def packet(size: int) -> bytes:
    return DataPacket(b"\x04" + bytes(15), b"\x05" + bytes(15), 64, os.urandom(size - 40)).encode()


class Pair:
    """Two endpoints in memory; CPU time spent on each side."""

    def __init__(self) -> None:
        self.now = 0.0
        self.a = QuicEndpoint(server_configuration(os.urandom(32)), Counter())
        self.b = QuicEndpoint(server_configuration(os.urandom(32)), Counter())
        self.cpu = {"a": 0.0, "b": 0.0}
        self.received = 0

    def move(self, src: QuicEndpoint, dst: QuicEndpoint, src_addr: tuple[str, int], side: str) -> int:
        t0 = time.process_time()
        out = src.transmit(self.now)
        t1 = time.process_time()
        n = 0
        for group, _ in out:
            for data in group:
                dst.receive(data, src_addr, self.now)
                n += 1
        dst.flush_received()
        for e in dst.events:
            if isinstance(e, DataIn):
                self.received += len(e.offsets)
        dst.events.clear()
        t2 = time.process_time()
        self.cpu[side] += t1 - t0
        self.cpu["b" if side == "a" else "a"] += t2 - t1
        return n

    def pump(self) -> None:
        """Until quiet: pacing and ACK timers are followed, idle ones not."""
        for _ in range(100_000):
            self.now += 0.0001
            moved = self.move(self.a, self.b, A, "a") + self.move(self.b, self.a, B, "b")
            timers = [t for t in (self.a.next_timer(), self.b.next_timer()) if t is not None]
            if not moved:
                soon = [t for t in timers if t <= self.now + 0.05]
                if not soon:
                    return
                self.now = max(self.now, min(soon))
            for side, ep in (("a", self.a), ("b", self.b)):
                timer = ep.next_timer()
                if timer is not None and timer <= self.now:
                    t0 = time.process_time()
                    ep.handle_timer(self.now)
                    self.cpu[side] += time.process_time() - t0


def handshake_in_memory() -> tuple[Pair, QuicLinkConn, float]:
    pair = Pair()
    t0 = time.process_time()
    conn = pair.a.dial(B, pair.now)
    pair.pump()
    pair.a.send_control(conn, ControlPacket(Hello(0, 1, 2000)).encode())
    pair.pump()
    cpu = time.process_time() - t0
    assert any(isinstance(e, LinkUp) for e in pair.a.events) or conn.up
    return pair, conn, cpu


def per_packet(size: int, count: int) -> tuple[float, float, int]:
    """Sender and receiver CPU microseconds per packet of ``size`` bytes."""
    pair, conn, _ = handshake_in_memory()
    blob = packet(size)
    pair.cpu = {"a": 0.0, "b": 0.0}
    pair.received = 0
    batch = 64
    for _ in range(count // batch):
        t0 = time.process_time()
        pair.a.send_data(conn, blob * batch)
        pair.cpu["a"] += time.process_time() - t0
        pair.pump()
    sent = (count // batch) * batch
    return 1e6 * pair.cpu["a"] / sent, 1e6 * pair.cpu["b"] / sent, pair.received


async def handshake_loopback(tmp: Path, rounds: int = 5) -> list[float]:
    class Host:
        counters: Counter[str] = Counter()

        def on_control(self, *a: object) -> None: ...
        def on_data(self, *a: object) -> None: ...
        def on_closed(self, *a: object) -> None: ...

        def accepted(self, link: object) -> None:
            link.start()  # type: ignore[attr-defined]

        def spawn(self, coro: object, name: str) -> object:
            return asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]

    times = []
    for i in range(rounds):
        keys = []
        for side in ("a", "b"):
            key = tmp / f"{side}{i}.key"
            key.write_bytes(os.urandom(32))
            keys.append(NodeConfig(run_dir=str(tmp), key_file=str(key), quic_listen_port=0))
        fa, fb = QuicFactory(keys[0], Host()), QuicFactory(keys[1], Host())  # type: ignore[arg-type]
        await fa.listen()
        await fb.listen()
        t0 = time.perf_counter()
        link = await fb.dial(Endpoint.parse(f"quic://127.0.0.1:{fa.local[1]}"))
        times.append(time.perf_counter() - t0)
        link.close("done")
        await fa.close()
        await fb.close()
    return times


def netns_pairs(seconds: int) -> list[Result]:
    cleanup_stale()
    topo = Topology(["q1", "q2", "t1", "t2"])
    try:
        q1, _ = topo.connect("q1", "q2", 1)
        t1, _ = topo.connect("t1", "t2", 2)
        topo.add_node("q1")
        topo.add_node("q2", peers=[f"quic://{q1}:{NODE_PORT}"])
        topo.add_node("t1", extra=["--disable-quic"])
        topo.add_node("t2", peers=[f"tcp://{t1}:{NODE_PORT}"], extra=["--disable-quic"])
        topo.start_all()
        out = []
        for src, dst, name in (("q2", "q1", "one QUIC link"), ("t2", "t1", "one TCP link")):
            addr = topo.nodes[dst].address
            warm(topo, src, addr)
            print(f"iperf3 over {name} ...", flush=True)
            res = measure(topo, src, dst, addr, seconds, Result(name))
            print(f"    {res.gbit * 1000:.0f} Mbit/s, {res.per_gb(res.proc_cpu):.1f} s/GB", flush=True)
            out.append(res)
            if name == "one QUIC link":
                for node in (src, dst):
                    c = topo.nodes[node].rpc("peerd-quic", "stats")["counters"]
                    shown = [f"{k}={v}" for k, v in sorted(c.items()) if "quic" in k or "drop" in k or "full" in k]
                    print(f"    {node} peerd-quic: {', '.join(shown)}")
        return out
    finally:
        topo.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="iperf3 duration (default 5)")
    parser.add_argument("--packets", type=int, default=3000, help="packets per in-memory measurement")
    parser.add_argument("--no-netns", action="store_true", help="skip the namespace iperf3 part")
    args = parser.parse_args()
    print(f"machine: {machine()}", flush=True)
    print()
    print("| in memory, per data packet | sender CPU us | receiver CPU us | delivered |")
    print("|---|---|---|---|")
    for size, what in ((1422, "1422 B, one DATAGRAM frame each"), (1468, "1468 B, on the stream (too big)")):
        tx, rx, got = per_packet(size, args.packets)
        print(f"| {what} | {tx:.1f} | {rx:.1f} | {got}/{args.packets // 64 * 64} |", flush=True)
    _, _, hs_cpu = handshake_in_memory()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        loop_times = asyncio.run(handshake_loopback(Path(tmp)))
    print()
    print(f"QUIC handshake: {hs_cpu * 1000:.1f} ms CPU in memory (both sides); "
          f"{statistics.median(loop_times) * 1000:.1f} ms on loopback UDP (median of {len(loop_times)}, "
          f"min {min(loop_times) * 1000:.1f})")  # fmt: skip
    if args.no_netns:
        return 0
    problem = have_privileges()
    if problem:
        print(f"namespace part skipped: {problem}")
        return 0
    results = netns_pairs(args.seconds)
    print()
    print(f"single-stream iperf3 TCP, {args.seconds} s, over one link between two namespaces (same run)")
    print()
    print("| link | Mbit/s | retransmits | idle RTT ms | proc CPU s/GB | sys CPU s/GB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.name} | {r.gbit * 1000:.0f} | {r.retransmits} | {r.rtt_ms:.3f} | "
            f"{r.per_gb(r.proc_cpu):.1f} | {r.per_gb(r.sys_cpu):.1f} |"
        )
    print(f"\nload average after the run: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
