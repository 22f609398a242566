"""Network namespaces joined by veth pairs, and mycelium nodes (with TUN)
running inside them, for the data-plane tests and the benchmark.

Names are unique per run and carry the creating process's pid
(``mdp<pid>x<random>-<node>``), so a run can clean up what an earlier,
crashed run of the same prefix left behind (``cleanup_stale``) without
touching a run that is still going. Every wait is bounded; ``Topology.close``
kills every process inside the namespaces, deletes them (and with them the
veths and TUN devices) and removes the run directories, even after a failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from common import bus
from common.identity import Identity
from common.shmring import remove_rings

from .nodes import REPO, all_running, stop_all, wait_for

T = TypeVar("T")
PREFIX = "mdp"
_NAME = re.compile(rf"^{PREFIX}(\d+)x[0-9a-f]+-")
CLONE_NEWNET = 0x40000000
NODE_PORT = 9651
API_PORT = 8989
_libc = ctypes.CDLL(None, use_errno=True)


def run(cmd: list[str], timeout: float = 20, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check)


def have_privileges() -> str | None:
    """Why namespace/TUN tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs and TUN devices)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    for tool in ("ip", "ping"):
        if shutil.which(tool) is None:
            return f"the {tool!r} command is missing (make installs it)"
    probe = f"{PREFIX}probe{os.getpid()}"
    out = run(["ip", "netns", "add", probe], check=False)
    if out.returncode != 0:
        return f"cannot create a network namespace: {out.stderr.strip()}"
    run(["ip", "netns", "del", probe], check=False)
    return None


def privileged_marks(what: str) -> list[pytest.MarkDecorator]:
    """``pytestmark`` of a module of namespace/TUN tests: skipped, saying why, where they cannot run."""
    marks = [pytest.mark.integration, pytest.mark.privileged]
    missing = have_privileges()
    if missing:
        marks.append(pytest.mark.skip(reason=f"{what} {missing}"))
    return marks


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _kill_ns_processes(ns: str) -> None:
    for _ in range(3):
        out = run(["ip", "netns", "pids", ns], check=False)
        pids = [int(p) for p in out.stdout.split() if p.isdigit()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def cleanup_stale() -> list[str]:
    """Delete namespaces (and their processes and directories) left by
    earlier runs whose process is gone."""
    removed = []
    out = run(["ip", "netns", "list"], check=False)
    for line in out.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _kill_ns_processes(name)
            run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    for path in Path("/tmp").glob(f"{PREFIX}*x*"):
        m = re.match(rf"^{PREFIX}(\d+)x[0-9a-f]+$", path.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
    return removed


def in_netns(ns: str, fn: Callable[[], T], timeout: float = 30) -> T:
    """Run ``fn`` in a thread that has entered namespace ``ns`` (sockets it
    creates live there)."""
    result: list[Any] = []

    def body() -> None:
        try:
            fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
            result.append(("ok", fn()))
        except BaseException as exc:
            result.append(("err", exc))

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        raise AssertionError(f"operation in namespace {ns} did not finish within {timeout} s")
    status, value = result[0]
    if status == "err":
        raise value
    return value  # type: ignore[no-any-return]


class Topology:
    def __init__(self, names: list[str]) -> None:
        self.tag = f"{PREFIX}{os.getpid()}x{secrets.token_hex(2)}"
        self.base = Path("/tmp") / self.tag
        self.base.mkdir(mode=0o755)
        os.chmod(self.base, 0o755)  # reachable by the unprivileged service user
        self.names = list(names)
        self.nodes: dict[str, NetNode] = {}
        self.links: dict[tuple[str, str], tuple[str, str]] = {}
        self.created: list[str] = []
        try:
            for name in names:
                ns = self.ns(name)
                run(["ip", "netns", "add", ns])
                self.created.append(ns)
                run(["ip", "-n", ns, "link", "set", "lo", "up"])
        except Exception:
            self.close()
            raise

    def ns(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def connect(self, a: str, b: str, index: int) -> tuple[str, str]:
        """A veth pair a<->b with 10.77.<index>.1/24 on a and .2 on b; returns the addresses."""
        ia, ib = f"v{a}{b}", f"v{b}{a}"
        run(["ip", "link", "add", ia, "netns", self.ns(a), "type", "veth", "peer", "name", ib, "netns", self.ns(b)])
        addr_a, addr_b = f"10.77.{index}.1", f"10.77.{index}.2"
        for ns, dev, addr in ((self.ns(a), ia, addr_a), (self.ns(b), ib, addr_b)):
            run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev])
            run(["ip", "-n", ns, "link", "set", dev, "up"])
        self.links[(a, b)] = (addr_a, addr_b)
        return addr_a, addr_b

    def set_link(self, a: str, b: str, up: bool) -> None:
        run(["ip", "-n", self.ns(a), "link", "set", f"v{a}{b}", "up" if up else "down"])

    def exec(
        self, name: str, cmd: list[str], timeout: float = 30, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", self.ns(name), *cmd], timeout=timeout, check=check)

    def popen(self, name: str, cmd: list[str], **kwargs: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", self.ns(name), *cmd], text=True, **kwargs)

    def add_node(
        self, name: str, tun: bool = True, peers: list[str] = (), extra: list[str] = (), discovery: bool = False
    ) -> NetNode:
        node = NetNode(self, name, tun, list(peers), list(extra), discovery)
        self.nodes[name] = node
        return node

    def start_all(self) -> None:
        """Start every node, then wait for each (they start side by side)."""
        for node in self.nodes.values():
            node.start()
        for node in self.nodes.values():
            node.wait_ready()

    def close(self) -> None:
        def stop(node: NetNode) -> None:
            with contextlib.suppress(Exception):
                node.stop(timeout=10)

        stop_all([functools.partial(stop, node) for node in self.nodes.values()])
        for ns in self.created:
            _kill_ns_processes(ns)
            run(["ip", "netns", "del", ns], check=False)
        self.created.clear()
        shutil.rmtree(self.base, ignore_errors=True)


class NetNode:
    """A `mycelium` launcher (supervisord and services) inside a namespace."""

    def __init__(
        self, topo: Topology, name: str, tun: bool, peers: list[str], extra: list[str], discovery: bool = False
    ) -> None:
        self.topo = topo
        self.discovery = discovery  # link-local discovery on (off by default: tests name their peers)
        self.name = name
        self.ns = topo.ns(name)
        self.tun = tun
        self.peers = peers
        self.extra = extra
        self.dir = topo.base / name
        self.dir.mkdir(mode=0o755)
        self.run_dir = self.dir / "run"
        self.key_file = self.dir / "priv_key.bin"
        self.key_file.write_bytes(os.urandom(32))
        self.key_file.chmod(0o600)
        self.identity = Identity.from_secret(self.key_file.read_bytes())
        self.log_path = self.dir / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.tun_name = "mycelium"
        for i, arg in enumerate(extra):
            if arg == "--tun-name":
                self.tun_name = extra[i + 1]
        self._ctx: Any = None

    @property
    def address(self) -> str:
        return str(self.identity.address)

    @property
    def subnet(self) -> str:
        return str(self.identity.subnet)

    def args(self) -> list[str]:
        args = [
            sys.executable, "-m", "services.cli",
            "-k", str(self.key_file),
            "-t", str(NODE_PORT),
            "--api-addr", f"127.0.0.1:{API_PORT}",
            "--jsonrpc-addr", f"127.0.0.1:{API_PORT + 1}",
            "--run-dir", str(self.run_dir),
            *([] if self.discovery else ["--disable-peer-discovery"]),
            *self.extra,
        ]  # fmt: skip
        if not self.tun:
            args.append("--no-tun")
        if self.peers:
            args += ["--peers", *self.peers]
        return args

    def start(self) -> NetNode:
        env = dict(os.environ, PYTHONUNBUFFERED="1", XDG_CONFIG_HOME=str(self.dir / "config"))
        env["PYTHONPATH"] = str(REPO)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *self.args()],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
                start_new_session=True,
            )
        return self

    def supervisorctl(self, *args: str) -> str:
        out = run(
            [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(self.run_dir / "supervisord.conf"), *args],
            check=False,
        )
        return out.stdout

    def all_running(self) -> bool:
        return all_running(self.supervisorctl("status"))

    def program_pid(self, program: str) -> int:
        text = self.supervisorctl("pid", program).strip()
        return int(text) if text.isdigit() else 0

    def tun_info(self) -> dict[str, Any] | None:
        out = self.topo.exec(self.name, ["ip", "-j", "-s", "addr", "show", "dev", self.tun_name])
        if out.returncode != 0:
            return None
        data = json.loads(out.stdout)
        return data[0] if data else None

    def tun_up(self) -> bool:
        info = self.tun_info()
        return info is not None and any(a.get("local") == self.address for a in info.get("addr_info", []))

    def wait_ready(self, timeout: float = 40) -> NetNode:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"node {self.name} exited ({self.proc.returncode}):\n{self.log_tail()}")
            return self.all_running() and (not self.tun or self.tun_up())

        wait_for(f"node {self.name} to start", ready, timeout, interval=0.2)
        return self

    def rpc(self, service: str, method: str, params: dict[str, Any] | None = None) -> Any:
        import zmq

        if self._ctx is None:
            self._ctx = zmq.Context()
        return bus.rpc_call(self._ctx, str(self.run_dir), service, method, params, timeout_ms=3000)

    def counters(self, service: str = "tund") -> dict[str, int]:
        return dict(self.rpc(service, "stats")["counters"])

    def selected(self) -> dict[str, dict[str, Any]]:
        return {r["subnet"]: r for r in self.rpc("router", "routes_selected")}

    def pids(self) -> list[int]:
        marker = str(self.run_dir).encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if marker in (entry / "cmdline").read_bytes():
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids

    def stop(self, timeout: float = 15) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        for pid in self.pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        remove_rings(str(self.run_dir))  # left behind if the launcher had no chance to clean up
        self.proc = None
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    def log_tail(self, lines: int = 80) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def dump_logs_on_failure(topo: Topology, session_items: list[Any]) -> None:
    """Print every node's log tail when a test of the session failed."""
    if any(getattr(getattr(item, "rep_call", None), "failed", False) for item in session_items):
        for node in topo.nodes.values():
            print(f"\n===== log of {node.name} ({node.ns}) =====\n{node.log_tail()}")


def ping(topo: Topology, src: str, dst_addr: str, count: int = 3, interval: float = 0.2, deadline: float = 10) -> bool:
    out = topo.exec(
        src,
        ["ping", "-6", "-n", "-c", str(count), "-i", str(interval), "-w", str(int(deadline)), dst_addr],
        timeout=deadline + 5,
    )
    return out.returncode == 0


_REPLY = re.compile(r"^\[(\d+\.\d+)\].*icmp_seq=(\d+)")


class BackgroundPing:
    """``ping -D -i <interval>`` in a namespace; parses which sequence numbers were answered."""

    def __init__(self, topo: Topology, src: str, dst_addr: str, interval: float = 0.1, seconds: float = 60) -> None:
        self.interval = interval
        self.proc = topo.popen(
            src,
            ["ping", "-6", "-n", "-D", "-i", str(interval), "-w", str(int(seconds)), dst_addr],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines: list[str] = []
        self.answered: dict[int, float] = {}
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            m = _REPLY.match(line)
            if m and "bytes from" in line:
                self.answered[int(m.group(2))] = float(m.group(1))

    def last_seq(self) -> int:
        return max(self.answered, default=0)

    def answered_after(self, t: float) -> int:
        return sum(1 for ts in self.answered.values() if ts > t)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._thread.join(5)

    def max_gap(self, after: float = 0.0) -> float:
        """Longest time between two successive answers (arrival times) after ``after``."""
        times = sorted(t for t in self.answered.values() if t >= after)
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def outage(self, after_seq: int = 0) -> tuple[int, int, float] | None:
        """(first lost seq, first answered seq after it, seconds) for the
        first gap after ``after_seq``; None if nothing was lost."""
        seqs = sorted(s for s in self.answered if s >= after_seq)
        for prev, nxt in itertools.pairwise(seqs):
            if nxt > prev + 1:
                return prev + 1, nxt, (nxt - prev - 1) * self.interval
        return None
