"""Data-plane benchmark: our overlay against a plain veth pair and Yggdrasil.

    sudo .venv/bin/python bench/bench_dataplane.py [--seconds 10] [--no-yggdrasil]

In one run, between two network namespaces joined by one veth pair:

  (a) plain veth, (b) our overlay (TUN MTU 1400), (c) Yggdrasil with its
  default config and (d) Yggdrasil with IfMTU 1500,

each measured with a single-stream iperf3 TCP test and an idle ping
(20 x 0.2 s); CPU seconds per GB transferred are counted two ways:
"proc" = user+system time of the processes involved (daemons, iperf3
client and server), "sys" = the whole machine's busy time from /proc/stat
(includes softirq work done outside those processes, and anything else
running: run it on a quiet machine). Then, on three namespaces A, B, C
joined A-B, B-C, A-C, the failover outage: ping A->C every 0.1 s, take the
A-C veth down, report first lost to first answered (and the longest gap
between replies) for us and for Yggdrasil.

Needs root, iperf3, ping and (for c/d) the Debian package yggdrasil.
Prints a markdown table; docs/PERFORMANCE.md records one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.netns import (  # noqa: E402
    NODE_PORT,
    BackgroundPing,
    Topology,
    cleanup_stale,
    have_privileges,
    ping,
    wait_for,
)

YGG_PORT = 12345
SEGMENT_PAYLOAD = 1328  # TCP payload of a segment at TUN MTU 1400 (40 IPv6, 32 TCP with timestamps)
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    name: str
    gbit: float = 0.0
    gbytes: float = 0.0
    retransmits: int = 0
    rtt_ms: float = 0.0
    proc_cpu: float = 0.0  # seconds
    sys_cpu: float = 0.0  # seconds
    notes: list[str] = field(default_factory=list)
    per_packet: dict[str, float] = field(default_factory=dict)  # process role -> CPU µs per TCP segment

    def per_gb(self, cpu: float) -> float:
        return cpu / self.gbytes if self.gbytes else float("nan")


def proc_cpu(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / CLK_TCK


def sys_busy() -> float:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / CLK_TCK


def ns_pids(topo: Topology, names: list[str]) -> list[int]:
    pids: list[int] = []
    for name in names:
        out = subprocess.run(["ip", "netns", "pids", topo.ns(name)], capture_output=True, text=True)
        pids += [int(p) for p in out.stdout.split() if p.isdigit()]
    return pids


def roles(topo: Topology, src: str, dst: str) -> dict[str, int]:
    """'sender tund' etc. -> pid, for the overlay's own processes."""
    found: dict[str, int] = {}
    for side, name in (("sender", src), ("receiver", dst)):
        for pid in ns_pids(topo, [name]):
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                for service in ("tund", "peerd"):
                    if f"services.{service}" in cmd:
                        found[f"{side} {service}"] = pid
    return found


def measure(topo: Topology, src: str, dst: str, dst_addr: str, seconds: int, result: Result) -> Result:
    """iperf3 single stream src -> dst and idle ping; fills ``result``."""
    server = topo.popen(
        dst, ["iperf3", "-s", "-1", "-B", dst_addr], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(0.5)
        daemons = [p for p in ns_pids(topo, [src, dst]) if p != server.pid]
        own = roles(topo, src, dst)
        each0 = {role: proc_cpu([pid]) for role, pid in own.items()}
        cpu0, sys0 = proc_cpu(daemons), sys_busy()
        out = topo.exec(src, ["iperf3", "-c", dst_addr, "-t", str(seconds), "-J"], timeout=seconds + 30)
        cpu1, sys1 = proc_cpu(daemons), sys_busy()
        each1 = {role: proc_cpu([pid]) for role, pid in own.items()}
        data = json.loads(out.stdout)
        if "error" in data:
            raise RuntimeError(f"iperf3 {result.name}: {data['error']}")
        end = data["end"]
        duration = end["sum_received"]["seconds"]
        result.gbit = end["sum_received"]["bits_per_second"] / 1e9
        result.gbytes = end["sum_received"]["bytes"] / 1e9
        result.retransmits = int(end["sum_sent"].get("retransmits", 0))
        util = end.get("cpu_utilization_percent", {})
        iperf_cpu = (util.get("host_total", 0.0) + util.get("remote_total", 0.0)) / 100 * duration
        result.proc_cpu = (cpu1 - cpu0) + iperf_cpu
        result.sys_cpu = sys1 - sys0
        segments = result.gbytes * 1e9 / SEGMENT_PAYLOAD
        result.per_packet = {role: (each1[role] - each0[role]) / segments * 1e6 for role in own if segments}
    finally:
        with contextlib.suppress(ProcessLookupError):
            server.kill()
        server.wait(5)
    time.sleep(1)
    out = topo.exec(src, ["ping", "-6" if ":" in dst_addr else "-4", "-n", "-q", "-c", "20", "-i", "0.2", dst_addr])
    m = re.search(r"= [\d.]+/([\d.]+)/", out.stdout)
    result.rtt_ms = float(m.group(1)) if m else float("nan")
    return result


def idle_ping(topo: Topology, src: str, dst_addr: str, count: int = 30, interval: float = 0.2) -> tuple[float, float]:
    """(mean, median) RTT in ms of ``count`` lone pings ``interval`` apart:
    between two pings every process on the way goes back to sleep."""
    out = topo.exec(
        src,
        ["ping", "-6" if ":" in dst_addr else "-4", "-n", "-c", str(count), "-i", str(interval), dst_addr],
        timeout=count * interval + 30,
    )
    times = sorted(float(t) for t in re.findall(r"time=([\d.]+)", out.stdout))
    if not times:
        return float("nan"), float("nan")
    return sum(times) / len(times), times[len(times) // 2]


def run_ns(pid: int) -> int:
    """On-CPU nanoseconds of every thread of ``pid`` (schedstat: finer than
    /proc/<pid>/stat's clock ticks, which a lone ping's ~0.3 ms falls under)."""
    total = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int((task / "schedstat").read_text().split()[0])
    return total


def service_pids(topo: Topology, names: list[str]) -> dict[str, int]:
    """'tund x', 'peerd-tcp y' etc. -> pid, for our nodes' services."""
    found: dict[str, int] = {}
    for name in names:
        for pid in ns_pids(topo, [name]):
            with contextlib.suppress(OSError):
                # split on spaces too: a preforked service's title is one string (setproctitle)
                words = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").split()
                for i, w in enumerate(words):
                    if w == "-m" and i + 1 < len(words) and words[i + 1].startswith("services."):
                        service = words[i + 1].split(".")[1]
                        if service == "peerd" and "--family" in words:
                            service += "-" + words[words.index("--family") + 1]
                        found.setdefault(f"{service} {name}", pid)
    return found


def ygg_pids(topo: Topology) -> dict[str, int]:
    """'yggdrasil x' etc. -> pid: the baseline's one process per node."""
    found: dict[str, int] = {}
    for name in topo.nodes:
        for pid in ns_pids(topo, [name]):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "yggdrasil":
                    found.setdefault(f"yggdrasil {name}", pid)
    return found


def ping_cpu(
    topo: Topology, src: str, dst_addr: str, count: int, pids: dict[str, int]
) -> tuple[tuple[float, float], dict[str, float]]:
    """idle_ping, and each process's on-CPU µs per ping: the CPU during the
    pings less the same process's CPU over as long a quiet spell right after
    (its timers and telemetry)."""
    t0 = {k: run_ns(p) for k, p in pids.items()}
    start = time.monotonic()
    rtt = idle_ping(topo, src, dst_addr, count)
    spent = time.monotonic() - start
    t1 = {k: run_ns(p) for k, p in pids.items()}
    time.sleep(spent)
    t2 = {k: run_ns(p) for k, p in pids.items()}
    per = {k: ((t1[k] - t0[k]) - (t2[k] - t1[k])) / count / 1e3 for k in pids}
    return rtt, per


def idle_cpu(topo: Topology, names: list[str], seconds: float) -> dict[str, float]:
    """Percent of one core each namespace's processes used over ``seconds``
    with no traffic (user+system from /proc/<pid>/stat, 1/CLK_TCK
    resolution: over 30 s that resolves 0.03 %)."""
    pids = {name: ns_pids(topo, [name]) for name in names}
    before = {name: proc_cpu(p) for name, p in pids.items()}
    time.sleep(seconds)
    return {name: (proc_cpu(p) - before[name]) / seconds * 100 for name, p in pids.items()}


def rtt_only(topo: Topology, args: argparse.Namespace, ygg: bool) -> list[str]:
    """Idle RTT of plain veth, our overlay (each short-poll window asked
    for) and Yggdrasil, in rotation; idle CPU per node of each (round 1)."""
    _, y_addr = topo.links[("x", "y")]
    rows: dict[str, list[tuple[float, float]]] = {}
    cpu: dict[str, dict[str, float]] = {}
    per_ping: dict[str, dict[str, list[float]]] = {}
    windows = [w for w in args.spin_us.split(",") if w]
    for rnd in range(1, args.rounds + 1):
        print(f"round {rnd}: plain veth ...", flush=True)
        rows.setdefault("(a) plain veth", []).append(idle_ping(topo, "x", y_addr, args.pings))
        for w in windows:
            name = "(b) this overlay" + (f", short poll {w} µs" if w != "0" else "")
            os.environ["MYCELIUM_SPIN_US"] = w  # the nodes inherit it
            try:
                for node in topo.nodes.values():
                    node.stop(timeout=10)
                for node in topo.nodes.values():
                    node.start()
                for node in topo.nodes.values():
                    node.wait_ready(120)
            finally:
                os.environ.pop("MYCELIUM_SPIN_US", None)
            kernel = topo.nodes["y"].rpc("tund", "info").get("kernel", "?")
            name += f" (tund kernel: {kernel})"
            warm(topo, "x", topo.nodes["y"].address)
            time.sleep(1)
            print(f"round {rnd}: {name} ...", flush=True)
            rtt, per = ping_cpu(topo, "x", topo.nodes["y"].address, args.pings, service_pids(topo, list(topo.nodes)))
            rows.setdefault(name, []).append(rtt)
            for service, us in per.items():
                per_ping.setdefault(name, {}).setdefault(service, []).append(us)
            if rnd == 1:
                cpu[name] = idle_cpu(topo, ["x", "y"], args.idle_seconds)
        if ygg:
            for node in topo.nodes.values():
                node.stop(timeout=10)
            yn = Ygg(topo, "y", listen=y_addr, peers=[], mtu=None)
            xn = Ygg(topo, "x", listen=None, peers=[y_addr], mtu=None)
            try:
                warm(topo, "x", yn.address)
                time.sleep(1)
                print(f"round {rnd}: (c) Yggdrasil default ...", flush=True)
                name = "(c) Yggdrasil default"
                rtt, per = ping_cpu(topo, "x", yn.address, args.pings, ygg_pids(topo))
                rows.setdefault(name, []).append(rtt)
                for process, us in per.items():
                    per_ping.setdefault(name, {}).setdefault(process, []).append(us)
                if rnd == 1:
                    cpu["(c) Yggdrasil default"] = idle_cpu(topo, ["x", "y"], args.idle_seconds)
            finally:
                xn.stop()
                yn.stop()
    ygg_rtt = min((m for m, _ in rows.get("(c) Yggdrasil default", [])), default=float("nan"))
    lines = [
        f"idle ping: {args.pings} lone pings 0.2 s apart per path and round, {args.rounds} rounds in rotation",
        "",
        "| path | idle RTT ms, mean (best round) | median | x Yggdrasil | every round (mean ms) "
        f"| idle CPU % of a core, node x / node y ({args.idle_seconds:.0f} s) |",
        "|---|---:|---:|---:|---|---|",
    ]
    for name, values in rows.items():
        best = min(values)
        c = cpu.get(name)
        every = ", ".join(f"{m:.3f}" for m, _ in values)
        idle = f"{c['x']:.2f} / {c['y']:.2f}" if c else ""
        lines.append(f"| {name} | {best[0]:.3f} | {best[1]:.3f} | {best[0] / ygg_rtt:.2f} | {every} | {idle} |")
    for name, services in per_ping.items():
        lines += ["", f"{name}: on-CPU µs per ping, each process (every round; quiet-spell background subtracted)", ""]
        lines += ["| service | µs per ping |", "|---|---|"]
        for service in sorted(services):
            lines.append(f"| {service} | {', '.join(f'{us:.0f}' for us in services[service])} |")
    return lines


# --- our overlay ---------------------------------------------------------------------


def start_overlay(topo: Topology, links: dict[str, list[str]], extra: list[str]) -> None:
    for name, peers in links.items():
        topo.add_node(name, peers=[f"tcp://{p}:{NODE_PORT}" for p in peers], extra=extra)
    topo.start_all()


def restart_overlay(topo: Topology, kernel: str) -> None:
    """Stop the nodes and start them again with the given data-plane kernel
    ("native" or "python": MYCELIUM_NATIVE=0); the nodes inherit the variable."""
    for node in topo.nodes.values():
        node.stop(timeout=10)
    saved = os.environ.get("MYCELIUM_NATIVE")
    os.environ["MYCELIUM_NATIVE"] = "0" if kernel == "python" else "1"
    try:
        for node in topo.nodes.values():
            node.start()
        for node in topo.nodes.values():
            node.wait_ready(120)  # a loaded machine starts Python slowly
    finally:
        if saved is None:
            os.environ.pop("MYCELIUM_NATIVE", None)
        else:
            os.environ["MYCELIUM_NATIVE"] = saved
    ran = topo.nodes["y"].rpc("tund", "info").get("kernel", "?")
    if ran != kernel:
        raise RuntimeError(f"asked for the {kernel} kernel, tund runs {ran}")


def warm(topo: Topology, src: str, dst_addr: str) -> None:
    wait_for(f"{src} -> {dst_addr}", lambda: ping(topo, src, dst_addr, count=1, deadline=2), 60)


# --- Yggdrasil -----------------------------------------------------------------------------


class Ygg:
    def __init__(self, topo: Topology, name: str, listen: str | None, peers: list[str], mtu: int | None) -> None:
        self.topo = topo
        self.name = name
        conf = json.loads(
            subprocess.run(["yggdrasil", "-genconf", "-json"], capture_output=True, text=True, check=True).stdout
        )
        conf["Listen"] = [f"tcp://{listen}:{YGG_PORT}"] if listen else []
        conf["Peers"] = [f"tcp://{p}:{YGG_PORT}" for p in peers]
        conf["MulticastInterfaces"] = []
        conf["AdminListen"] = "none"
        conf["IfName"] = "ygg0"
        if mtu is not None:
            conf["IfMTU"] = mtu
        self.path = topo.base / f"ygg-{name}-{mtu}.json"
        self.path.write_text(json.dumps(conf))
        self.address = subprocess.run(
            ["yggdrasil", "-useconffile", str(self.path), "-address"], capture_output=True, text=True, check=True
        ).stdout.strip()
        self.log = open(topo.base / f"ygg-{name}-{mtu}.log", "w")  # noqa: SIM115
        self.proc = topo.popen(
            name, ["yggdrasil", "-useconffile", str(self.path)], stdout=self.log, stderr=subprocess.STDOUT
        )

    def mtu(self) -> int:
        out = self.topo.exec(self.name, ["ip", "-j", "link", "show", "ygg0"]).stdout
        return int(json.loads(out)[0]["mtu"]) if out.strip() else 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def run_ygg_pair(topo: Topology, x_addr: str, seconds: int, mtu: int | None, name: str) -> Result:
    y = Ygg(topo, "y", listen=topo.links[("x", "y")][1], peers=[], mtu=mtu)
    x = Ygg(topo, "x", listen=None, peers=[topo.links[("x", "y")][1]], mtu=mtu)
    try:
        warm(topo, "x", y.address)
        res = measure(topo, "x", "y", y.address, seconds, Result(name))
        res.notes.append(f"TUN MTU {x.mtu()}")
        return res
    finally:
        x.stop()
        y.stop()


# --- failover --------------------------------------------------------------------------------


def triangle() -> Topology:
    topo = Topology(["a", "b", "c"])
    topo.connect("a", "b", 1)
    topo.connect("b", "c", 2)
    topo.connect("a", "c", 3)
    return topo


def failover(topo: Topology, dst_addr: str) -> tuple[float, float]:
    """(first lost to first answered, longest gap between replies) in seconds."""
    warm(topo, "a", dst_addr)
    warm(topo, "c", dst_addr)
    bg = BackgroundPing(topo, "a", dst_addr, interval=0.1, seconds=90)
    try:
        wait_for("pings before the cut", lambda: len(bg.answered) >= 20, 20)
        seq = bg.last_seq()
        topo.set_link("a", "c", up=False)
        t_cut = time.time()
        wait_for("pings to resume", lambda: bg.answered_after(t_cut + 0.05) >= 20, 80)
    finally:
        bg.stop()
    outage = bg.outage(after_seq=seq)
    return (0.0 if outage is None else outage[2]), bg.max_gap(after=t_cut - 1)


def overlay_failover() -> tuple[float, float]:
    topo = triangle()
    try:
        a_ab = topo.links[("a", "b")][0]
        a_ac = topo.links[("a", "c")][0]
        b_bc = topo.links[("b", "c")][0]
        start_overlay(topo, {"a": [], "b": [a_ab], "c": [a_ac, b_bc]}, [])
        return failover(topo, topo.nodes["c"].address)
    finally:
        topo.close()


def ygg_failover() -> tuple[float, float]:
    topo = triangle()
    nodes: list[Ygg] = []
    try:
        a_ab, _ = topo.links[("a", "b")]
        a_ac, _ = topo.links[("a", "c")]
        b_bc, _ = topo.links[("b", "c")]
        nodes.append(Ygg(topo, "a", listen="0.0.0.0", peers=[], mtu=None))
        nodes.append(Ygg(topo, "b", listen="0.0.0.0", peers=[a_ab], mtu=None))
        c = Ygg(topo, "c", listen="0.0.0.0", peers=[a_ac, b_bc], mtu=None)
        nodes.append(c)
        return failover(topo, c.address)
    finally:
        for n in nodes:
            n.stop()
        topo.close()


# --- main ------------------------------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = Path("/proc/meminfo").read_text().split()[1]
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} x {cpu}, {int(mem) // 1024} MiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()} ({sys.executable}); "
        f"load average before the run {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


def table(results: list[Result], ours: Result) -> str:
    plain = results[0]
    lines = [
        "| path | Gbit/s | x plain | ours / this | retransmits | idle RTT ms | proc CPU s/GB | sys CPU s/GB | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = ours.gbit / r.gbit if r.gbit else float("nan")
        cells = [
            r.name,
            f"{r.gbit:.2f}",
            f"{r.gbit / plain.gbit:.3f}",
            f"{ratio:.2f}",
            str(r.retransmits),
            f"{r.rtt_ms:.3f}",
            f"{r.per_gb(r.proc_cpu):.1f}",
            f"{r.per_gb(r.sys_cpu):.1f}",
            ", ".join(r.notes),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="iperf3 duration (default 10)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure every path this many times in rotation, keep the best"
    )
    parser.add_argument("--no-yggdrasil", action="store_true", help="skip Yggdrasil")
    parser.add_argument("--no-failover", action="store_true", help="skip the failover measurements")
    parser.add_argument("--crypto-workers", type=int, default=1)
    parser.add_argument(
        "--kernels", default="native,python", help="data-plane kernels to measure side by side (default native,python)"
    )
    parser.add_argument(
        "--rtt-only", action="store_true", help="only idle RTT and idle CPU per node: no iperf3, no failover"
    )
    parser.add_argument(
        "--spin-us", default="0", help="with --rtt-only: short-poll windows to measure (MYCELIUM_SPIN_US), e.g. 0,1200"
    )
    parser.add_argument("--pings", type=int, default=30, help="with --rtt-only: pings per path and round")
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="with --rtt-only: idle CPU window")
    args = parser.parse_args()
    problem = have_privileges()
    if problem:
        print(f"bench_dataplane: {problem}", file=sys.stderr)
        return 1
    if shutil.which("iperf3") is None:
        print("bench_dataplane: iperf3 is missing (apt-get install iperf3)", file=sys.stderr)
        return 1
    ygg = not args.no_yggdrasil
    if ygg and shutil.which("yggdrasil") is None:
        print("bench_dataplane: yggdrasil is missing (apt-get install yggdrasil, or --no-yggdrasil)", file=sys.stderr)
        return 1
    cleanup_stale()
    before = machine()
    print(f"machine: {before}", flush=True)
    best: dict[str, Result] = {}

    every: dict[str, list[float]] = {}

    def keep(res: Result) -> None:
        print(f"    {res.gbit:.2f} Gbit/s, {res.per_gb(res.sys_cpu):.1f} s/GB", flush=True)
        every.setdefault(res.name, []).append(res.gbit)
        if res.name not in best or res.gbit > best[res.name].gbit:
            best[res.name] = res

    if args.rtt_only:
        topo = Topology(["x", "y"])
        try:
            x_addr, _ = topo.connect("x", "y", 1)
            start_overlay(topo, {"x": [], "y": [x_addr]}, [])
            lines = rtt_only(topo, args, ygg)
        finally:
            topo.close()
        print()
        print(f"machine: {before}")
        print(f"load average after the run: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        print("\n".join(lines))
        return 0
    topo = Topology(["x", "y"])
    try:
        x_addr, y_addr = topo.connect("x", "y", 1)
        start_overlay(topo, {"x": [], "y": [x_addr]}, ["--crypto-workers", str(args.crypto_workers)])
        y = topo.nodes["y"]
        warm(topo, "x", y.address)
        kernels = [k for k in args.kernels.split(",") if k]
        for rnd in range(1, args.rounds + 1):
            print(f"round {rnd}: (a) plain veth ...", flush=True)
            keep(measure(topo, "x", "y", y_addr, args.seconds, Result("(a) plain veth")))
            for kernel in kernels:
                name = "(b) this overlay" if kernel == kernels[0] else f"(b) this overlay, {kernel} kernel"
                if len(kernels) > 1 or rnd == 1:
                    restart_overlay(topo, kernel)
                    warm(topo, "x", y.address)
                print(f"round {rnd}: {name} ({kernel} kernel) ...", flush=True)
                res = measure(topo, "x", "y", y.address, args.seconds, Result(name))
                res.notes.append(f"{kernel} kernel, TUN MTU 1400, 1472-byte packets on the wire")
                sent = topo.nodes["x"].counters()
                # the default: session keys (counter nonces, replay window), which the kernel runs too
                res.notes.append(
                    "session keys"
                    if sent.get("session_established", 0) + sent.get("session_resp_sent", 0)
                    else "static keys"
                )
                if args.crypto_workers > 1:
                    res.notes.append(f"{args.crypto_workers} crypto workers")
                keep(res)
            if ygg:
                for mtu, name in ((None, "(c) Yggdrasil default"), (1500, "(d) Yggdrasil IfMTU 1500")):
                    print(f"round {rnd}: {name} ...", flush=True)
                    try:
                        keep(run_ygg_pair(topo, x_addr, args.seconds, mtu, name))
                    except (AssertionError, RuntimeError, subprocess.SubprocessError) as exc:
                        print(f"    failed, not counted: {exc}", flush=True)  # a loaded machine: skip this round
    finally:
        topo.close()
    fail: list[str] = []
    if not args.no_failover:
        print("failover (ours) ...", flush=True)
        lost, gap = overlay_failover()
        fail.append(f"| this overlay | {lost:.1f} | {gap:.2f} |")
        if ygg:
            print("failover (Yggdrasil) ...", flush=True)
            lost, gap = ygg_failover()
            fail.append(f"| Yggdrasil default | {lost:.1f} | {gap:.2f} |")
    results = list(best.values())
    print()
    print(f"machine: {before}")
    print(f"load average after the run: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    rounds = f", best of {args.rounds} rounds in rotation" if args.rounds > 1 else ""
    print(f"single-stream iperf3 TCP, {args.seconds} s, namespace x -> y over one veth pair{rounds}")
    print()
    print(table(results, best["(b) this overlay"]))
    print()
    print("CPU µs per TCP segment of each process (best round of each path)")
    print()
    ours = [r for r in results if r.name.startswith("(b)")]
    print("| process | " + " | ".join(r.name for r in ours) + " |")
    print("|---|" + "---:|" * len(ours))
    for role in ("sender tund", "sender peerd", "receiver peerd", "receiver tund"):
        print(f"| {role} | " + " | ".join(f"{r.per_packet.get(role, float('nan')):.2f}" for r in ours) + " |")
    if args.rounds > 1:
        print()
        for name, values in every.items():
            print(f"{name}, every round (Gbit/s): {', '.join(f'{v:.2f}' for v in values)}")
    if fail:
        print()
        print("failover, ping A->C every 0.1 s, A-C veth set down (triangle A-B, B-C, A-C)")
        print()
        print("| overlay | outage s (first lost to first answered) | longest gap between replies s |")
        print("|---|---|---|")
        print("\n".join(fail))
    return 0


if __name__ == "__main__":
    sys.exit(main())
