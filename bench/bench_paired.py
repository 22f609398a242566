"""Two checkouts of this project measured side by side in the same minutes:
lone-ping RTT and each data-path process's CPU per ping, then single-stream
iperf3 throughput and CPU per GB.

Why: on a shared VM whole bench runs move more than the changes they are
meant to judge (docs/PERFORMANCE.md, session 17: rounds of 1.46-4.1 ms for
the same code). Here both builds run at once, each in its own pair of
namespaces, and the measurement alternates between them in short blocks
while the other build's processes are stopped (SIGSTOP), so a burst of
load elsewhere falls on both alike. The first pings after a thaw are not
counted (the thawed processes' timers fire then).

Usage (root, iperf3; each checkout with its kernel built, `make native`):

    sudo .venv/bin/python bench/bench_paired.py BASE_CHECKOUT NEW_CHECKOUT [--blocks 10] [--pings 25] [--iperf 4]

Each build is started by that checkout's own copy of this script
(``--hold``), so each runs its own code; this one only alternates.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROLES = ["tund x", "peerd-tcp x", "peerd-tcp y", "tund y"]
SKIP_AFTER_THAW = 3
START_TIMEOUT = 240.0  # seconds for both builds to start on a loaded machine
HOLD_LIMIT = 4 * 3600.0  # a holder left behind stops by itself


sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dataplane as bd  # noqa: E402  (this checkout's: its Topology starts this checkout's code)


def hold(info: str, stop: str) -> int:
    """Start the bench's two-node overlay from this checkout, describe it in
    ``info``, and keep it until ``stop`` exists."""
    topo = bd.Topology(["x", "y"])
    try:
        x_addr, _ = topo.connect("x", "y", 1)
        bd.start_overlay(topo, {"x": [], "y": [x_addr]}, [])
        bd.warm(topo, "x", topo.nodes["y"].address)
        desc = {
            "ns": [topo.ns("x"), topo.ns("y")],
            "addr": topo.nodes["y"].address,
            "pids": bd.service_pids(topo, list(topo.nodes)),
            "all": bd.ns_pids(topo, ["x", "y"]),
            "kernel": topo.nodes["y"].rpc("tund", "info").get("kernel", "?"),
        }
        Path(info + ".tmp").write_text(json.dumps(desc))
        os.replace(info + ".tmp", info)
        end = time.monotonic() + HOLD_LIMIT
        while not os.path.exists(stop) and time.monotonic() < end:
            time.sleep(0.5)
    finally:
        topo.close()
    return 0


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


class Build:
    def __init__(self, label: str, desc: dict[str, object]) -> None:
        self.label = label
        ns: list[str] = list(desc["ns"])  # type: ignore[call-overload]
        self.ns_x, self.ns_y = ns[0], ns[1]
        self.addr = str(desc["addr"])
        self.pids: dict[str, int] = dict(desc["pids"])  # type: ignore[call-overload]
        self.all: list[int] = list(desc["all"])  # type: ignore[call-overload]
        self.kernel = str(desc["kernel"])
        self.rtt: list[float] = []
        self.cpu = dict.fromkeys(ROLES, 0)
        self.counted = 0
        self.gbit: list[float] = []
        self.tput_cpu = dict.fromkeys(ROLES, 0)
        self.gbytes = 0.0

    def cpu_now(self) -> dict[str, int]:
        return {role: bd.run_ns(self.pids[role]) for role in ROLES if role in self.pids}

    def ping_block(self, pings: int) -> None:
        for i in range(pings):
            time.sleep(0.2)
            before = self.cpu_now()
            out = subprocess.run(
                ["ip", "netns", "exec", self.ns_x, "ping", "-6", "-n", "-c", "1", "-W", "2", self.addr],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout
            after = self.cpu_now()
            if i < SKIP_AFTER_THAW:
                continue
            m = re.search(r"time=([\d.]+)", out)
            if m:
                self.rtt.append(float(m.group(1)))
            self.counted += 1
            for role in before:
                self.cpu[role] += after[role] - before[role]

    def iperf(self, seconds: int) -> None:
        server = subprocess.Popen(
            ["ip", "netns", "exec", self.ns_y, "iperf3", "-s", "-1", "-B", self.addr],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)
            before = self.cpu_now()
            out = subprocess.run(
                ["ip", "netns", "exec", self.ns_x, "iperf3", "-c", self.addr, "-t", str(seconds), "-J"],
                capture_output=True,
                text=True,
                timeout=seconds + 60,
            ).stdout
            after = self.cpu_now()
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=10)
            if server.poll() is None:
                server.kill()
        try:
            got = json.loads(out)["end"]["sum_received"]
        except (ValueError, KeyError):
            print(f"  {self.label}: iperf3 failed, not counted", flush=True)
            return
        self.gbit.append(got["bits_per_second"] / 1e9)
        self.gbytes += got["bytes"] / 1e9
        for role in before:
            self.tput_cpu[role] += after[role] - before[role]

    def report(self) -> list[str]:
        lines = [f"{self.label} (tund kernel: {self.kernel})"]
        if self.rtt:
            r = sorted(self.rtt)
            q = len(r) // 4
            per = ", ".join(f"{role} {self.cpu[role] / self.counted / 1e3:.0f}" for role in ROLES if role in self.cpu)
            total = sum(self.cpu.values()) / self.counted / 1e3
            lines.append(
                f"  idle RTT: {len(r)} pings, median {statistics.median(r):.3f} ms (p25 {r[q]:.3f}, "
                f"p75 {r[-q - 1]:.3f}), mean {statistics.mean(r):.3f}"
            )
            lines.append(f"  CPU µs per ping (timers included): {per}; sum {total:.0f}")
        if self.gbit:
            per = ", ".join(f"{role} {self.tput_cpu[role] / 1e9 / self.gbytes:.2f}" for role in ROLES)
            total = sum(self.tput_cpu.values()) / 1e9 / self.gbytes
            lines.append(f"  single stream Gbit/s: {', '.join(f'{g:.2f}' for g in self.gbit)}")
            lines.append(f"  CPU s/GB: {per}; sum {total:.2f}")
        return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkouts", nargs="*", help="BASE and NEW checkouts")
    parser.add_argument("--blocks", type=int, default=10, help="ping blocks per build (default 10)")
    parser.add_argument("--pings", type=int, default=25, help="pings per block, 0.2 s apart (default 25)")
    parser.add_argument("--iperf", type=int, default=4, help="iperf3 runs per build (default 4; 0: none)")
    parser.add_argument("--seconds", type=int, default=5, help="seconds per iperf3 run (default 5)")
    parser.add_argument("--hold", nargs=2, metavar=("INFO", "STOP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold:
        return hold(*args.hold)
    if len(args.checkouts) != 2:
        parser.error("give two checkouts: BASE NEW")
    if os.geteuid() != 0:
        print("bench_paired: needs root (network namespaces)", file=sys.stderr)
        return 1
    trees = [Path(c).resolve() for c in args.checkouts]
    for tree in trees:
        if not (tree / "bench" / "bench_paired.py").exists():
            print(f"bench_paired: {tree} has no bench/bench_paired.py (copy this one there)", file=sys.stderr)
            return 1
    bd.cleanup_stale()
    work = Path(tempfile.mkdtemp(prefix="bench-paired-"))
    stop = str(work / "stop")
    holders = []
    builds: list[Build] = []
    try:
        for i, tree in enumerate(trees):
            cmd = [sys.executable, str(tree / "bench" / "bench_paired.py"), "--hold", str(work / f"info{i}"), stop]
            holders.append(subprocess.Popen(cmd, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + START_TIMEOUT
        for i, tree in enumerate(trees):
            info_file = work / f"info{i}"
            while not info_file.exists():
                if time.monotonic() > deadline or holders[i].poll() is not None:
                    print(f"bench_paired: the build in {tree} did not start", file=sys.stderr)
                    return 1
                time.sleep(0.5)
            builds.append(Build(["base", "new"][i] + f" {tree}", json.loads(info_file.read_text())))
        print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
        try:
            for block in range(args.blocks):
                for b in builds if block % 2 == 0 else builds[::-1]:
                    other = builds[1] if b is builds[0] else builds[0]
                    signal_all(other.all, signal.SIGSTOP)
                    signal_all(b.all, signal.SIGCONT)
                    time.sleep(1.0)
                    b.ping_block(args.pings)
                print(f"ping block {block + 1}/{args.blocks} done", flush=True)
            for run in range(args.iperf):
                for b in builds if run % 2 == 0 else builds[::-1]:
                    other = builds[1] if b is builds[0] else builds[0]
                    signal_all(other.all, signal.SIGSTOP)
                    signal_all(b.all, signal.SIGCONT)
                    b.iperf(args.seconds)
                print(f"iperf3 run {run + 1}/{args.iperf} done", flush=True)
        finally:
            for b in builds:
                signal_all(b.all, signal.SIGCONT)
        print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        for b in builds:
            print("\n".join(b.report()))
    finally:
        Path(stop).touch()
        for h in holders:
            try:
                h.wait(timeout=60)
            except subprocess.TimeoutExpired:
                h.kill()
        with contextlib.suppress(OSError):
            for f in work.iterdir():
                f.unlink()
            work.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
