"""peerd as one process per transport family, and peerd's loud failures.

The second family is ``peerd-quic``. Until (or without) the QUIC link
module, MYCELIUM_DEBUG_STREAM_QUIC=1 makes ``quic://`` peers a TCP packet
stream on the QUIC port: what is tested here is the process layout (two
peerds fed by one FIB and the shared-memory data path, transit between
families, restarting one family alone), not QUIC itself.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import pytest
import zmq

from common import bus

from .nodes import Node, free_port, learn_all_routes, wait_for

pytestmark = pytest.mark.integration


def send_message(src: Node, dst: Node, payload: bytes) -> None:
    body = {"dst": {"ip": dst.address}, "payload": base64.b64encode(payload).decode()}
    status, raw = src.api_status("/api/v1/messages", "POST", body, timeout=10)
    assert status in (200, 201, 202), (status, raw)


def receive_message(node: Node, payload: bytes, timeout: float = 20) -> None:
    def got() -> bool:
        status, raw = node.api_status("/api/v1/messages?timeout=2", timeout=15)
        return status == 200 and base64.b64decode(json.loads(raw)["payload"]) == payload

    wait_for(f"{node.name} to receive {payload!r}", got, timeout, interval=0.0)


def test_two_peerd_families_transit_and_restart_alone(
    make_nodes: Callable[..., list[Node]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MYCELIUM_DEBUG_STREAM_QUIC", "1")
    a, b, c = make_nodes(3)
    quic_port = {n.name: free_port() for n in (a, b, c)}
    for n in (a, b, c):
        n.extra_args = ["--quic-listen-port", str(quic_port[n.name])]
    a.peers = [f"quic://127.0.0.1:{quic_port[b.name]}"]  # A -quic- B -tcp- C
    c.peers = [b.endpoint]
    for n in (a, b, c):
        n.start()
    for n in (a, b, c):
        n.wait_ready()
    assert "peerd-quic" in b.supervisorctl("status")
    wait_for("links up", lambda: a.alive_peers() == 1 and b.alive_peers() == 2 and c.alive_peers() == 1, 30)
    learn_all_routes([a, b, c], 30)
    assert a.selected()[b.subnet]["nextHop"].startswith("QUIC ")
    assert c.selected()[b.subnet]["nextHop"].startswith("TCP ")
    assert {p["endpoint"]["proto"] for p in b.api("/api/v1/admin/peers")} == {"quic", "tcp"}
    # data from a quic link to a tcp link crosses from peerd-quic to peerd-tcp on B, and back
    send_message(a, c, b"over two families")
    receive_message(c, b"over two families")
    send_message(c, a, b"and back")
    receive_message(a, b"and back")
    wait_for(
        "both of B's peerds to count batches handed to the other",
        lambda: all(b.counters(f"peerd-{f}").get("data_to_sibling", 0) > 0 for f in ("quic", "tcp")),
        10,
    )

    tcp_pid = b.program_pid("peerd-tcp")
    tcp_links = c.counters("peerd-tcp").get("links_opened", 0)
    quic_pid = b.program_pid("peerd-quic")
    b.supervisorctl("restart", "peerd-quic")
    wait_for("peerd-quic restarted", lambda: b.program_pid("peerd-quic") not in (0, quic_pid), 20)
    wait_for("the quic link back", lambda: a.alive_peers() == 1 and b.alive_peers() == 2, 30)
    # the TCP family was untouched: same process, C never redialled
    assert b.program_pid("peerd-tcp") == tcp_pid
    assert c.counters("peerd-tcp").get("links_opened", 0) == tcp_links
    assert c.alive_peers() == 1
    learn_all_routes([a, b, c], 30)
    send_message(a, c, b"after the restart")
    receive_message(c, b"after the restart")


def inject(node: Node, where: str) -> None:
    """The debug-only bus message that makes peerd fail (MYCELIUM_DEBUG_FAULTS=1)."""
    ctx = zmq.Context.instance()
    sock = bus.connect(ctx, zmq.PUSH, str(node.run_dir), "peerd-tcp.in")
    try:
        sock.send_multipart(bus.pack("debug_fail", {"where": where}))
    finally:
        sock.close(linger=1000)


def test_a_failing_peerd_exits_and_comes_back(
    make_nodes: Callable[..., list[Node]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MYCELIUM_DEBUG_FAULTS", "1")
    a, b = make_nodes(2)
    a.peers = [b.endpoint]
    for n in (a, b):
        n.start()
    for n in (a, b):
        n.wait_ready()
    wait_for("A-B link", lambda: a.alive_peers() == 1 and b.alive_peers() == 1, 30)
    learn_all_routes([a, b], 30)
    for where in ("task", "callback"):
        old = b.program_pid("peerd-tcp")
        inject(b, where)
        wait_for(f"peerd-tcp restarted after a failing {where}", lambda: b.program_pid("peerd-tcp") not in (0, old), 20)  # noqa: B023
        wait_for("the link back", lambda: a.alive_peers() == 1 and b.alive_peers() == 1, 30)
        learn_all_routes([a, b], 30)
    log = (b.run_dir / "logs").glob("peerd-tcp*.log")
    text = "".join(p.read_text(errors="replace") for p in log) + b.log_path.read_text(errors="replace")
    assert text.count("Traceback") >= 2 and "InjectedFault" in text
    assert "exiting so that supervisord restarts it" in text
