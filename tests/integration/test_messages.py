"""The message subsystem across real --no-tun nodes on loopback, driven
through the reference's HTTP API (API.md 2.3, 2.4)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .nodes import Node, wait_for

pytestmark = pytest.mark.integration


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def q(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def line(make_nodes: Callable[..., list[Node]], count: int = 3, extra: list[str] | None = None) -> list[Node]:
    """A-B-C...: each node dials the previous one."""
    nodes = make_nodes(count)
    for i, node in enumerate(nodes):
        node.peers = [nodes[i - 1].endpoint] if i else []
        node.extra_args = list(extra or [])
    for node in nodes:
        node.start()
    for node in nodes:
        node.wait_ready()
    wait_for("the line to be linked", lambda: all(n.alive_peers() >= 1 for n in nodes), 30)
    return nodes


def push(node: Node, dst: Node, payload: bytes, topic: bytes | None = None, query: str = "") -> tuple[int, Any]:
    body: dict[str, Any] = {"dst": {"ip": dst.address}, "payload": b64(payload)}
    if topic is not None:
        body["topic"] = b64(topic)
    status, raw = node.api_status(f"/api/v1/messages{query}", "POST", body, timeout=60 if query else 10)
    return status, (json.loads(raw) if raw else None)


def pop(node: Node, timeout: int = 5, topic: bytes | None = None, peek: bool = False) -> dict[str, Any] | None:
    query = f"?timeout={timeout}&peek={'true' if peek else 'false'}"
    if topic is not None:
        query += f"&topic={q(b64(topic))}"
    status, raw = node.api_status(f"/api/v1/messages{query}", timeout=timeout + 10)
    assert status in (200, 204), (status, raw)
    return json.loads(raw) if status == 200 else None


def status_of(node: Node, msg_id: str) -> dict[str, Any] | None:
    status, raw = node.api_status(f"/api/v1/messages/status/{msg_id}")
    return json.loads(raw) if status == 200 else None


def drain(node: Node, expected: int, deadline_s: float) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + deadline_s
    while len(got) < expected and time.monotonic() < deadline:
        m = pop(node, timeout=2)
        if m is not None:
            got.append(m)
    # nothing more may arrive: exactly once
    assert pop(node, timeout=1) is None
    return got


def fingerprint(payload: bytes, topic: bytes | None) -> str:
    return hashlib.sha256((topic or b"") + b"\0" + payload).hexdigest()


def test_thousand_messages_a_to_c_exactly_once(make_nodes: Callable[..., list[Node]]) -> None:
    a, _b, c = line(make_nodes)
    rng = random.Random(7)
    sent: Counter[str] = Counter()
    sizes = [1, 1 << 20] + [int(2 ** rng.uniform(0, 20)) for _ in range(998)]
    t0 = time.monotonic()
    for i, size in enumerate(sizes):
        payload = rng.randbytes(size)
        topic = None if i % 5 == 0 else f"topic-{rng.randrange(20)}".encode()
        code, body = push(a, c, payload, topic)
        assert code == 201 and len(body["id"]) == 16
        sent[fingerprint(payload, topic)] += 1
    received = drain(c, len(sizes), 240)
    elapsed = time.monotonic() - t0
    got: Counter[str] = Counter()
    for m in received:
        topic = base64.b64decode(m["topic"]) if "topic" in m else None
        got[fingerprint(base64.b64decode(m["payload"]), topic)] += 1
        assert m["srcIp"] == a.address and m["dstIp"] == c.address
        assert m["srcPk"] == a.info["nodePubkey"] and m["dstPk"] == c.info["nodePubkey"]
    assert got == sent
    print(f"\nFIGURE messages: {len(sizes)} messages, {sum(sizes) / 1e6:.1f} MB, A->C in {elapsed:.1f} s")


def test_reply_round_trip_and_status(make_nodes: Callable[..., list[Node]]) -> None:
    a, b, c = line(make_nodes)
    result: dict[str, Any] = {}

    def ask() -> None:
        result["answer"] = push(a, c, b"ping?", b"rpc", query="?reply_timeout=20")

    asker = threading.Thread(target=ask)
    asker.start()
    question = wait_for("the question at C", lambda: pop(c, timeout=2, topic=b"rpc"), 20)
    code, _ = c.api_status(
        f"/api/v1/messages/reply/{question['id']}", "POST", {"dst": {"ip": a.address}, "payload": b64(b"pong!")}
    )
    assert code == 204
    asker.join(30)
    code, reply = result["answer"]
    assert code == 200 and base64.b64decode(reply["payload"]) == b"pong!" and reply["id"] == question["id"]
    assert "topic" not in reply  # replies carry no topic
    # a message that nobody answers: 408 with its id
    code, body = push(a, c, b"anyone?", query="?reply_timeout=1")
    assert code == 408 and len(body["id"]) == 16
    info = wait_for("status received", lambda: (s := status_of(a, body["id"])) and s["state"] == "received" and s, 10)
    assert info["dst"] == c.address and info["msgLen"] == 7 and info["deadline"] == info["created"] + 300
    pop(c, timeout=2)
    wait_for("status read after the pop", lambda: status_of(a, body["id"])["state"] == "read", 10)
    assert c.api_status("/api/v1/messages/status/0123456789abcdef")[0] == 404
    # the middle node forwarded those message packets: its statistics show both ends
    stats = b.api("/api/v1/admin/stats/packets")
    by_src = {e["ip"]: e for e in stats["bySource"]}
    by_dst = {e["ip"]: e for e in stats["byDestination"]}
    assert by_src[a.address]["packetCount"] > 0 and by_src[a.address]["byteCount"] > 0
    assert by_dst[c.address]["packetCount"] > 0 and c.address in by_src  # C's answers passed too


def test_topic_whitelist_and_forward_socket(make_nodes: Callable[..., list[Node]], tmp_path: Path) -> None:
    a, b, c = line(make_nodes)
    topic = b"guarded"
    assert c.api_status(f"/api/v1/messages/topics/{q(b64(topic))}/sources", "POST", {"subnet": b.subnet})[0] == 201
    assert b64(topic) in c.api("/api/v1/messages/topics")
    push(a, c, b"from a", topic)  # A is not on the whitelist: never delivered
    push(b, c, b"from b", topic)
    m = pop(c, timeout=10, topic=topic)
    assert m is not None and base64.b64decode(m["payload"]) == b"from b"
    assert pop(c, timeout=3, topic=topic) is None

    # forward a topic to a Unix socket; the socket's answer comes back as a reply
    sock_path = str(tmp_path / "app.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(1)
    server.settimeout(20)
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(5)
            data = conn.recv(65536)
            seen.append(data)
            conn.sendall(data.upper())

    t = threading.Thread(target=serve)
    t.start()
    fwd = b"fwd"
    assert c.api_status(f"/api/v1/messages/topics/{q(b64(fwd))}/sources", "POST", {"subnet": "400::/7"})[0] == 201
    assert c.api_status(f"/api/v1/messages/topics/{q(b64(fwd))}/forward", "PUT", {"socketPath": sock_path})[0] == 204
    code, reply = push(a, c, b"shout this", fwd, query="?reply_timeout=20")
    t.join(30)
    server.close()
    assert seen == [b"shout this"]
    assert code == 200 and base64.b64decode(reply["payload"]) == b"SHOUT THIS"


def test_kill_9_receiver_msgbus_mid_transfer(make_nodes: Callable[..., list[Node]]) -> None:
    a, _b, c = line(make_nodes)
    payloads = [os.urandom(300_000) for _ in range(20)]
    ids = [push(a, c, p, b"bulk")[1]["id"] for p in payloads]
    wait_for("the transfer to be under way", lambda: status_of(a, ids[0])["state"] != "pending", 20, interval=0.02)
    os.kill(c.program_pid("msgbus"), signal.SIGKILL)
    wait_for("msgbus restarted", c.all_running, 20)
    received = drain(c, len(payloads), 120)
    assert sorted(base64.b64decode(m["payload"]) for m in received) == sorted(payloads)


def test_kill_9_sender_msgbus_with_100_queued(make_nodes: Callable[..., list[Node]]) -> None:
    a, _b, c = line(make_nodes)
    c.supervisorctl("stop", "msgbus")  # nothing can be delivered yet: all 100 stay queued at A
    payloads = [f"message {i}".encode() * (i + 1) for i in range(100)]
    ids = [push(a, c, p)[1]["id"] for p in payloads]
    assert all(status_of(a, i)["state"] in ("pending", "sending") for i in ids)
    os.kill(a.program_pid("msgbus"), signal.SIGKILL)
    wait_for("A's msgbus restarted", a.all_running, 20)
    assert status_of(a, ids[0]) is not None  # the outbox survived
    c.supervisorctl("start", "msgbus")
    received = drain(c, len(payloads), 120)
    assert sorted(base64.b64decode(m["payload"]) for m in received) == sorted(payloads)


def test_deadline_expiry_is_reported(make_nodes: Callable[..., list[Node]]) -> None:
    (a, c) = line(make_nodes, 2, extra=["--message-timeout", "3"])
    c.supervisorctl("stop", "msgbus")  # INIT never acknowledged
    code, body = push(a, c, b"too late")
    assert code == 201
    info = wait_for(
        "the message to be aborted", lambda: (s := status_of(a, body["id"])) and s["state"] == "aborted" and s, 15
    )
    assert info["deadline"] == info["created"] + 3
    # forgotten after twice the send window: status answers 404
    wait_for("the aborted message to be forgotten", lambda: status_of(a, body["id"]) is None, 15)


def test_messages_survive_middle_peerd_restart(make_nodes: Callable[..., list[Node]]) -> None:
    a, b, c = line(make_nodes)
    payloads = [os.urandom(1 << 20) for _ in range(12)]  # 1 MiB each: the API's 2 MiB body limit allows this size
    ids = [push(a, c, p, b"big")[1]["id"] for p in payloads]
    wait_for("the transfer to be under way", lambda: status_of(a, ids[0])["state"] != "pending", 20, interval=0.02)
    b.supervisorctl("restart", "peerd-tcp")  # every link of the middle node drops mid-transfer
    received = drain(c, len(payloads), 120)
    assert sorted(base64.b64decode(m["payload"]) for m in received) == sorted(payloads)


def test_a_whole_node_restart_keeps_its_inbox_and_links(make_nodes: Callable[..., list[Node]]) -> None:
    """Stop and start a node in the same run directory: every service comes back
    (the message store was read-only on the second start once), the message
    waiting in its inbox is still there, and the peer links again."""
    a, b = line(make_nodes, 2)
    assert push(a, b, b"kept", b"t")[0] == 201
    wait_for("the message in B's inbox", lambda: pop(b, timeout=1, peek=True) is not None, 30)
    b.stop()
    b.start()
    b.wait_ready()
    wait_for("A and B linked again", lambda: b.alive_peers() >= 1, 30)
    got = pop(b, timeout=5)
    assert got is not None and base64.b64decode(got["payload"]) == b"kept"
    assert push(b, a, b"after", b"t")[0] == 201
    back = pop(a, timeout=30)
    assert back is not None and base64.b64decode(back["payload"]) == b"after"


def test_oversized_and_invalid_requests(make_nodes: Callable[..., list[Node]]) -> None:
    a, c = line(make_nodes, 2)
    assert push(a, c, b"x", b"t" * 256)[0] == 400  # topic over 255 bytes
    status, _ = a.api_status("/api/v1/messages", "POST", {"dst": {"ip": c.address}, "payload": "not base64!"})
    assert status == 400
    status, _ = a.api_status("/api/v1/messages", "POST", {"dst": {"ip": "10.0.0.1"}, "payload": ""})
    assert status == 400  # not an overlay address
    status, _ = a.api_status("/api/v1/messages", "POST", {"dst": {"pk": "abc"}, "payload": ""})
    assert status == 400
    status, _ = a.api_status("/api/v1/messages", "POST", {"payload": ""})
    assert status == 422
    assert a.api_status("/api/v1/messages/status/xyz")[0] == 400
    assert a.api_status("/api/v1/messages?topic=%%%")[0] == 400
    status, _ = a.api_status("/api/v1/messages/reply/nothex", "POST", {"dst": {"ip": c.address}, "payload": ""})
    assert status == 400
    assert a.api_status("/api/v1/messages/topics/!!/sources")[0] == 400
    assert a.api_status(f"/api/v1/messages/topics/{q(b64(b'none'))}/sources")[0] == 404
    # a destination given by public key is turned into its address
    code, _body = push(a, c, b"by key")  # sanity
    assert code == 201
    status, _raw = a.api_status("/api/v1/messages", "POST", {"dst": {"pk": c.info["nodePubkey"]}, "payload": b64(b"k")})
    assert status == 201
    m1, m2 = pop(c, 5), pop(c, 5)
    assert {base64.b64decode(m1["payload"]), base64.b64decode(m2["payload"])} == {b"by key", b"k"}
    assert a.all_running() and c.all_running()


def cli(node: Node, *args: str, stdin: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args, "--api-addr", f"127.0.0.1:{node.api_port}"],
        input=stdin,
        capture_output=True,
        timeout=timeout,
    )


def test_cli_message_send_and_receive(make_nodes: Callable[..., list[Node]], tmp_path: Path) -> None:
    a, c = line(make_nodes, 2)
    body_file = tmp_path / "body.bin"
    body_file.write_bytes(b"\xff\x00binary")
    assert cli(a, "message", "send", c.address, "hello there", "-t", "greet").returncode == 0
    assert cli(a, "message", "send", c.info["nodePubkey"], "--msg-path", str(body_file)).returncode == 0
    assert cli(a, "message", "send", c.address, stdin=b"from stdin").returncode == 0

    out = cli(c, "message", "receive", "--timeout", "10", "-t", "greet")
    doc = json.loads(out.stdout)
    assert doc["payload"] == "hello there" and doc["topic"] == "greet" and doc["srcIp"] == a.address
    # two messages in flight at once may arrive in either order (neither we nor the reference promise one)
    first = cli(c, "message", "receive", "--timeout", "10", "--raw").stdout
    second = cli(c, "message", "receive", "--timeout", "10", "--raw").stdout
    assert {first, second} == {b"\xff\x00binary", b"from stdin"}
    out = cli(c, "message", "receive", "--timeout", "1")
    assert out.returncode == 0 and out.stdout == b""  # nothing: prints nothing

    # --wait gets the reply that --reply-to sends
    waiter = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "message", "send", c.address, "q?", "--wait", "--timeout", "30",
         "--api-addr", f"127.0.0.1:{a.api_port}"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    question = json.loads(cli(c, "message", "receive", "--timeout", "20").stdout)
    assert cli(c, "message", "send", a.address, "a!", "--reply-to", question["id"]).returncode == 0
    out_bytes, _ = waiter.communicate(timeout=40)
    assert json.loads(out_bytes)["payload"] == "a!"

    bad = cli(a, "message", "send", "not-an-address", "x")
    assert bad.returncode == 1 and len(bad.stderr.splitlines()) == 1
