"""The SOCKS5 proxy (TRANSPORTS.md 3.1) and the DNS resolver (3.4) between
two TUN nodes in namespaces.

Node b runs, inside its namespace, the SOCKS5 server the test starts
(tests/integration/socks_server.py, on b's overlay address port 1080) in
the mode a step needs, an HTTP server on 127.0.0.1 (reachable only from
inside b: a page fetched from a proves the bytes went through b's proxy),
and a DNS server on its overlay address (dns_server.py). Node a runs with
``--enable-dns``, b as its resolver node and a ``[names]`` table.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.dnsnames import key_name

from .netns import NODE_PORT, NetNode, Topology, cleanup_stale, in_netns, privileged_marks
from .netns import wait_for as wait

pytestmark = privileged_marks("proxy/DNS tests")

HERE = Path(__file__).resolve().parent
PAGE = b"served inside namespace b only\n"
HTTP_PORT = 8080  # inside b's fresh namespace: nothing else is there


class Mesh:
    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.a: NetNode = topo.nodes["a"]
        self.b: NetNode = topo.nodes["b"]
        self.socks: subprocess.Popen[str] | None = None
        self.helpers: list[subprocess.Popen[str]] = []

    def start_helper(self, node: str, args: list[str]) -> subprocess.Popen[str]:
        proc = self.topo.popen(node, [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", f"{args[0]} did not start: {line}"
        self.helpers.append(proc)
        return proc

    def socks_mode(self, mode: str | None) -> None:
        if self.socks is not None:
            self.socks.kill()
            self.socks.wait(5)
            self.socks = None
        if mode is not None:
            self.socks = self.start_helper("b", [str(HERE / "socks_server.py"), self.b.address, "1080", mode])

    def close(self) -> None:
        for proc in self.helpers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


def http(node: NetNode, method: str, path: str, body: Any = None, port: int = 8989) -> tuple[int, bytes]:
    """A request to a node's API, made from inside its namespace."""

    def call() -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=20) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    return in_netns(node.ns, call)


def jsonrpc(node: NetNode, method: str, params: Any = None) -> dict[str, Any]:
    status, raw = http(node, "POST", "/", {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}, 8990)
    assert status == 200, raw
    return json.loads(raw)  # type: ignore[no-any-return]


def cli(m: Mesh, *args: str) -> subprocess.CompletedProcess[str]:
    return m.topo.exec("a", [sys.executable, "-m", "services.cli", *args], timeout=40)


def curl(m: Mesh) -> subprocess.CompletedProcess[str]:
    """Fetch b's loopback-only page through a's local relay port."""
    return m.topo.exec(
        "a", ["curl", "-sS", "--max-time", "15", "--socks5", "[::1]:1080", f"http://127.0.0.1:{HTTP_PORT}/page"]
    )


def probe_status(m: Mesh) -> str | None:
    return m.a.rpc("proxyd", "status")["table"].get(m.b.address)  # type: ignore[no-any-return]


def reprobe(m: Mesh, start: Any, stop: Any, expect: str) -> None:
    """Restart probing (a round starts at once) and wait for b's classification."""
    stop()
    rounds = m.a.rpc("proxyd", "stats")["gauges"]["probe_rounds"]
    start()
    wait(
        f"a probe round classifying b as {expect}",
        lambda: m.a.rpc("proxyd", "stats")["gauges"]["probe_rounds"] > rounds,
        20,
    )
    assert probe_status(m) == expect


@pytest.fixture(scope="module")
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    cleanup_stale()
    topo = Topology(["a", "b"])
    m: Mesh | None = None
    try:
        a_ab, _ = topo.connect("a", "b", 1)
        a = topo.add_node("a", extra=["--enable-dns"])
        b = topo.add_node("b", peers=[f"tcp://{a_ab}:{NODE_PORT}"])
        conf = a.dir / "config" / "mycelium"
        conf.mkdir(parents=True)
        (conf / "mycelium.toml").write_text(
            f'dns_resolvers = ["{b.address}"]\n[names]\nbob = "{b.identity.public_key.hex()}"\n'
            f'"web.lab" = "{b.address}"\n'
        )
        topo.start_all()
        m = Mesh(topo)
        www = a.dir.parent / "www"
        www.mkdir()
        (www / "page").write_bytes(PAGE)
        m.helpers.append(
            topo.popen("b", [sys.executable, "-m", "http.server", "-b", "127.0.0.1", "-d", str(www), str(HTTP_PORT)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )  # fmt: skip
        wait("a route from a to b", lambda: any(_addr(b.address) in _net(s) for s in a.selected()), 30)
        for node in (a, b):  # supervisord says RUNNING after 1 s, before a loaded machine has them serving
            wait(f"{node.name}'s API", lambda n=node: http(n, "GET", "/api/v1/admin")[0] == 200, 30)  # type: ignore[misc]
            # proxyd starts on its first request (common/wake.py): the API's proxy list is one
            wait(f"{node.name}'s proxyd", lambda n=node: http(n, "GET", "/api/v1/admin/proxy")[0] == 200, 30)  # type: ignore[misc]
            wait(f"{node.name}'s proxyd", lambda n=node: n.rpc("proxyd", "stats"), 30)  # type: ignore[misc]
        wait("a's dnsd", lambda: a.rpc("dnsd", "stats"), 30)
        yield m
    finally:
        if any(getattr(i, "rep_call", None) is not None and i.rep_call.failed for i in request.session.items):
            for node in topo.nodes.values():
                print(f"\n===== log of {node.name} ({node.ns}) =====\n{node.log_tail()}")
        if m is not None:
            m.close()
        topo.close()


def _net(subnet: str) -> Any:
    import ipaddress

    return ipaddress.IPv6Network(subnet)


def _addr(text: str) -> Any:
    import ipaddress

    return ipaddress.IPv6Address(text)


# --- SOCKS5 proxy ---------------------------------------------------------------


def test_nothing_listening_and_no_proxy_to_connect_to(mesh: Mesh) -> None:
    m = mesh
    assert http(m.a, "GET", "/api/v1/admin/proxy") == (200, b"[]")
    reprobe(
        m,
        lambda: http(m.a, "GET", "/api/v1/admin/proxy/probe"),
        lambda: http(m.a, "DELETE", "/api/v1/admin/proxy/probe"),
        "notListening",
    )
    assert http(m.a, "GET", "/api/v1/admin/proxy") == (200, b"[]")
    assert http(m.a, "POST", "/api/v1/admin/proxy", {}) == (404, b"")
    assert http(m.a, "POST", "/api/v1/admin/proxy", {"remote": None}) == (404, b"")
    assert jsonrpc(m.a, "connectProxy", [])["error"]["code"] == -32032
    assert http(m.a, "POST", "/api/v1/admin/proxy", {"remote": "not an address"})[0] == 422
    assert jsonrpc(m.a, "connectProxy", ["[::1]"])["error"]["code"] == -32602
    out = cli(m, "proxy", "connect")
    assert out.returncode == 1 and "no valid proxy" in out.stderr
    assert http(m.a, "DELETE", "/api/v1/admin/proxy/probe") == (204, b"")


def test_auth_required_and_not_a_proxy_are_not_listed(mesh: Mesh) -> None:
    m = mesh
    m.socks_mode("auth")
    reprobe(
        m, lambda: jsonrpc(m.a, "startProxyProbe"), lambda: jsonrpc(m.a, "stopProxyProbe"), "authenticationRequired"
    )
    assert jsonrpc(m.a, "getProxies") == {"jsonrpc": "2.0", "result": [], "id": 1}
    m.socks_mode("junk")
    reprobe(m, lambda: cli(m, "proxy", "probe", "start"), lambda: cli(m, "proxy", "probe", "stop"), "notAProxy")
    assert json.loads(cli(m, "proxy", "list", "--json").stdout) == []


def test_probe_list_connect_curl_disconnect(mesh: Mesh) -> None:
    m = mesh
    m.socks_mode("valid")
    assert jsonrpc(m.a, "startProxyProbe")["result"] is True
    try:
        wait("b to be probed as a valid proxy", lambda: probe_status(m) == "valid", 20)
    except AssertionError:
        print(m.a.rpc("proxyd", "status"), m.a.rpc("proxyd", "stats"), m.socks.poll() if m.socks else None)
        raise
    assert json.loads(http(m.a, "GET", "/api/v1/admin/proxy")[1]) == [m.b.address]
    assert jsonrpc(m.a, "getProxies")["result"] == [m.b.address]
    assert json.loads(cli(m, "proxy", "list", "--json").stdout) == [m.b.address]
    assert m.b.address in cli(m, "proxy", "list").stdout
    remote = f"[{m.b.address}]:1080"

    # HTTP, no remote: the first valid proxy to answer
    assert http(m.a, "POST", "/api/v1/admin/proxy", {}) == (200, json.dumps(remote).encode())
    out = curl(m)
    assert out.returncode == 0 and out.stdout.encode() == PAGE, out.stderr
    assert http(m.a, "DELETE", "/api/v1/admin/proxy") == (204, b"")
    assert curl(m).returncode != 0

    # JSON-RPC, an explicit remote
    assert jsonrpc(m.a, "connectProxy", {"remote": remote})["result"] == remote
    assert curl(m).stdout.encode() == PAGE
    assert jsonrpc(m.a, "disconnectProxy")["result"] is True
    assert curl(m).returncode != 0

    # CLI
    out = cli(m, "proxy", "connect", "--remote", remote, "--json")
    assert out.returncode == 0 and json.loads(out.stdout) == remote, out.stderr
    assert curl(m).stdout.encode() == PAGE
    stats = m.a.rpc("proxyd", "stats")
    assert stats["counters"]["relay_bytes_down"] >= len(PAGE) and stats["gauges"]["remote"] == remote
    # a proxyd killed and restarted by supervisord resumes probing and the relay
    old = m.a.program_pid("proxyd")
    os.kill(old, signal.SIGKILL)
    wait("proxyd to be restarted", lambda: m.a.program_pid("proxyd") not in (0, old), 30)
    wait("the relay to be back", lambda: m.a.rpc("proxyd", "stats")["gauges"]["remote"] == remote, 30)
    assert m.a.rpc("proxyd", "stats")["gauges"]["probing"] is True
    assert curl(m).stdout.encode() == PAGE
    assert cli(m, "proxy", "disconnect").returncode == 0
    assert curl(m).returncode != 0
    assert cli(m, "proxy", "probe", "stop").returncode == 0
    assert m.a.rpc("proxyd", "stats")["gauges"]["probing"] is False


# --- DNS --------------------------------------------------------------------------


def dig(m: Mesh, *args: str) -> subprocess.CompletedProcess[str]:
    return m.topo.exec("a", ["dig", "@127.0.0.1", "+tries=1", "+time=10", *args], timeout=30)


def answers(out: subprocess.CompletedProcess[str]) -> list[str]:
    assert out.returncode == 0, out.stdout + out.stderr
    return [ln for ln in out.stdout.splitlines() if ln.strip()]


def test_dns_key_names_and_short_names(mesh: Mesh) -> None:
    m = mesh
    key = m.b.identity.public_key.hex()
    assert answers(dig(m, "+short", key_name(m.b.identity.public_key), "AAAA")) == [m.b.address]
    upper = f"{key[:20]}.{key[20:]}.MYCELIUM.".upper()  # any cut of the 64 digits, any case, over TCP
    assert answers(dig(m, "+short", upper, "AAAA", "+tcp")) == [m.b.address]
    assert answers(dig(m, "+short", "bob", "AAAA")) == [m.b.address]
    assert answers(dig(m, "+short", "bob.mycelium", "AAAA")) == [m.b.address]
    assert answers(dig(m, "+short", "web.lab", "AAAA")) == [m.b.address]
    assert answers(dig(m, "+short", "bob", "A")) == []  # the name exists, no IPv4
    assert "status: NXDOMAIN" in dig(m, "nobody.mycelium", "AAAA").stdout
    assert "status: NXDOMAIN" in dig(m, "ab" * 16 + "." + "ab" * 15 + "zz.mycelium", "AAAA").stdout


def test_dns_forwards_over_the_overlay_caches_and_times_out(mesh: Mesh) -> None:
    m = mesh
    m.start_helper("b", [str(HERE / "dns_server.py"), m.b.address, "53"])
    wait(
        "a's dnsd to choose b as its resolver node",
        lambda: m.a.rpc("dnsd", "stats")["gauges"]["upstream"] == m.b.address,
        40,
    )
    first = answers(dig(m, "+short", "www.example", "A"))
    assert len(first) == 1 and first[0].startswith("192.0.2.")
    assert answers(dig(m, "+short", "www.example", "A")) == first  # from the cache: b would count up
    assert answers(dig(m, "+short", "+tcp", "other.example", "A")) != first
    assert "status: NXDOMAIN" in dig(m, "missing.test", "A").stdout
    out = dig(m, "drop.example", "A")
    assert "status: SERVFAIL" in out.stdout, out.stdout
    counters = m.a.rpc("dnsd", "stats")["counters"]
    assert counters["answered_cache"] >= 1 and counters["servfail"] >= 1


def test_dns_port_taken_is_one_line(mesh: Mesh, tmp_path: Path) -> None:
    """a's dnsd holds port 53 in namespace a: a second node there cannot start."""
    key = tmp_path / "key"
    cmd = [
        sys.executable, "-m", "services.cli", "--enable-dns", "--no-tun", "-k", str(key), "-t", "9700", "-q", "9700",
        "--api-addr", "127.0.0.1:9701", "--jsonrpc-addr", "127.0.0.1:9702", "--run-dir", str(tmp_path / "run"),
        "--disable-peer-discovery",
    ]  # fmt: skip
    out = m_exec(mesh, cmd)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "port 53 is not available" in lines[0], out.stderr


def m_exec(m: Mesh, cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return m.topo.exec("a", cmd, timeout=30)
