"""JSON-RPC over WebSocket on the JSON-RPC port and pushed messages
(services/apid/websocket.py), across real --no-tun nodes on loopback."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from .nodes import MYCELIUM, REPO, Node, wait_for
from .test_messages import line, pop, push, status_of

pytestmark = pytest.mark.integration


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Subscriber:
    """A WebSocket client that keeps every notification it is sent."""

    def __init__(self, node: Node) -> None:
        self.stack = contextlib.ExitStack()
        self.ws: ClientConnection = self.stack.enter_context(
            connect(f"ws://127.0.0.1:{node.rpc_port}/", open_timeout=10)
        )
        self.next_id = 0
        self.answers: dict[int, Any] = {}
        self.notes: list[dict[str, Any]] = []
        self.lock = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            for raw in self.ws:
                doc = json.loads(raw)
                with self.lock:
                    if isinstance(doc, dict) and doc.get("id") is not None:
                        self.answers[doc["id"]] = doc
                    else:
                        self.notes.append(doc)
                    self.lock.notify_all()
        except (ConnectionClosed, OSError):
            pass

    def call(self, method: str, params: Any = None, timeout: float = 10) -> dict[str, Any]:
        self.next_id += 1
        rid = self.next_id
        req: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            req["params"] = params
        self.ws.send(json.dumps(req))
        with self.lock:
            assert self.lock.wait_for(lambda: rid in self.answers, timeout), f"no answer to {method}"
            return self.answers.pop(rid)

    def messages(self, sub_id: int | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [
                n["params"]["result"]
                for n in self.notes
                if n.get("method") == "messageReceived" and (sub_id is None or n["params"]["subscription"] == sub_id)
            ]

    def close(self) -> None:
        self.stack.close()
        self.reader.join(5)


def two_nodes(make_nodes: Callable[..., list[Node]]) -> tuple[Node, Node]:
    a, b = line(make_nodes, 2)
    wait_for("routes both ways", lambda: b.subnet in a.selected() and a.subnet in b.selected(), 30)
    return a, b


def payload_of(m: dict[str, Any]) -> bytes:
    return base64.b64decode(m["payload"])


def test_http_post_and_websocket_share_the_port(make_nodes: Callable[..., list[Node]]) -> None:
    (node,) = make_nodes(1)
    node.start().wait_ready()
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "getInfo"}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{node.rpc_port}/", body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        over_http = json.loads(resp.read())
    sub = Subscriber(node)
    try:
        over_ws = sub.call("getInfo")
        assert over_ws["result"] == over_http["result"]
        assert over_ws["result"]["nodeSubnet"] == node.subnet
        # a batch, a notification (no answer) and a parse error, as over HTTP
        sub.ws.send(json.dumps([{"jsonrpc": "2.0", "id": 7, "method": "getPeers"}, {"jsonrpc": "2.0", "method": "x"}]))
        wait_for("the batch answer", lambda: sub.notes and sub.notes[-1], 5)
        batch = sub.notes.pop()
        assert isinstance(batch, list) and [a["id"] for a in batch] == [7] and batch[0]["result"] == []
        sub.ws.send("{not json")
        wait_for("the parse error", lambda: sub.notes and sub.notes[-1], 5)
        assert sub.notes.pop()["error"]["code"] == -32700
        assert sub.call("noSuchMethod")["error"]["code"] == -32601
        assert sub.call("unsubscribeMessages", [12345])["result"] is False
        assert sub.call("subscribeMessages", ["%%%"])["error"]["code"] == -32013  # topic not base64
        assert sub.call("subscribeMessageStatus", ["zz"])["error"]["code"] == -32020  # bad message id
    finally:
        sub.close()


def test_pushed_messages_arrive_exactly_once(make_nodes: Callable[..., list[Node]]) -> None:
    a, b = two_nodes(make_nodes)
    filtered, everything = Subscriber(b), Subscriber(b)
    try:
        only_t1 = filtered.call("subscribeMessages", [b64(b"t1")])["result"]
        anything = everything.call("subscribeMessages")["result"]
        assert isinstance(only_t1, int) and isinstance(anything, int)
        sent: dict[bytes, bytes] = {}
        ids = []
        for i in range(100):
            topic = (b"t1", b"t2", b"")[i % 3]
            data = f"message {i} ".encode() * (1 + i % 7)
            status, doc = push(a, b, data, topic or None)
            assert status == 201, doc
            sent[data] = topic
            ids.append(doc["id"])

        def all_in() -> bool:
            return len(filtered.messages()) + len(everything.messages()) >= 100

        wait_for("100 pushed messages", all_in, 60)
        time.sleep(1)  # anything beyond 100 would be a duplicate: give one a chance to show
        got = filtered.messages(only_t1) + everything.messages(anything)
        assert Counter(payload_of(m) for m in got) == Counter(sent.keys())  # each exactly once
        for m in filtered.messages(only_t1):
            assert base64.b64decode(m["topic"]) == b"t1"
        for m in got:
            assert m["srcIp"] == a.address and m["dstIp"] == b.address
            assert base64.b64decode(m.get("topic", "")) == sent[payload_of(m)]
        assert pop(b, timeout=1) is None  # pushed counts as popped
        # the sender sees its messages read
        wait_for("read receipts", lambda: all((status_of(a, i) or {}).get("state") == "read" for i in ids[:5]), 20)
        assert everything.call("unsubscribeMessages", [anything])["result"] is True
        assert everything.call("unsubscribeMessages", [anything])["result"] is False
        status, _ = push(a, b, b"after unsubscribe", b"t2")
        assert status == 201
        m = wait_for("the unsubscribed message by pop", lambda: pop(b, timeout=2), 20)
        assert payload_of(m) == b"after unsubscribe"
    finally:
        filtered.close()
        everything.close()


def test_message_status_is_pushed(make_nodes: Callable[..., list[Node]]) -> None:
    a, b = two_nodes(make_nodes)
    sub = Subscriber(a)
    try:
        status, doc = push(a, b, b"watch me")
        assert status == 201
        sid = sub.call("subscribeMessageStatus", [doc["id"]])["result"]
        assert pop(b, timeout=10) is not None

        def states() -> list[Any]:
            with sub.lock:
                return [n["params"]["result"]["state"] for n in sub.notes if n["params"]["subscription"] == sid]

        wait_for("a 'read' status notification", lambda: "read" in states(), 20)
        assert states()[-1] == "read"
    finally:
        sub.close()


@pytest.mark.parametrize("victim", ["msgbus", "apid"])
def test_kill_mid_stream_loses_nothing(make_nodes: Callable[..., list[Node]], victim: str) -> None:
    a, b = two_nodes(make_nodes)
    sub = Subscriber(b)
    seen: Counter[bytes] = Counter()
    try:
        sub.call("subscribeMessages")
        sent = [f"kill {victim} {i}".encode() for i in range(60)]
        for data in sent[:30]:
            assert push(a, b, data)[0] == 201
        wait_for("some messages pushed", lambda: len(sub.messages()) >= 5, 30)
        os.kill(b.program_pid(victim), signal.SIGKILL)
        for data in sent[30:]:
            wait_for("the push accepted", lambda d=data: push(a, b, d)[0] == 201, 30)
        seen.update(payload_of(m) for m in sub.messages())
        sub.close()
        wait_for(f"{victim} restarted", b.all_running, 30)
        sub = Subscriber(b)  # reconnect (apid's restart closed the old connection)
        sub.call("subscribeMessages")

        def complete() -> bool:
            return set(sent) <= set(seen) | {payload_of(m) for m in sub.messages()}

        deadline = time.monotonic() + 60
        while not complete() and time.monotonic() < deadline:
            time.sleep(0.2)
        seen.update(payload_of(m) for m in sub.messages())
        missing = set(sent) - set(seen)
        assert not missing, f"{len(missing)} messages lost after kill -9 of {victim}"
    finally:
        sub.close()


def test_cli_receive_follow(make_nodes: Callable[..., list[Node]]) -> None:
    a, b = two_nodes(make_nodes)
    cmd = [*MYCELIUM, "message", "receive", "--follow", "--count", "2", "-t", "news"]
    cmd += ["--jsonrpc-addr", f"127.0.0.1:{b.rpc_port}", "--timeout", "60"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        # no need to wait for the subscription: what arrives first waits in the inbox and is pushed then
        assert push(a, b, b"not news", b"other")[0] == 201
        assert push(a, b, b"first", b"news")[0] == 201
        assert push(a, b, b"second", b"news")[0] == 201
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, err
    shown = [json.loads(text) for text in out.splitlines()]
    # two messages in flight at once may complete in either order (as in the reference: no FIFO promise)
    assert sorted((m["payload"], m["topic"]) for m in shown) == [("first", "news"), ("second", "news")]
    assert payload_of(pop(b, timeout=5) or {}) == b"not news"
