"""API figures on a real --no-tun node (docs/PERFORMANCE.md, ## API).

Run: ``.venv/bin/python bench/bench_api.py [--routes 1000] [--requests 2000]
[--load-seconds 10] [--clients 4] [--rate 4000]``

1. A node is started on loopback (tests/integration/nodes.py). A fake
   neighbour connects to its TCP port and speaks the wire protocol: it
   answers Hellos with IHUs (so the link stays up) and announces
   ``--routes`` Updates, each for the /64 of a fresh random public key with
   a router id that owns it, so the router accepts and selects all of them.
   No test-only code path in the node: the routes arrive the way a real
   neighbour's do.
2. Latency: ``--requests`` sequential ``GET /api/v1/admin/routes/selected``
   on one keep-alive connection (each answer holds every route) -> p50/p99.
3. Load with traffic: the fake neighbour sends data packets at ``--rate``
   packets/s to one of its own announced subnets; the node's peerd forwards
   each back over the same link and the fake neighbour counts what returns.
   Throughput is measured for ``--load-seconds`` without API load, then for
   ``--load-seconds`` while ``--clients`` load processes (one keep-alive
   connection each) loop ``GET /api/v1/admin``; the report gives requests/s
   and the data-path throughput of both windows.
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing as mp
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.identity import address_of, subnet_of
from common.wire.packet import ControlPacket, DataPacket, StreamDecoder
from common.wire.tlv import Hello, Ihu, Update
from tests.integration.nodes import Node, wait_for

UPDATE_INTERVAL_CS = 30_000  # the announced routes hold for minutes
PAYLOAD = 1000


class FakeNeighbour:
    """One TCP link into the node, driven by hand."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(None)
        self.lock = threading.Lock()
        self.data_received = 0
        self.closed = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def send(self, data: bytes) -> None:
        with self.lock:
            self.sock.sendall(data)

    def _read(self) -> None:
        decoder = StreamDecoder()
        try:
            while True:
                chunk = self.sock.recv(1 << 18)
                if not chunk:
                    break
                for pkt in decoder.feed(chunk):
                    if isinstance(pkt, DataPacket):
                        self.data_received += 1
                    elif isinstance(pkt.tlv, Hello):  # keep the link alive (IHU answers Hello)
                        self.send(ControlPacket(Ihu(0, 6000, None)).encode())
        except OSError:
            pass
        self.closed = True

    def announce(self, count: int) -> list[bytes]:
        """``count`` Updates, each for the /64 of a random key it owns; returns the subnets' prefixes."""
        self.send(ControlPacket(Hello(0, 0, 2000)).encode())
        prefixes = []
        batch = bytearray()
        for _ in range(count):
            pk = os.urandom(32)
            subnet = subnet_of(address_of(pk))
            batch += ControlPacket(Update(0, UPDATE_INTERVAL_CS, 0, 10, subnet, pk + os.urandom(8))).encode()
            prefixes.append(subnet.address.packed[:8])
            if len(batch) > 64 * 1024:
                self.send(bytes(batch))
                batch.clear()
        if batch:
            self.send(bytes(batch))
        return prefixes

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def latency(port: int, path: str, count: int) -> tuple[list[float], int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    times: list[float] = []
    size = 0
    for _ in range(count):
        t0 = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        times.append(time.perf_counter() - t0)
        assert resp.status == 200, resp.status
        size = len(body)
    conn.close()
    return times, size


def load_worker(port: int, path: str, seconds: float, out: Any) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    done = errors = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                done += 1
            else:
                errors += 1
        except (OSError, http.client.HTTPException):
            errors += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    out.put((done, errors))


class Traffic:
    """Paced data packets from the fake neighbour to one of its own subnets (echoed by the node)."""

    def __init__(self, peer: FakeNeighbour, prefix: bytes, rate: float) -> None:
        self.peer = peer
        src = bytes.fromhex("04") + os.urandom(15)
        frame = DataPacket(src, prefix + os.urandom(8), 64, os.urandom(PAYLOAD)).encode()
        self.batch_size = 20
        self.batch = frame * self.batch_size
        self.rate = rate
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Traffic:
        self.thread.start()
        return self

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.is_set():
            due = t0 + (self.sent + self.batch_size) / self.rate
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                self.peer.send(self.batch)
            except OSError:  # the link closed (end of the run)
                return
            self.sent += self.batch_size

    def window(self, seconds: float) -> tuple[float, float]:
        """(offered, delivered) packets/s over the next ``seconds``."""
        s0, r0, t0 = self.sent, self.peer.data_received, time.monotonic()
        time.sleep(seconds)
        s1, r1, t1 = self.sent, self.peer.data_received, time.monotonic()
        return (s1 - s0) / (t1 - t0), (r1 - r0) / (t1 - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routes", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--load-seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rate", type=float, default=4000.0, help="offered data packets/s")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="bapi"))
    node = Node(base, "n")
    peer: FakeNeighbour | None = None
    traffic: Traffic | None = None
    try:
        node.start().wait_ready()
        peer = FakeNeighbour(node.tcp_port)
        wait_for("the fake neighbour's link", lambda: node.alive_peers() == 1, 20)
        t0 = time.monotonic()
        prefixes = peer.announce(args.routes)
        wait_for(
            f"{args.routes} selected routes",
            lambda: len(node.api("/api/v1/admin/routes/selected", timeout=10)) >= args.routes,
            60,
            interval=0.5,
        )
        print(f"{args.routes} routes selected {time.monotonic() - t0:.2f} s after the Updates were sent")

        latency(node.api_port, "/api/v1/admin/routes/selected", 50)  # warm up
        times, size = latency(node.api_port, "/api/v1/admin/routes/selected", args.requests)
        ms = [t * 1000 for t in times]
        print(
            f"GET /api/v1/admin/routes/selected, {args.routes} routes ({size} bytes), {args.requests} sequential: "
            f"p50 {percentile(ms, 50):.2f} ms  p99 {percentile(ms, 99):.2f} ms  mean {statistics.fmean(ms):.2f} ms"
        )
        times, _ = latency(node.api_port, "/api/v1/admin", args.requests)
        ms = [t * 1000 for t in times]
        print(f"GET /api/v1/admin sequential: p50 {percentile(ms, 50):.2f} ms  p99 {percentile(ms, 99):.2f} ms")

        traffic = Traffic(peer, prefixes[0], args.rate).start()
        time.sleep(2)  # let the FIB copy and the queues settle
        offered0, base_rate = traffic.window(args.load_seconds)
        print(f"data path, no API load: offered {offered0:.0f} pkt/s, forwarded back {base_rate:.0f} pkt/s")

        queue: Any = mp.Queue()
        workers = [
            mp.Process(target=load_worker, args=(node.api_port, "/api/v1/admin", args.load_seconds, queue))
            for _ in range(args.clients)
        ]
        for w in workers:
            w.start()
        offered1, load_rate = traffic.window(args.load_seconds)
        results = [queue.get(timeout=args.load_seconds + 30) for _ in workers]
        for w in workers:
            w.join(10)
        done = sum(r[0] for r in results)
        errors = sum(r[1] for r in results)
        print(
            f"GET /api/v1/admin, {args.clients} keep-alive clients for {args.load_seconds:.0f} s: "
            f"{done / args.load_seconds:.0f} requests/s ({errors} errors)"
        )
        change = (load_rate - base_rate) / base_rate * 100 if base_rate else float("nan")
        print(
            f"data path under API load: offered {offered1:.0f} pkt/s, forwarded back {load_rate:.0f} pkt/s "
            f"({change:+.1f}% vs no load)"
        )
        peerd = node.counters("peerd-tcp")
        lost = {k: v for k, v in peerd.items() if "drop" in k or "full" in k}
        print(f"peerd: data_rx {peerd.get('data_rx', 0)}, forwarded {peerd.get('data_forwarded', 0)}, lost {lost}")
        if peer.closed:
            print("the node closed the fake neighbour's link")
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
        return 0
    finally:
        if traffic is not None:
            traffic.stop.set()
        if peer is not None:
            peer.close()
        node.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
