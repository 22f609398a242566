"""QUIC links carrying the data plane: three TUN nodes in network
namespaces, A-B over QUIC, A-C and C-B over TCP:

    A ==quic== B
     \\        /
      tcp   tcp
        \\  /
         C

ping6 between all pairs, an iperf3 stream over the QUIC link, failover
(the QUIC link cut: A-B traffic takes C; back when it returns), and a
``supervisorctl restart peerd-quic`` in the middle of a ping that leaves
the TCP links alone."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from .netns import (
    NODE_PORT,
    BackgroundPing,
    NetNode,
    Topology,
    cleanup_stale,
    dump_logs_on_failure,
    ping,
    privileged_marks,
)
from .netns import wait_for as wait

pytestmark = privileged_marks("QUIC data-plane tests")


@pytest.fixture(scope="module")
def mesh(request: pytest.FixtureRequest) -> Iterator[Topology]:
    cleanup_stale()
    topo = Topology(["a", "b", "c"])
    try:
        a_ab, _ = topo.connect("a", "b", 1)
        _, c_bc = topo.connect("b", "c", 2)
        a_ac, _ = topo.connect("a", "c", 3)
        topo.add_node("a")
        topo.add_node("b", peers=[f"quic://{a_ab}:{NODE_PORT}"])
        topo.add_node("c", peers=[f"tcp://{a_ac}:{NODE_PORT}"])
        topo.nodes["b"].peers.append(f"tcp://{c_bc}:{NODE_PORT}")
        topo.start_all()
        yield topo
    finally:
        dump_logs_on_failure(topo, request.session.items)
        topo.close()


def peers(node: NetNode, proto: str) -> list[dict[str, Any]]:
    out = []
    for fam in ("tcp", "quic"):
        out += [p for p in node.rpc(f"peerd-{fam}", "list_peers") if p["endpoint"]["proto"] == proto]
    return out


def alive(node: NetNode, proto: str) -> int:
    return sum(1 for p in peers(node, proto) if p["connectionState"] == "alive")


def next_hop_proto(node: NetNode, dst: NetNode) -> str | None:
    route = node.selected().get(dst.subnet)
    return None if route is None else str(route["nextHop"]).split(" ", 1)[0].lower()  # "QUIC <local> <-> <remote>"


def test_quic_link_carries_the_data_plane(mesh: Topology) -> None:
    a, b, c = mesh.nodes["a"], mesh.nodes["b"], mesh.nodes["c"]
    wait("the QUIC link", lambda: alive(a, "quic") == 1 and alive(b, "quic") == 1, 30)
    wait("the TCP links", lambda: alive(a, "tcp") == 1 and alive(b, "tcp") == 1 and alive(c, "tcp") == 2, 30)
    for src in (a, b, c):
        for dst in (a, b, c):
            if src is not dst:
                wait(f"{src.name} -> {dst.name}", lambda s=src, d=dst: ping(mesh, s.name, d.address, 1, deadline=2), 25)  # type: ignore[misc]
    assert next_hop_proto(a, b) == "quic" and next_hop_proto(b, a) == "quic"
    # iperf3 over the QUIC link
    server = mesh.popen("b", ["iperf3", "-s", "-1", "-B", b.address], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = mesh.exec("a", ["iperf3", "-c", b.address, "-t", "2", "-J"], timeout=30)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr
        end = json.loads(out.stdout)["end"]
        assert end["sum_received"]["bytes"] > 500_000
        print(
            f"\nFIGURE iperf3 A->B over QUIC: {end['sum_received']['bits_per_second'] / 1e6:.0f} Mbit/s (2 s; loaded)"
        )
    finally:
        server.kill()
        server.wait(5)
    counters = a.counters("peerd-quic")
    assert counters.get("quic_gso_sends", 0) > 0


def test_failover_from_quic_to_tcp_and_back(mesh: Topology) -> None:
    a, b = mesh.nodes["a"], mesh.nodes["b"]
    wait("the QUIC route", lambda: next_hop_proto(a, b) == "quic", 30)
    bg = BackgroundPing(mesh, "a", b.address, interval=0.1, seconds=60)
    try:
        wait("pings answered", lambda: len(bg.answered) >= 3, 10)
        mesh.set_link("a", "b", up=False)  # the QUIC link's veth goes down
        wait("A -> B via C (TCP)", lambda: next_hop_proto(a, b) == "tcp", 30)
        cut = bg.last_seq()
        wait("pings through C", lambda: bg.last_seq() > cut + 5, 30)
        mesh.set_link("a", "b", up=True)
        wait("the QUIC link again", lambda: alive(a, "quic") == 1 and alive(b, "quic") == 1, 30)
        wait("A -> B over QUIC again", lambda: next_hop_proto(a, b) == "quic", 30)
        back = bg.last_seq()
        wait("pings over QUIC again", lambda: bg.last_seq() > back + 5, 20)
    finally:
        mesh.set_link("a", "b", up=True)
        bg.stop()


def test_restart_peerd_quic_mid_ping_leaves_tcp_alone(mesh: Topology) -> None:
    a, b = mesh.nodes["a"], mesh.nodes["b"]
    wait("the QUIC route", lambda: next_hop_proto(a, b) == "quic", 30)
    tcp_pid, quic_pid = a.program_pid("peerd-tcp"), a.program_pid("peerd-quic")
    tcp_before = {str(p["endpoint"]): p for p in peers(a, "tcp")}
    bg = BackgroundPing(mesh, "a", b.address, interval=0.1, seconds=60)
    try:
        wait("pings answered", lambda: len(bg.answered) >= 3, 10)
        a.supervisorctl("restart", "peerd-quic")
        wait("peerd-quic back", lambda: a.program_pid("peerd-quic") not in (0, quic_pid), 20)
        assert a.program_pid("peerd-tcp") == tcp_pid
        wait("the QUIC link again", lambda: alive(a, "quic") == 1, 30)
        mark = bg.last_seq()
        wait("pings answered after the restart", lambda: bg.last_seq() > mark + 5, 30)
    finally:
        bg.stop()
    tcp_after = {str(p["endpoint"]): p for p in peers(a, "tcp")}
    assert tcp_after.keys() == tcp_before.keys()
    for key, before in tcp_before.items():
        after = tcp_after[key]
        assert after["connectionState"] == "alive"
        assert after["lastConnected"] >= before["lastConnected"]  # the same connection, only older
