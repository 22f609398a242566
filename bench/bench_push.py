"""Latency of a message from one --no-tun node's HTTP push to the receiving
application on another: pushed over the JSON-RPC WebSocket
(``subscribeMessages``) against a waiting HTTP long-poll (``GET
/api/v1/messages?timeout=``), one message in flight at a time, same run.

Run: .venv/bin/python bench/bench_push.py [--count N]
Every loop is bounded in count and time; nodes are stopped at the end.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from websockets.sync.client import connect

from tests.integration.nodes import Node, wait_for

TIME_LIMIT = 120.0


def post(sender: Node, receiver: Node, text: str) -> None:
    body = json.dumps({"dst": {"ip": receiver.address}, "payload": base64.b64encode(text.encode()).decode()})
    req = urllib.request.Request(
        f"http://127.0.0.1:{sender.api_port}/api/v1/messages", data=body.encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 201


def measure(sender: Node, receiver: Node, count: int, wait_one: Callable[[], str]) -> list[float]:
    """Send one message, time until ``wait_one`` (already waiting in a thread) returns it."""
    samples: list[float] = []
    deadline = time.monotonic() + TIME_LIMIT
    for i in range(count):
        if time.monotonic() > deadline:
            break
        got: list[str] = []
        waiter = threading.Thread(target=lambda out=got: out.append(wait_one()))
        waiter.start()
        time.sleep(0.05)  # let the waiter's request reach the node first: we time delivery, not set-up
        t0 = time.monotonic()
        post(sender, receiver, f"probe {i}")
        waiter.join(30)
        if got and got[0] == f"probe {i}":
            samples.append(time.monotonic() - t0)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=50, help="messages per method")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bp") as tmp:
        a, b = Node(Path(tmp), "a"), Node(Path(tmp), "b")
        b.peers = [a.endpoint]
        try:
            for n in (a, b):
                n.start()
            for n in (a, b):
                n.wait_ready()
            wait_for("route A->B", lambda: a.lookup(b.address), 30)

            def long_poll() -> str:
                url = f"http://127.0.0.1:{b.api_port}/api/v1/messages?timeout=20"
                with urllib.request.urlopen(url, timeout=30) as resp:
                    return base64.b64decode(json.loads(resp.read())["payload"]).decode()

            with connect(f"ws://127.0.0.1:{b.rpc_port}/") as ws:
                ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "subscribeMessages"}))
                assert "result" in json.loads(ws.recv(timeout=10))

                def pushed() -> str:
                    doc = json.loads(ws.recv(timeout=20))
                    return base64.b64decode(doc["params"]["result"]["payload"]).decode()

                push_samples = measure(a, b, args.count, pushed)
            poll_samples = measure(a, b, args.count, long_poll)
        finally:
            a.stop()
            b.stop()
    print(f"{'delivery':<28} {'n':>4} {'p50 ms':>8} {'p90 ms':>8} {'max ms':>8}")
    for name, s in (("WebSocket push", push_samples), ("HTTP long-poll (baseline)", poll_samples)):
        s = sorted(s)
        p90 = s[int(len(s) * 0.9) - 1] if s else float("nan")
        print(f"{name:<28} {len(s):>4} {statistics.median(s) * 1e3:>8.1f} {p90 * 1e3:>8.1f} {s[-1] * 1e3:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
