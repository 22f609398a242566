"""A mesh of real --no-tun nodes on loopback: convergence, process kills
under supervisord, rerouting around a stopped node, hostile bytes.

Routing is on demand (PROTOCOL.md 6): a node learns a route when it needs
one. The tests ask through `GET /api/v1/pubkey/{ip}`, which starts a route
query on a miss, the way traffic would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import time
from collections.abc import Callable

import pytest

from .nodes import Node, learn_all_routes, wait_for

pytestmark = pytest.mark.integration


def ring(make_nodes: Callable[..., list[Node]], count: int) -> list[Node]:
    nodes = make_nodes(count)
    for i, node in enumerate(nodes):
        node.peers = [nodes[(i + 1) % count].endpoint]
    for node in nodes:
        node.start()
    for node in nodes:
        node.wait_ready()
    return nodes


def test_four_node_ring_converges(make_nodes: Callable[..., list[Node]]) -> None:
    t0 = time.monotonic()
    nodes = ring(make_nodes, 4)
    wait_for("two live links per node", lambda: all(n.alive_peers() == 2 for n in nodes), 30)
    t_links = time.monotonic() - t0
    t_routes = learn_all_routes(nodes, 30)
    print(f"\nFIGURE ring4: links up {t_links:.2f} s after start; all routes {t_routes:.2f} s after first query")
    for a in nodes:
        for b in nodes:
            if a is not b:
                assert a.lookup(b.address) == b.info["nodePubkey"]
        routes = a.selected()
        # own subnet is not a route; direct neighbours announce metric 0
        assert a.subnet not in routes
        assert sum(1 for r in routes.values() if r["metric"] == 0) == 2
        assert all(r["nextHop"].startswith("TCP ") for r in routes.values())
    peers = nodes[0].api("/api/v1/admin/peers")
    assert {p["type"] for p in peers} == {"static", "inbound"}
    assert all(p["endpoint"]["proto"] == "tcp" and "socket" in p["endpoint"]["addr"] for p in peers)
    assert all(p["rxBytes"] > 0 and p["txBytes"] > 0 for p in peers)


@pytest.mark.parametrize("program", ["router", "peerd-tcp"])
def test_kill_9_service_is_restarted_and_routes_return(make_nodes: Callable[..., list[Node]], program: str) -> None:
    nodes = ring(make_nodes, 4)
    learn_all_routes(nodes, 30)
    victim = nodes[1]
    old_pid = victim.program_pid(program)
    os.kill(old_pid, signal.SIGKILL)
    new_pid = wait_for(
        f"supervisord to restart {program}",
        lambda: p if (p := victim.program_pid(program)) not in (0, old_pid) else None,
        20,
    )
    assert new_pid != old_pid
    wait_for(f"{victim.name} to be running again", victim.all_running, 20)
    wait_for("links back", lambda: all(n.alive_peers() == 2 for n in nodes), 30)
    elapsed = learn_all_routes(nodes, 40)
    print(f"\nFIGURE kill -9 {program}: full routes again {elapsed:.2f} s after links were back")


@pytest.mark.parametrize("how", ["crash", "stop"])
def test_losing_a_middle_node_reroutes(make_nodes: Callable[..., list[Node]], how: str) -> None:
    a, b, c, d = ring(make_nodes, 4)
    learn_all_routes([a, b, c, d], 30)
    # A dialled B, D dialled A: A's link to B ends in B's port; stop whichever carries A->C
    via = a.selected()[c.subnet]["nextHop"]
    middle, other = (b, d) if via.endswith(f":{b.tcp_port}") else (d, b)
    t0 = time.monotonic()
    if how == "crash":
        middle.kill()  # every process of the node dies at once; the kernel closes its sockets
    else:
        middle.stop()  # SIGTERM: supervisord stops the services one by one
    wait_for(
        "A to reroute to C around the stopped node",
        lambda: (r := a.selected().get(c.subnet)) is not None and r["nextHop"] != via,
        30,
        interval=0.05,
    )
    failover = time.monotonic() - t0
    print(f"\nFIGURE failover ({how}): A->C rerouted {failover:.2f} s after {middle.name} went down")
    assert a.lookup(c.address) == c.info["nodePubkey"]
    # the stopped node's subnet is withdrawn, not kept as a live route
    wait_for(
        "the stopped node's route to be gone",
        lambda: middle.subnet not in a.selected() or a.selected()[middle.subnet]["metric"] == "infinite",
        30,
    )
    assert other.alive_peers() >= 1


def _send_and_wait_close(port: int, payload: bytes, timeout: float = 5.0) -> bool:
    """Send bytes to a peerd port; True if the node closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        s.settimeout(timeout)
        try:
            while s.recv(65536):
                pass  # the node may first send its own packets (Update, Hello)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        return True


def test_malformed_bytes_close_only_that_connection(make_nodes: Callable[..., list[Node]]) -> None:
    a, b = make_nodes(2)
    a.peers = [b.endpoint]
    a.start()
    b.start()
    a.wait_ready()
    b.wait_ready()
    wait_for("A-B link", lambda: a.alive_peers() == 1, 30)
    before = b.counters("peerd-tcp")

    garbage = bytes(range(7, 107))  # first byte is not version 1
    wrong_version = bytes.fromhex("02010000") + bytes(60)
    unknown_type = bytes.fromhex("01070000") + bytes(60)
    oversized_control = bytes.fromhex("010100002a03ffff") + bytes(300)
    assert _send_and_wait_close(b.tcp_port, garbage)
    assert _send_and_wait_close(b.tcp_port, wrong_version)
    assert _send_and_wait_close(b.tcp_port, unknown_type)
    assert _send_and_wait_close(b.tcp_port, oversized_control)
    # a truncated packet followed by EOF: the node sees the close, nothing else. Shut
    # down and read what the node sent (its Hello) first: closing with it unread would
    # be a reset, which the node counts as a read error instead
    with socket.create_connection(("127.0.0.1", b.tcp_port), timeout=5) as s:
        s.sendall(struct.pack("!BBxxxHB", 1, 0, 1400, 64) + bytes(20))
        s.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            while s.recv(65536):
                pass

    def counted() -> bool:
        now = b.counters("peerd-tcp")
        return now.get("stream_malformed", 0) - before.get("stream_malformed", 0) >= 4 and now.get(
            "stream_truncated", 0
        ) > before.get("stream_truncated", 0)

    wait_for("malformed streams to be counted", counted, 10)
    # the node and its real link are unaffected
    assert b.all_running()
    assert a.alive_peers() == 1 and b.alive_peers() == 1
    assert a.lookup(b.address) == b.info["nodePubkey"] or wait_for("route A->B", lambda: a.lookup(b.address), 10)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_every_process_and_removes_sockets(make_nodes: Callable[..., list[Node]], sig: int) -> None:
    (node,) = make_nodes(1)
    node.start().wait_ready()
    pids = node.pids()
    assert len(pids) >= 6  # launcher, supervisord and four services
    assert list(node.run_dir.glob("*.ipc"))
    assert node.proc is not None
    node.proc.send_signal(sig)
    assert node.proc.wait(20) == 0
    wait_for("every process of the node to exit", lambda: not node.pids(), 10)
    assert not list(node.run_dir.glob("*.ipc")) and not (node.run_dir / "supervisor.sock").exists()
    assert "node stopped" in node.log_path.read_text()
    node.proc = None
