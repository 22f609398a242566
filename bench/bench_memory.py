"""Memory of one running node: PSS and RSS of each of its processes.

Run: ``.venv/bin/python bench/bench_memory.py [--modes M,M,...] [--rounds N] [--settle S]``

The modes, measured in rotation in one run so that each has its baselines
beside it: ``fork+immortal`` (the default node: services forked from one
interpreter whose objects were made immortal, services/cli/prefork.py;
proxyd waits for its first request, common/wake.py), ``fork+immortal+proxyd``
(the same after a proxy request started proxyd),
``fork`` (``MYCELIUM_IMMORTAL=0``: forked, objects mortal) and ``exec``
(``MYCELIUM_PREFORK=0``: supervisord execs every service).

Starts one ``--no-tun`` node on loopback the way the integration tests
do (tests/integration/nodes.py), waits until every service runs and a few
seconds more, then reads ``/proc/<pid>/smaps_rollup`` of every process in
the node's process tree (launcher, supervisord, the services). PSS divides
shared pages (the interpreter, shared libraries) among the processes that
map them, so the column adds up to what the node costs the machine. USS
(private pages only) is what a process's exit would give back: a forked
service shares the parent's pages until it writes them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.nodes import Node


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
    return sorted(set(out))


def rollup(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0])  # kB
    return out


def name_of(pid: int) -> str:
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    words = [w for part in cmd if part for w in part.decode().split(" ")]  # a forked service's title is one string
    if "mycelium-launcher" in words:  # the launcher after it exec'ed its shell waiter (services/cli/launcher.py)
        return "launcher (sh)"
    if "services.cli.prefork" in words:
        return "supervisord (prefork)"
    for i, w in enumerate(words):
        if w.startswith("services."):
            family = words[words.index("--family") + 1] if "--family" in words[i:-1] else None
            return w.removeprefix("services.") + (f"-{family}" if family else "")
    if any("supervisord" in w for w in words):
        return "supervisord"
    return " ".join(words[:3])[:40]


MODES: dict[str, dict[str, str]] = {
    "fork+immortal": {},
    "fork+immortal+proxyd": {},  # the same node after a first proxy request started proxyd
    "fork": {"MYCELIUM_IMMORTAL": "0"},
    "exec": {"MYCELIUM_PREFORK": "0"},
}
WOKEN = ("fork+immortal+proxyd",)
Row = tuple[str, int, int, int]  # process, PSS, RSS, USS (KiB)


def measure(settle: float, env: dict[str, str], wake: bool = False) -> list[Row]:
    """One node started with ``env`` added to ours (the node inherits it);
    with ``wake``, its on-demand proxyd started by a proxy request first."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with tempfile.TemporaryDirectory(prefix="mycelium-mem-") as base:
            node = Node(Path(base), "m")
            node.start()
            try:
                node.wait_ready(60)
                if wake:
                    node.api("/api/v1/admin/proxy")
                time.sleep(settle)
                assert node.proc is not None
                rows = []
                for pid in tree(node.proc.pid):
                    with contextlib.suppress(OSError):
                        r = rollup(pid)
                        uss = r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)
                        rows.append((name_of(pid), r.get("Pss", 0), r.get("Rss", 0), uss))
                return rows
            finally:
                node.stop()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to wait after start-up (default 5)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--rounds", type=int, default=1, help="measure every mode this many times in rotation")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    rounds_n = max(1, args.rounds)
    runs: dict[str, list[list[Row]]] = {m: [] for m in modes}
    for rnd in range(1, rounds_n + 1):
        for mode in modes:
            print(f"round {rnd}: {mode} ...", flush=True)
            runs[mode].append(measure(args.settle, MODES[mode], mode in WOKEN))
    print(f"\nMYCELIUM_NATIVE={os.environ.get('MYCELIUM_NATIVE', '(unset)')}; load average {os.getloadavg()[0]:.2f}")
    print("\nwhole node, every round (MiB): PSS (USS)\n")
    print("| mode | " + " | ".join(f"round {i + 1}" for i in range(rounds_n)) + " |")
    print("|---|" + "---:|" * rounds_n)
    for mode, rounds in runs.items():
        cells = [f"{mib(sum(r[1] for r in rows))} ({mib(sum(r[3] for r in rows))})" for rows in rounds]
        print(f"| {mode} | " + " | ".join(cells) + " |")
    print("\nper process, last round: PSS / USS (MiB)\n")
    last = {mode: {name: (pss, uss) for name, pss, _rss, uss in rounds[-1]} for mode, rounds in runs.items()}
    names = sorted({n for per in last.values() for n in per}, key=lambda n: -last[modes[0]].get(n, (0, 0))[0])
    print("| process | " + " | ".join(modes) + " |")
    print("|---|" + "---:|" * len(modes))
    for name in names:
        cells = [f"{mib(last[m][name][0])} / {mib(last[m][name][1])}" if name in last[m] else "-" for m in modes]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
