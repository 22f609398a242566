"""Message throughput between two --no-tun nodes on loopback, through the
public HTTP API (what an application sees): messages/s for 1 KiB messages
and MB/s for 1 MiB messages, from the first push to the last pop.

Run: .venv/bin/python bench/bench_messages.py [--small N] [--large N]
Every loop is bounded in count and time; nodes are stopped at the end.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.nodes import Node, wait_for

CLIENT_THREADS = 8
TIME_LIMIT = 300.0


def post(node: Node, body: bytes) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{node.api_port}/api/v1/messages", data=body, method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 201


def pop_all(node: Node, count: int, deadline: float) -> int:
    got = 0
    while got < count and time.monotonic() < deadline:
        url = f"http://127.0.0.1:{node.api_port}/api/v1/messages?timeout=2"
        with urllib.request.urlopen(url, timeout=30) as resp:
            if resp.status == 200:
                json.loads(resp.read())
                got += 1
    return got


def run(sender: Node, receiver: Node, count: int, size: int) -> tuple[float, int]:
    payload = base64.b64encode(os.urandom(size)).decode()
    body = json.dumps({"dst": {"ip": receiver.address}, "payload": payload, "topic": "YmVuY2g="}).encode()
    received: list[int] = []
    t0 = time.monotonic()
    deadline = t0 + TIME_LIMIT
    popper = threading.Thread(target=lambda: received.append(pop_all(receiver, count, deadline)))
    popper.start()
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        list(pool.map(lambda _: post(sender, body), range(count)))
    popper.join(TIME_LIMIT)
    return time.monotonic() - t0, received[0] if received else 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=2000, help="number of 1 KiB messages")
    parser.add_argument("--large", type=int, default=40, help="number of 1 MiB messages")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bm") as tmp:
        a, b = Node(Path(tmp), "a"), Node(Path(tmp), "b")
        b.peers = [a.endpoint]
        try:
            for n in (a, b):
                n.start()
            for n in (a, b):
                n.wait_ready()
            wait_for("A-B link", lambda: a.alive_peers() == 1, 30)
            wait_for("route A->B", lambda: a.lookup(b.address), 30)
            rows = []
            elapsed, got = run(a, b, args.small, 1024)
            rows.append(
                (
                    "1 KiB messages",
                    got,
                    elapsed,
                    f"{got / elapsed:,.0f} msg/s",
                    f"{got * 1024 / elapsed / 1e6:.2f} MB/s",
                )
            )
            elapsed, got = run(a, b, args.large, 1 << 20)
            rows.append(
                (
                    "1 MiB messages",
                    got,
                    elapsed,
                    f"{got / elapsed:,.1f} msg/s",
                    f"{got * (1 << 20) / elapsed / 1e6:.1f} MB/s",
                )
            )
        finally:
            a.stop()
            b.stop()
    print(f"{'workload':<16} {'delivered':>9} {'seconds':>8} {'rate':>14} {'payload':>12}")
    for name, got, elapsed, rate, mbps in rows:
        print(f"{name:<16} {got:>9} {elapsed:>8.2f} {rate:>14} {mbps:>12}")
    print(
        "reference limits (PROTOCOL.md 7, API.md 2): 1300-byte chunks, retransmission tick 100 ms, "
        "no send window (all chunks at once), 2 MiB HTTP body limit, unbounded inbox"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
