"""Replay protection, session keys and the inbound firewall end to end
(docs/EXTENSIONS.md): real nodes with TUN devices in namespaces.

    A --- B --- C        C runs --no-session-keys: a reference-model data
                         plane (static keys, unknown inner types dropped)

B reaches A through a middlebox (a TCP relay in A's namespace) that can
start dropping negotiation packets, as a malicious middle node would. A raw
AF_PACKET tap on A's veth records the relay's A->B stream from its first
byte (TCP reassembled by sequence number), so the test holds every data
packet A sent to B, as an attacker on the link would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from common import native
from common.crypto import DecryptError, SessionKey, shared_secret
from common.wire.icmp import build_icmpv6
from common.wire.inner import L3_HEADER
from common.wire.packet import DataPacket, StreamDecoder
from common.wire.session import INNER_SESSION

from .netns import (
    API_PORT,
    NODE_PORT,
    BackgroundPing,
    NetNode,
    Topology,
    cleanup_stale,
    in_netns,
    ping,
    privileged_marks,
)
from .netns import wait_for as wait

pytestmark = privileged_marks("security tests")


ETH_P_ALL = 0x0003
CAPTURE_MAX = 8 * 1024 * 1024
REKEY_SECONDS = 2  # a session may seal for 3 x 2 + 4 = 10 s (SessionConfig.reject_after)
RELAY_PORT = 9700


class Middlebox:
    """A TCP relay B -> (this) -> A's peerd that frames the packets it
    carries and, once ``drop_negotiation`` is set, drops the static-key
    negotiation packets (it holds both key files to recognise them: the
    strongest middle node there is)."""

    def __init__(self, ns: str, listen_ip: str, keys: list[SessionKey]) -> None:
        self.keys = keys
        self.drop_negotiation = False
        self.dropped = 0
        self.stopped = False
        self.threads: list[threading.Thread] = []

        def listen() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((listen_ip, RELAY_PORT))
            s.listen(4)
            s.settimeout(0.2)
            return s

        self.ns = ns
        self.server = in_netns(ns, listen)
        self._spawn(self._accept)

    def _spawn(self, fn: Any, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                up = in_netns(self.ns, lambda: socket.create_connection(("127.0.0.1", NODE_PORT), timeout=5))
            except OSError:  # A's peerd not listening yet: B connects again later
                conn.close()
                continue
            for s in (conn, up):
                s.settimeout(0.2)
            self._spawn(self._pipe, conn, up)
            self._spawn(self._pipe, up, conn)

    def _negotiation(self, pkt: bytes) -> bool:
        for key in self.keys:
            try:
                return key.open(pkt[40:])[1] == INNER_SESSION
            except DecryptError:
                continue
        return False

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        buf = bytearray()
        while not self.stopped:
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            buf += data
            out = bytearray()
            while len(buf) >= 8:
                n = 40 + (buf[5] << 8 | buf[6]) if buf[1] == 0 else 8 + (buf[6] << 8 | buf[7])
                if len(buf) < n:
                    break
                pkt = bytes(buf[:n])
                del buf[:n]
                if self.drop_negotiation and pkt[1] == 0 and self._negotiation(pkt):
                    self.dropped += 1
                    continue
                out += pkt
            try:
                dst.sendall(out)
            except OSError:
                break
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.stopped = True
        self.server.close()
        for t in self.threads:
            t.join(2)


class LinkTap:
    """Records the TCP byte stream one side of a veth sends from ``port``
    (AF_PACKET sees outgoing packets too); bounded to CAPTURE_MAX bytes."""

    def __init__(self, ns: str, ifname: str, src_ip: str, port: int) -> None:
        def open_socket() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
            s.bind((ifname, 0))
            s.settimeout(0.2)
            return s

        self.sock = in_netns(ns, open_socket)
        self.src = socket.inet_aton(src_ip)
        self.port = port
        self.isn: int | None = None
        self.buf = bytearray()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped:
            try:
                frame = self.sock.recv(70000)
            except TimeoutError:
                continue
            except OSError:
                return
            self._take(frame)

    def _take(self, frame: bytes) -> None:
        if len(frame) < 14 + 20 or frame[12:14] != b"\x08\x00":
            return
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 6 or ip[12:16] != self.src:
            return
        total = struct.unpack_from("!H", ip, 2)[0]
        tcp = ip[ihl:total]
        sport, _, seq = struct.unpack_from("!HHI", tcp)
        if sport != self.port:
            return
        flags = tcp[13]
        if flags & 0x02:  # SYN-ACK: the stream starts at seq + 1
            self.isn = seq + 1
            return
        if self.isn is None:
            return
        payload = tcp[(tcp[12] >> 4) * 4 :]
        off = (seq - self.isn) & 0xFFFFFFFF
        if not payload or off + len(payload) > CAPTURE_MAX:
            return
        if len(self.buf) < off + len(payload):
            self.buf.extend(bytes(off + len(payload) - len(self.buf)))
        self.buf[off : off + len(payload)] = payload

    def data_packets(self, src: bytes, dst: bytes) -> list[bytes]:
        decoder = StreamDecoder()
        out = []
        for p in decoder.feed(bytes(self.buf)):
            if isinstance(p, DataPacket) and p.src == src and p.dst == dst:
                out.append(p.encode())
        return out

    def close(self) -> None:
        self.stopped = True
        self.thread.join(2)
        self.sock.close()


@pytest.fixture(scope="module")
def net(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    cleanup_stale()
    topo = Topology(["a", "b", "c"])
    tap = None
    box = None
    rules = topo.base / "b-firewall.toml"
    rules.write_text('default = "allow"\n')
    os.chmod(rules, 0o644)
    try:
        a_ab, _ = topo.connect("a", "b", 1)
        b_bc, _ = topo.connect("b", "c", 2)
        rekey = ["--session-rekey-seconds", str(REKEY_SECONDS)]
        a = topo.add_node("a", extra=rekey)
        b = topo.add_node("b", peers=[f"tcp://{a_ab}:{RELAY_PORT}"], extra=[*rekey, "--firewall", str(rules)])
        topo.add_node("c", peers=[f"tcp://{b_bc}:{NODE_PORT}"], extra=["--no-session-keys"])
        static_ab = SessionKey(shared_secret(a.identity.private_key, b.identity.public_key))
        box = Middlebox(topo.ns("a"), a_ab, [static_ab])
        tap = LinkTap(topo.ns("a"), "vab", a_ab, RELAY_PORT)  # before B connects: the stream from its start
        topo.start_all()
        yield {"topo": topo, "tap": tap, "rules": rules, "box": box}
    finally:
        if tap is not None:
            tap.close()
        if box is not None:
            box.close()
        if any(getattr(i, "rep_call", None) is not None and i.rep_call.failed for i in request.session.items):
            for node in topo.nodes.values():
                print(f"\n===== log of {node.name} =====\n{node.log_tail()}")
        topo.close()


def _warm(topo: Topology, src: str, dst: NetNode, timeout: float = 30) -> None:
    wait(f"{src} -> {dst.name} to answer pings", lambda: ping(topo, src, dst.address, count=1, deadline=2), timeout)


def _session_state(node: NetNode, peer: NetNode) -> str | None:
    for s in node.rpc("tund", "sessions"):
        if s["address"] == peer.address:
            return str(s["state"])
    return None


def _tun_rx(topo: Topology, node: NetNode) -> int:
    info = json.loads(topo.exec(node.name, ["ip", "-j", "-s", "link", "show", node.tun_name]).stdout)[0]
    return int(info["stats64"]["rx"]["packets"])


def _raw_link(ns: str) -> socket.socket:
    return in_netns(ns, lambda: socket.create_connection(("127.0.0.1", NODE_PORT), timeout=5))


def _api(topo: Topology, name: str, method: str, path: str) -> tuple[int, Any]:
    def call() -> tuple[int, Any]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{API_PORT}{path}", method=method, data=b"" if method == "POST" else None
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    return in_netns(topo.ns(name), call)


def _jsonrpc(topo: Topology, name: str, method: str) -> Any:
    def call() -> Any:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": []}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{API_PORT + 1}/", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    return in_netns(topo.ns(name), call)


def test_captured_packets_replayed_are_dropped_and_never_open_with_the_static_key(net: dict[str, Any]) -> None:
    topo: Topology = net["topo"]
    tap: LinkTap = net["tap"]
    a, b, c = topo.nodes["a"], topo.nodes["b"], topo.nodes["c"]
    _warm(topo, "a", b)
    _warm(topo, "b", a)
    wait("A and B to negotiate session keys", lambda: _session_state(a, b) == "session", 20)
    assert ping(topo, "a", b.address, count=5, interval=0.2)
    captured = tap.data_packets(a.identity.address.packed, b.identity.address.packed)
    static = SessionKey(shared_secret(a.identity.private_key, b.identity.public_key))
    opened_static: list[int] = []  # positions of packets the static key opens, by inner type
    kinds: list[int | None] = []
    for pkt in captured:
        try:
            kinds.append(static.open(pkt[40:])[1])
        except DecryptError:
            kinds.append(None)
    opened_static = [i for i, k in enumerate(kinds) if k is not None and k != INNER_SESSION]
    under_session = [i for i, k in enumerate(kinds) if k is None]
    shown = [k for k in kinds if k is not None]
    print(f"\nFIGURE capture A->B: {len(captured)} data packets, {len(under_session)} under session keys, {shown=}")
    assert len(under_session) >= 5, kinds  # the pings after negotiation
    # static-key data (if any) only before the first session packet: never a fallback afterwards
    assert all(i < under_session[0] for i in opened_static), kinds

    # replay everything A sent to B, through a raw peer of B's
    before, rx_before = b.counters(), _tun_rx(topo, b)
    with _raw_link(b.ns) as s:
        s.sendall(b"".join(captured))

        # every replayed packet is accounted for: a replay (window or nonce filter), or
        # undecryptable (its session was rotated out and erased since), or refused static data
        kinds_dropped = ("replay", "rx_decrypt_failed", "rx_downgrade")

        def counted() -> bool:
            now = b.counters()
            return sum(now.get(k, 0) - before.get(k, 0) for k in kinds_dropped) >= len(captured)

        wait("B to count the replays", counted, 15)
    after = b.counters()  # one more round trip: tund has flushed its TUN writes since
    print("FIGURE replay counters at B:", {k: after.get(k, 0) - before.get(k, 0) for k in kinds_dropped})
    assert _tun_rx(topo, b) == rx_before, "a replayed packet reached B's TUN"
    assert after.get("replay", 0) - before.get("replay", 0) >= 3

    # a reference-style packet (random nonce, static key) from C, via a raw peer: still delivered
    _warm(topo, "b", c)
    _warm(topo, "c", b)
    assert _session_state(b, c) == "static"
    key_cb = SessionKey(shared_secret(c.identity.private_key, b.identity.public_key))
    echo = build_icmpv6(
        c.identity.address.packed, b.identity.address.packed, 64, 128, 0, struct.pack("!HH", 9, 1) + b"ref"
    )
    rx_before = _tun_rx(topo, b)
    with _raw_link(b.ns) as s:
        s.sendall(
            DataPacket(c.identity.address.packed, b.identity.address.packed, 64, key_cb.seal(L3_HEADER + echo)).encode()
        )
        wait("the reference-style packet to reach B's TUN", lambda: _tun_rx(topo, b) > rx_before, 10)
    # A (sessions) and C (reference model) still exchange data both ways through B
    _warm(topo, "a", c)
    assert ping(topo, "c", a.address, count=3, interval=0.2)
    assert _session_state(a, c) == "static"


def test_session_rotation_mid_iperf3_loses_nothing(net: dict[str, Any]) -> None:
    topo: Topology = net["topo"]
    a, b = topo.nodes["a"], topo.nodes["b"]
    _warm(topo, "a", b)
    before_a, before_b = a.counters(), b.counters()
    server = topo.popen("b", ["iperf3", "-s", "-1", "-B", b.address], stdout=subprocess.DEVNULL)
    try:
        wait("iperf3 server", lambda: "5201" in topo.exec("b", ["ss", "-ltn"]).stdout, 10)
        out = topo.exec("a", ["iperf3", "-c", b.address, "-t", str(2 * REKEY_SECONDS + 1), "-J"], timeout=40)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr
    finally:
        server.kill()
        server.wait(5)
    end = json.loads(out.stdout)["end"]
    after_a, after_b = a.counters(), b.counters()

    def delta(after: dict[str, int], before: dict[str, int], key: str) -> int:
        return after.get(key, 0) - before.get(key, 0)

    assert delta(after_a, before_a, "session_rekey") + delta(after_b, before_b, "session_rekey") >= 1
    assert end["sum_received"]["bytes"] > 1_000_000
    for side_after, side_before in ((after_a, before_a), (after_b, before_b)):
        for key in ("replay", "rx_decrypt_failed", "rx_downgrade", "tx_session_blocked"):
            assert delta(side_after, side_before, key) == 0, (key, side_after.get(key))
    print(
        f"\nFIGURE iperf3 A->B with session rotation every {REKEY_SECONDS} s: "
        f"{end['sum_received']['bits_per_second'] / 1e9:.2f} Gbit/s, "
        f"{end['sum_sent'].get('retransmits', 0)} TCP retransmits (loaded shared machine)"
    )


def test_firewall_allow_deny_reload_and_bad_files(net: dict[str, Any]) -> None:
    topo: Topology = net["topo"]
    rules = net["rules"]
    a, b, c = topo.nodes["a"], topo.nodes["b"], topo.nodes["c"]
    _warm(topo, "a", b)
    _warm(topo, "c", b)
    # the kernel runs the firewall's rules too (docs/EXTENSIONS.md 9): with a file or without
    assert b.rpc("tund", "info")["kernel"] == a.rpc("tund", "info")["kernel"] == native.NAME
    rules.write_text(
        'default = "deny"\n'
        f'[[rule]]\npublic_key = "{a.identity.public_key.hex()}"\nprotocol = "icmpv6"\n'
        f'[[rule]]\nsource = "{a.subnet}"\nprotocol = "tcp"\nport = 7001\n'
    )
    os.kill(b.program_pid("tund"), signal.SIGHUP)
    wait(
        "B to load the deny rules", lambda: _api(topo, "b", "GET", "/api/v1/admin/firewall")[1]["default"] == "deny", 10
    )
    dropped = b.counters().get("rx_firewall_dropped", 0)
    assert ping(topo, "a", b.address, count=2, interval=0.2)
    assert not ping(topo, "c", b.address, count=2, interval=0.2, deadline=2)
    assert b.counters().get("rx_firewall_dropped", 0) >= dropped + 2

    def listener(port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.bind((b.address, port))
        s.listen(4)
        return s

    def connects(port: int) -> bool:
        def go() -> bool:
            try:
                socket.create_connection((b.address, port), timeout=2).close()
                return True
            except OSError:
                return False

        return in_netns(topo.ns("a"), go)

    servers = [in_netns(b.ns, lambda p=p: listener(p)) for p in (7001, 7002)]
    try:
        assert connects(7001)
        assert not connects(7002)
    finally:
        for s in servers:
            s.close()

    # reload through the API: C allowed too
    rules.write_text(rules.read_text() + f'[[rule]]\npublic_key = "{c.identity.public_key.hex()}"\n')
    status, body = _api(topo, "b", "POST", "/api/v1/admin/firewall/reload")
    assert status == 200 and body["ok"], body
    assert ping(topo, "c", b.address, count=2, interval=0.2)
    # a bad file: one-line error, old rules kept
    rules.write_text('default = "deny"\n[[rule]]\nprotocol = "tcp"\nport = "http"\n')
    status, body = _api(topo, "b", "POST", "/api/v1/admin/firewall/reload")
    assert status == 422 and "\n" not in body["error"] and "port" in body["error"], body
    shown = _api(topo, "b", "GET", "/api/v1/admin/firewall")[1]
    assert len(shown["rules"]) == 3 and shown["lastError"]
    rpc = _jsonrpc(topo, "b", "reloadFirewall")
    assert rpc["result"]["ok"] is False and "port" in rpc["result"]["error"], rpc
    assert _jsonrpc(topo, "b", "getFirewall")["result"]["rules"] == shown["rules"]
    assert ping(topo, "c", b.address, count=2, interval=0.2)
    rules.write_text('default = "allow"\n')
    assert _api(topo, "b", "POST", "/api/v1/admin/firewall/reload")[0] == 200


def test_middle_node_dropping_negotiation_blocks_visibly_never_falls_back(net: dict[str, Any]) -> None:
    topo: Topology = net["topo"]
    tap: LinkTap = net["tap"]
    box: Middlebox = net["box"]
    a, b = topo.nodes["a"], topo.nodes["b"]
    _warm(topo, "a", b)
    wait("A and B in session", lambda: _session_state(a, b) == "session", 20)
    start = len(tap.data_packets(a.identity.address.packed, b.identity.address.packed))
    blocked_before = a.counters().get("tx_session_blocked", 0)
    box.drop_negotiation = True
    try:
        bg = BackgroundPing(topo, "a", b.address, interval=0.2, seconds=30)
        try:
            # rotation fails; once the last session is too old to seal (10 s), traffic stops
            wait("A to report B blocked", lambda: _session_state(a, b) == "blocked", 25, interval=0.5)
            wait("blocked packets to be counted", lambda: a.counters().get("tx_session_blocked", 0) > blocked_before, 5)
            status, shown = _api(topo, "a", "GET", "/api/v1/admin/sessions")
            assert status == 200 and any(s["address"] == b.address and s["state"] == "blocked" for s in shown)
            wait("the warning in A's log", lambda: "traffic to it is blocked" in a.log_tail(400), 5)
        finally:
            bg.stop()
    finally:
        box.drop_negotiation = False
    assert box.dropped > 0
    static = SessionKey(shared_secret(a.identity.private_key, b.identity.public_key))
    for pkt in tap.data_packets(a.identity.address.packed, b.identity.address.packed)[start:]:
        try:
            kind = static.open(pkt[40:])[1]
        except DecryptError:
            continue
        assert kind == INNER_SESSION, f"A fell back to the static key (inner type {kind})"
    # the middle node stops interfering: the nodes negotiate again and traffic resumes
    wait("a new session", lambda: _session_state(a, b) == "session", 20, interval=0.5)
    assert ping(topo, "a", b.address, count=2, interval=0.2)


def test_restart_of_either_node_renegotiates(net: dict[str, Any]) -> None:
    topo: Topology = net["topo"]
    a, b = topo.nodes["a"], topo.nodes["b"]
    _warm(topo, "a", b)
    wait("A and B in session", lambda: _session_state(a, b) == "session", 20)
    for victim, other in ((b, a), (a, b)):
        established = other.counters().get("session_established", 0) + other.counters().get("session_confirmed", 0)
        old = victim.program_pid("tund")
        os.kill(old, signal.SIGKILL)
        wait("tund to restart", lambda v=victim, o=old: v.program_pid("tund") not in (0, o), 20)
        wait("the TUN to come back", victim.tun_up, 20)
        _warm(topo, other.name, victim)
        _warm(topo, victim.name, other)

        def renegotiated(o: NetNode = other, v: NetNode = victim, e: int = established) -> bool:
            c = o.counters()
            return (
                c.get("session_established", 0) + c.get("session_confirmed", 0) > e
                and _session_state(o, v) == "session"
            )

        wait(f"{other.name} to negotiate anew with the restarted {victim.name}", renegotiated, 20)
        assert _session_state(victim, other) == "session"
