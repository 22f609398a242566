"""Real nodes for integration tests: each is a `mycelium` launcher process
running supervisord and the services, on loopback ports of its own.

Every wait is bounded in time; ``Node.stop`` kills the whole process group
even if the launcher hangs, so a failing test leaves no processes behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from common.programs import ON_DEMAND
from common.shmring import remove_rings

T = TypeVar("T")
MYCELIUM = [sys.executable, "-m", "services.cli"]
REPO = Path(__file__).resolve().parents[2]


def _test_port_range() -> range:
    """Where test listeners get their ports: outside the kernel's ephemeral range.

    A port that bind(0) picked and released can be picked again, or taken as
    some connection's source port, before the node that was given it binds it;
    one CI run lost two tests to that. Ports outside the ephemeral range are
    never handed out by the kernel, and ``_next_port`` never repeats one.
    """
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    if low - 10000 >= 4000:
        return range(10000, low)
    return range(high + 1, 65536)


def _start_offset(span: int) -> int:
    """Parallel runs (xdist workers, a bench beside the tests) start far apart."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    return (index * 2003 + os.getpid() * 7919) % span


_PORTS = _test_port_range()
_port_turn = iter(range(_start_offset(len(_PORTS)), 1 << 62))


def _is_free(port: int) -> bool:
    """Nothing is bound to ``port`` on TCP (IPv4 and IPv6) or UDP (dual stack)."""
    probes = [
        (socket.AF_INET6, socket.SOCK_STREAM, "::"),
        (socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0"),
        (socket.AF_INET6, socket.SOCK_DGRAM, "::"),
    ]
    for family, kind, host in probes:
        with socket.socket(family, kind) as s:
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def _next_port() -> int:
    """The next free port of this process's turn through ``_PORTS``."""
    for _ in range(len(_PORTS)):
        port = _PORTS[next(_port_turn) % len(_PORTS)]
        if _is_free(port):
            return port
    raise RuntimeError(f"no free port in {_PORTS.start}-{_PORTS.stop - 1}")


def free_port() -> int:
    """A TCP port free on both IPv4 and IPv6 loopback/any, not handed out before."""
    return _next_port()


def free_udp_port() -> int:
    """A UDP port free on the dual-stack wildcard (QUIC listeners), not handed out before."""
    return _next_port()


def wait_for(what: str, fn: Callable[[], T | None], timeout: float, interval: float = 0.1) -> T:
    """Poll ``fn`` until it returns something truthy; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = fn()
            if result:
                return result
        except Exception as exc:  # the thing polled may not be up yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_exc})")


def all_running(status: str) -> bool:
    """``supervisorctl status`` says every program runs, but the on-demand
    ones (common/wake.py) that no request has started yet."""
    lines = [line for line in status.splitlines() if line.strip()]
    waiting = [line for line in lines if line.split()[0] in ON_DEMAND and "Not started" in line]
    return len(lines) >= 4 and all("RUNNING" in line for line in lines if line not in waiting)


def stop_all(stops: list[Callable[[], None]]) -> None:
    """Run every node's stop at once: a graceful node stop is seconds of
    supervisord ticks, and teardowns stopped nodes one after another."""
    if not stops:
        return
    with ThreadPoolExecutor(len(stops)) as pool:
        for future in [pool.submit(stop) for stop in stops]:
            future.result()


class Node:
    def __init__(self, base: Path, name: str) -> None:
        self.name = name
        self.dir = base / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = self.dir / "run"
        self.key_file = self.dir / "priv_key.bin"
        self.log_path = self.dir / "node.log"
        self.tcp_port = free_port()
        self.quic_port = free_udp_port()
        self.api_port = free_port()
        self.rpc_port = free_port()
        self.peers: list[str] = []
        self.extra_args: list[str] = []
        self.env: dict[str, str] = {}  # on top of the test's environment
        self.proc: subprocess.Popen[bytes] | None = None
        self._info: dict[str, Any] | None = None

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.tcp_port}"

    @property
    def quic_endpoint(self) -> str:
        return f"quic://127.0.0.1:{self.quic_port}"

    def args(self) -> list[str]:
        args = [
            *MYCELIUM,
            "--no-tun",
            "-k", str(self.key_file),
            "-t", str(self.tcp_port),
            "-q", str(self.quic_port),
            "--api-addr", f"127.0.0.1:{self.api_port}",
            "--jsonrpc-addr", f"127.0.0.1:{self.rpc_port}",
            "--run-dir", str(self.run_dir),
            "--disable-peer-discovery",
        ]  # fmt: skip
        if self.peers:
            args += ["--peers", *self.peers]
        return args + self.extra_args

    def start(self) -> Node:
        env = dict(os.environ, PYTHONUNBUFFERED="1", XDG_CONFIG_HOME=str(self.dir / "config"), **self.env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
            )
        return self

    def wait_ready(self, timeout: float = 30) -> Node:
        wait_for(f"{self.name} API", lambda: self.api("/api/v1/admin"), timeout)
        wait_for(f"{self.name} services", lambda: self.all_running(), timeout)
        return self

    def stop(self, timeout: float = 15) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._kill_leftovers()
        remove_rings(str(self.run_dir))  # what the launcher removes on a clean stop
        self.proc = None

    def kill(self) -> None:
        """Crash the whole node at once (launcher, supervisord, services)."""
        self._kill_leftovers()
        if self.proc is not None:
            self.proc.wait(10)
        remove_rings(str(self.run_dir))  # a crashed node leaves its shared-memory rings behind
        self.proc = None

    def pids(self) -> list[int]:
        """Every live process of this node: the launcher and anything whose
        command line names its run directory (supervisord and the services)."""
        marker = str(self.run_dir).encode()
        pids = [] if self.proc is None or self.proc.poll() is not None else [self.proc.pid]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker in cmdline and int(entry.name) not in pids:
                pids.append(int(entry.name))
        return pids

    def _kill_leftovers(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    # --- observation --------------------------------------------------------

    def api(self, path: str, method: str = "GET", body: Any = None, timeout: float = 5) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.api_port}{path}", data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def api_status(self, path: str, method: str = "GET", body: Any = None, timeout: float = 5) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.api_port}{path}", data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    @property
    def info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = self.api("/api/v1/admin")
        return self._info

    @property
    def subnet(self) -> str:
        return str(self.info["nodeSubnet"])

    @property
    def address(self) -> str:
        return str(self.info["nodeIp"])

    def selected(self) -> dict[str, dict[str, Any]]:
        return {r["subnet"]: r for r in self.api("/api/v1/admin/routes/selected")}

    def alive_peers(self) -> int:
        return sum(1 for p in self.api("/api/v1/admin/peers") if p["connectionState"] == "alive")

    def counters(self, service: str) -> dict[str, int]:
        return dict(self.api("/api/v1/admin/services").get(service, {}).get("counters", {}))

    def supervisorctl(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(self.run_dir / "supervisord.conf"), *args],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout

    def program_pid(self, program: str) -> int:
        return int(self.supervisorctl("pid", program).strip())

    def all_running(self) -> bool:
        return all_running(self.supervisorctl("status"))

    def start_proxyd(self) -> None:
        """Start the on-demand proxyd the way a user does, with a first proxy request."""
        assert self.api("/api/v1/admin/proxy") == []
        wait_for(f"{self.name}'s proxyd running", lambda: "RUNNING" in self.supervisorctl("status", "proxyd"), 20)

    def lookup(self, address: str) -> str | None:
        """Ask for a key by address; a miss starts a route query on the node."""
        status, body = self.api_status(f"/api/v1/pubkey/{address}")
        return json.loads(body)["publicKey"] if status == 200 else None

    def counter_report(self) -> str:
        """Every service's non-zero counters, one line each (for a failed test's
        output: which stage a lost packet or message stopped at)."""
        if self.proc is None or self.proc.poll() is not None:
            return "(node not running)"
        try:
            services = self.api("/api/v1/admin/services", timeout=3)
        except Exception as exc:  # a failing node may not answer
            return f"(no answer: {exc})"
        lines = []
        for name, fields in sorted(services.items()):
            counters = fields.get("counters") or {} if isinstance(fields, dict) else {}
            shown = " ".join(f"{k}={v}" for k, v in sorted(counters.items()) if v)
            lines.append(f"{name}: {shown}")
        return "\n".join(lines)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def learn_all_routes(nodes: list[Node], timeout: float) -> float:
    """Every node asks for every other node; returns seconds until all have a selected route."""
    start = time.monotonic()

    def done() -> bool:
        missing = 0
        for a in nodes:
            selected = a.selected()
            for b in nodes:
                if b is not a and b.subnet not in selected:
                    a.lookup(b.address)
                    missing += 1
        return missing == 0

    wait_for("every node to have a route to every other node", done, timeout, interval=0.2)
    return time.monotonic() - start
