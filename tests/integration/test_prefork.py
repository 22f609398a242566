"""A real node's services are forked by supervisord from one preloaded
interpreter (services/cli/prefork.py): each is still its own process with
the name, privileges and restart of an exec'ed one, and shares the
preloaded modules' pages with supervisord, which an exec'ed one cannot."""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from services.cli.prefork import PREFORK_ENV

from .nodes import Node, wait_for

PROGRAMS = {
    "router": "router",
    "tund": "tund",
    "apid": "apid",
    "msgbus": "msgbus",
    "proxyd": "proxyd",
    "peerd-tcp": "peerd",
    "peerd-quic": "peerd",
}
UNPRIVILEGED = ("router", "apid", "msgbus", "proxyd", "peerd-tcp", "peerd-quic")
PAGE = os.sysconf("SC_PAGE_SIZE")
ROOT = os.geteuid() == 0


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def shared_anonymous_pages(a: int, b: int) -> int:
    """Pages of ``b``'s heap and anonymous mappings that are the same
    physical page as ``a``'s at the same address (needs root: the page
    frame numbers of /proc/<pid>/pagemap read as 0 otherwise)."""
    count = 0
    for line in Path(f"/proc/{b}/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[5] != "[heap]":
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        n = (end - start) // PAGE
        frames = []
        for pid in (a, b):
            with open(f"/proc/{pid}/pagemap", "rb") as f:
                f.seek(start // PAGE * 8)
                data = f.read(n * 8)
            frames.append([v & ((1 << 55) - 1) if v >> 63 else 0 for (v,) in struct.iter_unpack("<Q", data)])
        count += sum(1 for x, y in zip(*frames, strict=False) if x and x == y)
    return count


def started(make_nodes: Callable[[int], list[Node]], env: dict[str, str] | None = None, wake: bool = True) -> Node:
    """A running node; with ``wake``, proxyd (on demand) started by a first proxy request."""
    (node,) = make_nodes(1)
    node.env = env or {}
    node.start().wait_ready()
    if wake:
        node.start_proxyd()
    return node


def services_health(node: Node) -> dict[str, str]:
    """Health as the dashboard shows it."""
    return {s["name"]: s["health"] for s in node.api("/dashboard/api/state")["services"]}


def test_proxyd_starts_on_the_first_proxy_request_and_is_then_supervised(
    make_nodes: Callable[[int], list[Node]],
) -> None:
    node = started(make_nodes, wake=False)
    assert "Not started" in node.supervisorctl("status", "proxyd") and node.program_pid("proxyd") == 0
    assert wait_for("proxyd idle", lambda: services_health(node).get("proxyd") == "idle" or None, 10)
    wake = str(node.run_dir / "wake.sock")
    router = node.program_pid("router")
    log = node.run_dir / "logs" / "supervisord.log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
        junk = (b"router", b"tund", b"", b"\xff" * 200, b"proxyd\x00", b"apid")  # refused: nothing starts
        for datagram in (junk + junk)[:10]:
            client.sendto(datagram, wake)
    # the 10th refusal is logged: every datagram has been read by then
    wait_for("the refusals read", lambda: "refused 10 datagram(s)" in log.read_text(), 10)
    assert "Not started" in node.supervisorctl("status", "proxyd")
    assert node.program_pid("router") == router and node.all_running()

    t0 = time.monotonic()
    assert node.api("/api/v1/admin/proxy") == []  # the first request waits for proxyd to come up
    first = time.monotonic() - t0
    wait_for("proxyd running", lambda: "RUNNING" in node.supervisorctl("status", "proxyd"), 20)
    pid = node.program_pid("proxyd")
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "proxyd"
    wait_for("proxyd up", lambda: services_health(node).get("proxyd") == "up" or None, 10)
    assert node.api("/api/v1/admin/proxy") == [] and node.program_pid("proxyd") == pid  # running: not started twice
    print(f"first proxy request {first:.2f} s (proxyd started for it)")

    os.kill(pid, signal.SIGKILL)  # from now on an ordinary supervised program
    wait_for("proxyd restarted", lambda: node.program_pid("proxyd") not in (0, pid) or None, 20)
    wait_for("proxyd running again", lambda: "RUNNING" in node.supervisorctl("status", "proxyd"), 20)
    assert node.api("/api/v1/admin/proxy") == []


def test_each_service_is_a_forked_process_with_its_own_name_and_privileges(
    make_nodes: Callable[[int], list[Node]],
) -> None:
    node = started(make_nodes)
    pids = {program: node.program_pid(program) for program in PROGRAMS}
    parents = {int(status(pid)["PPid"]) for pid in pids.values()}
    assert len(parents) == 1 and len(set(pids.values())) == len(PROGRAMS)
    (supervisord,) = parents
    for program, pid in pids.items():
        words = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert f"-m services.{PROGRAMS[program]} --run-dir {node.run_dir}" in words, (program, words)
        assert Path(f"/proc/{pid}/comm").read_text().strip() == PROGRAMS[program]
        if ROOT:  # what the launcher's setpriv (or the service user) gives an exec'ed service
            assert shared_anonymous_pages(supervisord, pid) * PAGE > 2 << 20
    if ROOT:
        for program in UNPRIVILEGED:
            st = status(pids[program])
            assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0, (program, st["CapEff"])
            if st["Uid"].split()[0] == "0":  # the capability drop in place of the service user (setpriv's)
                assert int(st["CapBnd"], 16) == 0 and st["NoNewPrivs"] == "1", (program, st["CapBnd"])


def test_a_killed_service_is_forked_again_and_works(make_nodes: Callable[[int], list[Node]]) -> None:
    node = started(make_nodes)
    before = node.program_pid("router")
    os.kill(before, signal.SIGKILL)
    after = wait_for("router restarted", lambda: (p := node.program_pid("router")) != before and p, 20)
    wait_for("all services running", node.all_running, 20)
    assert Path(f"/proc/{after}/comm").read_text().strip() == "router"
    wait_for("routes answered", lambda: node.api("/api/v1/admin/routes/selected") is not None, 10)
    if ROOT:
        parent = int(status(after)["PPid"])
        assert shared_anonymous_pages(parent, after) * PAGE > 2 << 20


@pytest.mark.skipif(not ROOT, reason="comparing page frames between processes needs root (/proc/<pid>/pagemap)")
def test_without_prefork_the_services_are_execed(make_nodes: Callable[[int], list[Node]]) -> None:
    node = started(make_nodes, {PREFORK_ENV: "0"})
    pid = node.program_pid("router")
    parent = int(status(pid)["PPid"])
    assert b"supervisor.supervisord" in Path(f"/proc/{parent}/cmdline").read_bytes()
    assert shared_anonymous_pages(parent, pid) == 0


def test_a_node_stops_its_programs_by_priority_level(make_nodes: Callable[[int], list[Node]]) -> None:
    """supervisord, as the prefork server runs it, stops every program of a
    priority level at once: still peerd first (neighbours see the links go
    before anything else) and router last."""
    node = started(make_nodes)
    pids = {program: node.program_pid(program) for program in PROGRAMS}
    assert node.proc is not None
    os.kill(node.proc.pid, signal.SIGTERM)
    gone: dict[str, float] = {}
    deadline = time.monotonic() + 30
    while len(gone) < len(pids) and time.monotonic() < deadline:
        now = time.monotonic()
        for program, pid in pids.items():
            if program not in gone and not Path(f"/proc/{pid}").exists():
                gone[program] = now
        time.sleep(0.01)
    assert len(gone) == len(pids), f"still running after 30 s: {set(pids) - set(gone)}"
    peerd = max(gone["peerd-tcp"], gone["peerd-quic"])
    middle = [gone[p] for p in ("tund", "apid", "msgbus", "proxyd")]
    assert all(peerd <= t for t in middle), gone
    assert all(t <= gone["router"] for t in middle), gone
    node.proc.wait(15)
