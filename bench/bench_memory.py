"""Memory of one running node: PSS and RSS of each of its processes.

Run: ``.venv/bin/python bench/bench_memory.py [--settle S]``; with
``MYCELIUM_PREFORK=0`` supervisord execs every service (the baseline of
services/cli/prefork.py's shared imports)

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to wait after start-up (default 5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mycelium-mem-") as base:
        node = Node(Path(base), "m")
        node.start()
        try:
            node.wait_ready(60)
            time.sleep(args.settle)
            assert node.proc is not None
            rows = []
            for pid in tree(node.proc.pid):
                with contextlib.suppress(OSError):
                    r = rollup(pid)
                    uss = r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)
                    rows.append((name_of(pid), r.get("Pss", 0), r.get("Rss", 0), uss))
        finally:
            node.stop()
    print(
        f"MYCELIUM_NATIVE={os.environ.get('MYCELIUM_NATIVE', '(unset)')} "
        f"MYCELIUM_PREFORK={os.environ.get('MYCELIUM_PREFORK', '(unset)')}"
    )
    print("| process | PSS MiB | RSS MiB | USS MiB |")
    print("|---|---:|---:|---:|")
    for name, pss, rss, uss in sorted(rows, key=lambda r: -r[1]):
        print(f"| {name} | {pss / 1024:.1f} | {rss / 1024:.1f} | {uss / 1024:.1f} |")
    total = [sum(r[i] for r in rows) / 1024 for i in (1, 2, 3)]
    print(f"| **node** | **{total[0]:.1f}** | {total[1]:.1f} | {total[2]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
