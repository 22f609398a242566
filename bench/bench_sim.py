"""The router simulator at public-network scale (services/router/simulation.py).

Run: ``.venv/bin/python bench/bench_sim.py [--series 250,500,1000,2000] [--churn 0.01] [--max-gib 15] [--max-min 15]``

Scenario (``scale_run``): n nodes, ten of them hubs linked to each other and
to n/50 ordinary nodes each, the rest a random mesh of degree 3-4, one-way
delays 2-30 ms; every link comes up at t=0 and every node asks for 20
random destinations at once; traffic re-asks for missing routes every
second. Loop freedom is checked after every FIB change toward a random
sample of subnets (``--loop-sample``, 0 = all). With ``--churn`` that
fraction of the ordinary nodes leaves, stays away 10 s and rejoins as
restarted processes; the run reports when every remaining wanted pair is
routed again after the leave, and every wanted pair after the rejoin.

Each size runs in a fresh child process (so its peak RSS is its own) and
prints: wall and CPU time, convergence (virtual s), control packets per node,
routes in all tables, peak RSS. A size runs only if the power law through the
two largest sizes measured so far says it fits ``--max-gib`` and
``--max-min``; otherwise the bench prints that extrapolation and stops. The
last line is the extrapolation to ``--extrapolate`` nodes (10,000) and
whether it would fit ``--big-gib`` / ``--big-min`` (18 GiB / 40 min), in which
case it is run with ``--run-big``.

Why the sizes are small: Mycelium propagates every route a node acquires to
all its neighbours (PROTOCOL.md 6.4 step 9, 6.6.1) and every node announces
its own /64 on each link, so every node ends up with a route to every other
node whatever it asks for: n^2 routes in all, ~12 control packets each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.router.simulation import scale_run


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace, n: int) -> None:
    started = time.perf_counter()
    f = scale_run(
        n,
        hubs=args.hubs,
        destinations=args.destinations,
        seed=args.seed,
        loop_sample=args.loop_sample or None,
        churn=args.churn,
        timeout=args.timeout,
        full_check=False,
        progress=lambda text: print(f"    [{time.perf_counter() - started:7.1f} s] {text}", file=sys.stderr),
    )
    row = dict(vars(f))
    row["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(row))


def run_size(args: argparse.Namespace, n: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(n), *sys.argv[1:]]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def fit(rows: list[dict], key: str, n: int) -> float:
    """Power law through the two largest measured sizes, evaluated at ``n``."""
    a, b = rows[-2], rows[-1]
    k = math.log(b[key] / a[key]) / math.log(b["nodes"] / a["nodes"])
    return b[key] * (n / b["nodes"]) ** k


def show(r: dict) -> None:
    conv = "no" if r["convergence_s"] is None else f"{r['convergence_s']:.3f}"
    line = (
        f"  {r['nodes']:6d} {r['links']:6d} {conv:>8s} {r['quiet_packets'] / r['nodes']:9,.0f} "
        f"{r['routes_total']:11,d} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} {r['peak_rss_mib']:9,.0f}"
    )
    if r["churned"]:
        away = "no" if r["churn_away_s"] is None else f"{r['churn_away_s']:.3f}"
        back = "no" if r["churn_recovery_s"] is None else f"{r['churn_recovery_s']:.3f}"
        line += f"   {r['churned']} left: rest routed {away} s, back {back} s, {r['churn_packets']:,d} pkts"
    print(line, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--series", default="250,500,1000,2000", help="comma-separated node counts")
    ap.add_argument("--hubs", type=int, default=10)
    ap.add_argument("--destinations", type=int, default=20)
    ap.add_argument("--churn", type=float, default=0.01)
    ap.add_argument("--loop-sample", type=int, default=200, help="subnets loop-checked after every event (0 = all)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=120.0, help="virtual seconds allowed to converge")
    ap.add_argument("--max-gib", type=float, default=15.0, help="skip series sizes extrapolated above this")
    ap.add_argument("--max-min", type=float, default=15.0, help="skip series sizes extrapolated above this wall time")
    ap.add_argument("--extrapolate", type=int, default=10_000)
    ap.add_argument("--big-gib", type=float, default=18.0)
    ap.add_argument("--big-min", type=float, default=40.0)
    ap.add_argument("--run-big", action="store_true", help="run the --extrapolate size if it fits")
    ap.add_argument("--cpu", type=int, default=None, help="pin to this core")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.child is not None:
        child(args, args.child)
        return 0
    sizes = [int(x) for x in args.series.split(",") if x]
    print(
        f"router simulator: hub mesh ({args.hubs} hubs), {args.destinations} destinations each, "
        f"loop sample {args.loop_sample or 'all'}, churn {args.churn:.0%}, Python {sys.version.split()[0]}"
    )
    print("(machine shared with other developers: wall times are upper bounds; CPU is this process's)")
    print("   nodes  links  conv(s)  pkts/node  routes(all)  wall(s)   cpu(s)  peak MiB")
    rows: list[dict] = []
    ok = True
    for n in sizes:
        if len(rows) >= 2:
            gib, minutes = fit(rows, "peak_rss_mib", n) / 1024, fit(rows, "wall_s", n) / 60
            if gib > args.max_gib or minutes > args.max_min:
                print(f"  {n}: not run, extrapolated {gib:.1f} GiB and {minutes:.0f} min wall")
                break
        r = run_size(args, n)
        rows.append(r)
        show(r)
        ok = ok and r["convergence_s"] is not None and (not r["churned"] or r["churn_recovery_s"] is not None)
    if len(rows) >= 2:
        big = args.extrapolate
        gib, minutes = fit(rows, "peak_rss_mib", big) / 1024, fit(rows, "wall_s", big) / 60
        cpu_min = fit(rows, "cpu_s", big) / 60
        pkts = fit(rows, "quiet_packets", big)
        a, b = rows[-2], rows[-1]
        print(
            f"  extrapolated to {big:,} nodes (power law through {a['nodes']} and {b['nodes']}): "
            f"{gib:.1f} GiB peak RSS, {minutes:.0f} min wall, {cpu_min:.0f} min CPU, {pkts / 1e6:.0f} M packets"
        )
        fits = gib <= args.big_gib and minutes <= args.big_min
        print(f"  fits {args.big_gib:.0f} GiB and {args.big_min:.0f} min: {'yes' if fits else 'no'}")
        if fits and args.run_big:
            r = run_size(args, big)
            show(r)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
