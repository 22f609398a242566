"""The data plane end to end: real nodes with TUN devices in network
namespaces joined by veth pairs, real ping6 and iperf3 through the overlay.

Topology of the module fixture (three namespaces, three veth pairs):

    A --- B
     \\   /
      \\ /
       C        (C's TUN is named "ovl0" through --tun-name)

Traffic only ever goes to addresses inside namespaces the test created.
Namespaces, processes, TUN devices and run directories are removed by the
fixture finalizers even when a test fails, and ``cleanup_stale`` removes
what an earlier crashed run of this module left behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import native
from common.crypto import SessionKey, shared_secret
from common.identity import Identity
from common.wire.icmp import build_icmpv6
from common.wire.inner import L3_HEADER
from common.wire.packet import DataPacket

from .netns import (
    NODE_PORT,
    REPO,
    BackgroundPing,
    NetNode,
    Topology,
    cleanup_stale,
    dump_logs_on_failure,
    in_netns,
    ping,
    privileged_marks,
)
from .netns import wait_for as wait

pytestmark = privileged_marks("data-plane tests")


def _dump_logs(topo: Topology, request: pytest.FixtureRequest) -> None:
    dump_logs_on_failure(topo, request.session.items)


@pytest.fixture(scope="module")
def mesh(request: pytest.FixtureRequest) -> Iterator[Topology]:
    cleanup_stale()
    topo = Topology(["a", "b", "c"])
    try:
        a_ab, _ = topo.connect("a", "b", 1)
        b_bc, _ = topo.connect("b", "c", 2)
        a_ac, _ = topo.connect("a", "c", 3)
        topo.add_node("a")
        # B keeps the reference's static keys (docs/EXTENSIONS.md): A and C use session keys with
        # each other, static keys with B, and B relays their session packets as any others
        topo.add_node("b", peers=[f"tcp://{a_ab}:{NODE_PORT}"], extra=["--no-session-keys"])
        topo.add_node(
            "c", peers=[f"tcp://{a_ac}:{NODE_PORT}", f"tcp://{b_bc}:{NODE_PORT}"], extra=["--tun-name", "ovl0"]
        )
        topo.start_all()
        yield topo
    finally:
        _dump_logs(topo, request)
        topo.close()


def _nodes(topo: Topology) -> tuple[NetNode, NetNode, NetNode]:
    return topo.nodes["a"], topo.nodes["b"], topo.nodes["c"]


def _warm(topo: Topology, src: str, dst: NetNode, timeout: float = 20) -> None:
    """The first packets to a new destination wait while the route is looked up."""
    wait(f"{src} -> {dst.name} to answer pings", lambda: ping(topo, src, dst.address, count=1, deadline=2), timeout)


def test_tun_device_is_configured_and_privileges_dropped(mesh: Topology) -> None:
    for node in mesh.nodes.values():
        info = node.tun_info()
        assert info is not None, f"no TUN {node.tun_name} in {node.ns}"
        assert info["mtu"] == 1400
        addrs = [(a["local"], a["prefixlen"]) for a in info["addr_info"] if a["family"] == "inet6"]
        assert addrs == [(node.address, 7)]  # no link-local address either
        routes = mesh.exec(node.name, ["ip", "-6", "-j", "route", "show", "dev", node.tun_name]).stdout
        assert any(r["dst"] == "400::/7" for r in json.loads(routes))
        # only tund keeps CAP_NET_ADMIN; every other program runs without capabilities
        # (as the service user when it can run this installation, else as uid 0)
        for program in ("tund", "router", "peerd-tcp", "apid"):
            status = Path(f"/proc/{node.program_pid(program)}/status").read_text()
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            caps = int(fields["CapEff"].strip(), 16)
            assert caps == (1 << 12 if program == "tund" else 0), (program, hex(caps))
            uid = int(fields["Uid"].split()[0])
            if uid == 0 or program == "tund":  # root without capabilities cannot get them back either
                assert int(fields["CapBnd"].strip(), 16) & ~(1 << 12) == 0, program
    assert mesh.nodes["c"].tun_name == "ovl0"


def test_tund_runs_the_kernel_this_checkout_built(mesh: Topology) -> None:
    """The nodes inherit MYCELIUM_NATIVE from the test run: with a built
    kernel and without MYCELIUM_NATIVE=0 tund must run it, not fall back."""
    want = native.NAME
    if native.built() and os.environ.get(native.ENV) != "0":
        assert want == "native", native.REASON
    ran = {node.name: node.rpc("tund", "info")["kernel"] for node in mesh.nodes.values()}
    print(f"\nFIGURE data-plane kernel in tund: {ran}")
    # B runs --no-session-keys, A and C session keys (the default): the kernel runs both
    # (docs/EXTENSIONS.md 9), as it runs a firewall file's rules
    assert ran == {"a": want, "b": want, "c": want}


def test_ping6_between_all_overlay_addresses(mesh: Topology) -> None:
    nodes = list(mesh.nodes.values())
    for src in nodes:
        for dst in nodes:
            if src is not dst:
                _warm(mesh, src.name, dst)
                assert ping(mesh, src.name, dst.address, count=3, interval=0.2)
    # hop limit: a direct neighbour answers with 64 - 2 (sender's and receiver's decrement)
    out = mesh.exec("a", ["ping", "-6", "-n", "-c", "1", "-W", "2", mesh.nodes["b"].address]).stdout
    assert "ttl=62" in out, out


IDLE_GAP = 1.3  # longer than tund's MAX_WAIT (1 s) and any short-poll window: every loop blocks again


def test_single_pings_after_idle_periods_all_arrive(mesh: Topology) -> None:
    """The wake-up path (common/epoller.py, the data-path records, any
    short poll after traffic): a lone packet after the whole chain has gone
    back to sleep must wake every process on its way, each time; a lost
    wake-up loses the ping. A -> B direct, A -> C and back both ways."""
    _, b, c = _nodes(mesh)
    for dst in (b, c):
        _warm(mesh, "a", dst)
    lost = []
    for i in range(4):
        for dst in (b, c):
            time.sleep(IDLE_GAP)
            out = mesh.exec("a", ["ping", "-6", "-n", "-c", "1", "-W", "3", dst.address])
            if out.returncode != 0:
                lost.append((i, dst.name))
    assert not lost, f"single pings after {IDLE_GAP} s idle went unanswered: {lost}"
    # with the kernel, tund's wait runs these wake-ups itself (common/_kernel.c tund_wait)
    handled = {n.name: n.rpc("tund", "info")["gauges"]["wakeups_in_c"] for n in (b, c)}
    print(f"\nFIGURE tund wake-ups handled in C after the lone pings: {handled}")
    # and peerd's its ring wake-ups (eventloop.serve_rings): B's replies go to A through them
    rings = {n.name: n.rpc("peerd-tcp", "stats")["wakeups_in_c"] for n in (b, c)}
    print(f"FIGURE peerd-tcp ring wake-ups handled in C: {rings}")
    if native.NAME == "native":
        assert all(v >= 4 for v in handled.values()), handled
        assert rings["b"] >= 4, rings


def test_iperf3_tcp_stream_through_the_overlay(mesh: Topology) -> None:
    c = mesh.nodes["c"]
    _warm(mesh, "a", c)
    server = mesh.popen("c", ["iperf3", "-s", "-1", "-B", c.address], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = mesh.exec("a", ["iperf3", "-c", c.address, "-t", "3", "-J"], timeout=30)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr
        end = json.loads(out.stdout)["end"]
        received = end["sum_received"]["bytes"]
        rate = end["sum_received"]["bits_per_second"]
        assert received > 1_000_000
        print(
            f"\nFIGURE iperf3 A->C through the overlay: {rate / 1e9:.2f} Gbit/s (3 s, single stream; not a benchmark)"
        )
    finally:
        server.kill()
        server.wait(5)
    counters = c.counters()
    assert counters.get("tun_tx_merged_segments", 0) > 0 or os.environ.get("MYCELIUM_TUN_OFFLOAD") == "0"
    a = mesh.nodes["a"]
    sent = a.counters()
    if os.environ.get("MYCELIUM_TUN_OFFLOAD", "1") not in ("0", "gro"):
        assert sent.get("tun_rx_gso_segments", 0) > 0  # the sender's kernel handed tund TSO super packets
    # the batches went through the shared-memory data path (common/datapath.py), not the bus fallback
    assert a.counters("peerd-tcp").get("data_out_batches", 0) > 100
    assert sent.get("to_peerd_via_bus", 0) < 10
    assert c.counters("tund").get("rx_opened", 0) > 1000 and c.counters("peerd-tcp").get("to_tund_via_bus", 0) < 10


def _raw_link(ns: str, port: int = NODE_PORT) -> socket.socket:
    """A TCP connection to a node's peerd from inside its namespace: a peer
    that never speaks Babel, only sends the data packets we craft."""
    return in_netns(ns, lambda: socket.create_connection(("127.0.0.1", port), timeout=5))


def _echo(src: bytes, dst: bytes, ident: int) -> bytes:
    payload = struct.pack("!HH", ident, 1) + b"dataplane-test"
    return build_icmpv6(src, dst, 64, 128, 0, payload)


def test_tampered_or_wrongly_keyed_packets_are_dropped_and_counted(mesh: Topology) -> None:
    a, b, c = _nodes(mesh)
    _warm(mesh, "c", b)
    _warm(mesh, "c", a)
    key_bc = SessionKey(shared_secret(b.identity.private_key, c.identity.public_key))
    src, dst = b.identity.address.packed, c.identity.address.packed

    def frame(body: bytes, src_addr: bytes = src) -> bytes:
        return DataPacket(src_addr, dst, 64, body).encode()

    good = key_bc.seal(L3_HEADER + _echo(src, dst, 1))
    tampered = bytearray(key_bc.seal(L3_HEADER + _echo(src, dst, 2)))
    tampered[10] ^= 0x01
    wrong_key = SessionKey(os.urandom(32)).seal(L3_HEADER + _echo(src, dst, 3))
    # sealed with B's real key, but the inner packet claims A's address
    spoofed = key_bc.seal(L3_HEADER + _echo(a.identity.address.packed, dst, 4))
    # a "reply" from a stranger: C has no key for that source
    stranger = Identity.from_secret(os.urandom(32))
    unknown = SessionKey(shared_secret(stranger.private_key, c.identity.public_key)).seal(L3_HEADER + b"x" * 60)

    def tun_rx() -> int:
        info = json.loads(mesh.exec("c", ["ip", "-j", "-s", "link", "show", c.tun_name]).stdout)[0]
        return int(info["stats64"]["rx"]["packets"])

    before, rx_before = c.counters(), tun_rx()
    with _raw_link(c.ns) as s:
        s.sendall(frame(bytes(tampered)) + frame(wrong_key) + frame(spoofed) + frame(unknown, stranger.address.packed))
        time.sleep(0.5)
        s.sendall(frame(good))  # the control: the same path with a valid packet does reach the TUN

        def counted() -> bool:
            now = c.counters()
            return (
                now.get("rx_decrypt_failed", 0) - before.get("rx_decrypt_failed", 0) >= 2
                and now.get("rx_spoofed_source", 0) - before.get("rx_spoofed_source", 0) >= 1
                and now.get("tun_tx", 0) > before.get("tun_tx", 0)
            )

        wait("the bad packets to be counted and the good one written", counted, 10)
    after = c.counters()
    assert after["rx_decrypt_failed"] - before.get("rx_decrypt_failed", 0) == 2
    assert after["rx_spoofed_source"] - before.get("rx_spoofed_source", 0) == 1
    assert after.get("rx_queued_for_key", 0) - before.get("rx_queued_for_key", 0) == 1  # waits for a key, never opened
    assert tun_rx() - rx_before == 1  # only the valid packet went into the TUN


def test_link_down_mid_ping_traffic_resumes_through_b(mesh: Topology) -> None:
    a, _, c = _nodes(mesh)
    _warm(mesh, "a", c)
    _warm(mesh, "c", a)
    via = a.selected()[c.subnet]["nextHop"]
    assert "10.77.3." in via, via  # the direct A-C link
    bg = BackgroundPing(mesh, "a", c.address, interval=0.1, seconds=40)
    try:
        wait("pings before the cut", lambda: len(bg.answered) >= 10, 10)
        cut_seq = bg.last_seq()
        mesh.set_link("a", "c", up=False)
        t_cut = time.time()
        wait("pings to resume after the A-C link went down", lambda: bg.answered_after(t_cut + 0.05) >= 10, 30)
        rerouted = a.selected()[c.subnet]["nextHop"]
    finally:
        bg.stop()
        mesh.set_link("a", "c", up=True)
    outage = bg.outage(after_seq=cut_seq)
    lost = "none lost" if outage is None else f"{outage[2]:.1f} s (seq {outage[0]} lost .. {outage[1]} answered)"
    gap = bg.max_gap(after=t_cut - 1)
    print(f"\nFIGURE failover A->C after the A-C veth went down: {lost}; longest gap between replies {gap:.2f} s")
    assert "10.77.1." in rerouted, rerouted  # through B
    assert outage is None or outage[2] < 10


def test_kill_9_tund_mid_ping_restarts_and_pings_resume(mesh: Topology) -> None:
    b = mesh.nodes["b"]
    _warm(mesh, "a", b)
    bg = BackgroundPing(mesh, "a", b.address, interval=0.1, seconds=40)
    try:
        wait("pings before the kill", lambda: len(bg.answered) >= 10, 10)
        old = b.program_pid("tund")
        os.kill(old, signal.SIGKILL)
        t_kill = time.time()
        wait("supervisord to restart tund", lambda: b.program_pid("tund") not in (0, old), 20)
        wait("the TUN to come back", b.tun_up, 20)
        wait("pings to resume after the restart", lambda: bg.answered_after(t_kill) >= 10, 30)
    finally:
        bg.stop()
    outage = bg.outage()
    lost = "none lost" if outage is None else f"{outage[2]:.1f} s lost"
    gap = bg.max_gap(after=t_kill - 1)
    print(f"\nFIGURE kill -9 tund: {lost}; longest gap between replies {gap:.2f} s (packets wait in the bus)")
    assert b.tun_info() is not None
    wait("every program of B to be running", b.all_running, 20)


@pytest.fixture
def line(request: pytest.FixtureRequest) -> Iterator[Topology]:
    """A --- B (--no-tun) --- C: every packet between A and C transits B."""
    cleanup_stale()
    topo = Topology(["a", "b", "c"])
    try:
        _, b_ab = topo.connect("a", "b", 1)
        b_bc, _ = topo.connect("b", "c", 2)
        topo.add_node("b", tun=False)
        topo.add_node("a", peers=[f"tcp://{b_ab}:{NODE_PORT}"])
        topo.add_node("c", peers=[f"tcp://{b_bc}:{NODE_PORT}"])
        topo.start_all()
        yield topo
    finally:
        _dump_logs(topo, request)
        topo.close()


def test_no_tun_middle_node_forwards_transit_traffic(line: Topology) -> None:
    b, c = line.nodes["b"], line.nodes["c"]
    assert b.tun_info() is None
    _warm(line, "a", c, timeout=30)
    before = b.rpc("tund", "stats")["counters"]
    assert ping(line, "a", c.address, count=5, interval=0.2)
    # traceroute's view: hop limit 2 expires at B, which answers with an
    # out-of-band ICMP carried back encrypted (PROTOCOL.md 4.6)
    hop2 = ["ping", "-6", "-n", "-c", "1", "-W", "2", "-t", "2", c.address]

    def time_exceeded() -> str | None:
        out = line.exec("a", hop2).stdout
        return out if "Time exceeded" in out else None

    out = wait("B to answer hop limit 2 with Time exceeded", time_exceeded, 15, 0.2)
    assert b.subnet.split("/")[0] in out, out
    assert b.rpc("tund", "stats")["counters"].get("oob_icmp_sent_3_0", 0) > before.get("oob_icmp_sent_3_0", 0)
    # the TUN device goes away with the node
    c.stop()
    assert c.tun_info() is None


def test_missing_capability_is_one_line_naming_no_tun(tmp_path: Path) -> None:
    if not os.path.exists("/usr/bin/setpriv"):
        pytest.skip("setpriv (util-linux) is needed to drop CAP_NET_ADMIN")
    cmd = [
        "setpriv", "--inh-caps=-all", "--bounding-set=-net_admin", "--",
        sys.executable, "-m", "services.cli", "-k", str(tmp_path / "key"), "--run-dir", str(tmp_path / "run"),
        "-t", "1", "--disable-quic", "--peers", "tcp://192.0.2.1:9651",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--no-tun" in lines[0] and "CAP_NET_ADMIN" in lines[0], out.stderr
    assert not (tmp_path / "run").exists()


def test_two_crypto_workers_share_the_tun(request: pytest.FixtureRequest) -> None:
    """--crypto-workers 2: a multiqueue TUN, two tund processes, traffic in both directions."""
    cleanup_stale()
    topo = Topology(["a", "b"])
    try:
        a_ab, _ = topo.connect("a", "b", 1)
        a = topo.add_node("a", extra=["--crypto-workers", "2"])
        b = topo.add_node("b", peers=[f"tcp://{a_ab}:{NODE_PORT}"], extra=["--crypto-workers", "2"])
        topo.start_all()
        assert a.rpc("tund", "info")["workers"] == 2
        _warm(topo, "a", b)
        assert ping(topo, "a", b.address, count=5, interval=0.2)
        assert ping(topo, "b", a.address, count=5, interval=0.2)
        tund_pids = [p for p in a.pids() if b"services.tund" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(tund_pids) == 2  # the worker is a child of tund
    finally:
        _dump_logs(topo, request)
        topo.close()
