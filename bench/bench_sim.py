"""The router simulator at public-network scale (services/router/simulation.py).

Run: ``.venv/bin/python bench/bench_sim.py --nodes 1000 [--churn 0.01] [--loop-sample 200] [--baseline]``

Scenario (``scale_run``): ``--nodes`` nodes, ten of them hubs linked to each
other and to n/50 ordinary nodes each, the rest a random mesh of degree
3-4, one-way delays 2-30 ms; every link comes up at t=0 and every node asks
for 20 random destinations at once; traffic re-asks for missing routes every
second. Loop freedom is checked after every FIB change toward a random
sample of subnets (``--loop-sample``, 0 = all). With ``--churn`` that
fraction of the ordinary nodes leaves, stays away 10 s and rejoins as
restarted processes.

Printed: convergence (virtual s), control packets (per node), wall time,
peak RSS of this process. ``--baseline`` first runs the old all-pairs
figure (random mesh of degree 4, every node asking for every other) at the
same size, the scenario of the issue's 300-node figure.

Before running, the bench estimates the memory: Mycelium propagates every
acquired route to all neighbours (PROTOCOL.md 6.4 step 9, 6.6.1), so each
node ends up with a route to every node - n^2 routes in the simulation, each
about 1 KiB plus fallbacks. A size whose estimate exceeds ``--max-gib`` is
not run (10,000 nodes: 10^8 routes, ~200 GiB).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.router.simulation import mesh_convergence, scale_run

# Measured on the 300-node run (272 MiB peak): the whole simulation's peak RSS per
# node-route (selected route, fallbacks, source entries, FIB mirror, queues).
BYTES_PER_NODE_ROUTE = 2_900


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=300)
    ap.add_argument("--hubs", type=int, default=10)
    ap.add_argument("--destinations", type=int, default=20)
    ap.add_argument("--churn", type=float, default=0.01)
    ap.add_argument("--loop-sample", type=int, default=200, help="subnets loop-checked after every event (0 = all)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=120.0, help="virtual seconds allowed to converge")
    ap.add_argument("--max-gib", type=float, default=6.0, help="refuse runs estimated above this memory")
    ap.add_argument("--baseline", action="store_true", help="also run the all-pairs mesh figure at this size")
    ap.add_argument("--cpu", type=int, default=None, help="pin to this core")
    args = ap.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    n = args.nodes
    estimate_gib = n * n * BYTES_PER_NODE_ROUTE / 2**30
    print(
        f"router simulator, {n} nodes ({args.hubs} hubs), {args.destinations} destinations each, "
        f"Python {sys.version.split()[0]}"
    )
    print("(machine shared with other developers: wall times are upper bounds)")
    print(f"  estimated memory: {n * n:,} node-routes x {BYTES_PER_NODE_ROUTE} B = {estimate_gib:.1f} GiB")
    if estimate_gib > args.max_gib:
        print(f"  not run: above --max-gib {args.max_gib}")
        return 2
    if args.baseline:
        b = mesh_convergence(n, degree=4.0)
        print(
            f"  baseline all-pairs mesh: converged {b.convergence_s} virtual s, {b.quiet_packets} packets "
            f"({b.quiet_packets / n:.0f}/node), wall {b.wall_s:.1f} s, peak RSS {peak_rss_mib():.0f} MiB"
        )
    started = time.perf_counter()
    f = scale_run(
        n,
        hubs=args.hubs,
        destinations=args.destinations,
        seed=args.seed,
        loop_sample=args.loop_sample or None,
        churn=args.churn,
        timeout=args.timeout,
        progress=lambda text: print(f"    [{time.perf_counter() - started:7.1f} s] {text}", flush=True),
    )
    conv = "did not converge" if f.convergence_s is None else f"{f.convergence_s:.3f} virtual s"
    print(f"  {f.nodes} nodes, {f.links} links, {f.wanted_pairs} wanted pairs: converged in {conv}, loop-free")
    print(
        f"  control packets: {f.packets} until converged, {f.quiet_packets} until quiet "
        f"({f.quiet_packets / n:.0f} per node); {f.events} events, {f.loop_checks} loop checks"
    )
    if f.churned:
        rec = "no recovery" if f.churn_recovery_s is None else f"{f.churn_recovery_s:.3f} virtual s"
        print(
            f"  churn: {f.churned} nodes left and rejoined; every wanted pair routed again after {rec}, "
            f"{f.churn_packets} packets"
        )
    print(f"  wall {f.wall_s:.1f} s, {f.events / f.wall_s:,.0f} events/s, peak RSS {peak_rss_mib():.0f} MiB")
    return 0 if f.convergence_s is not None and (not f.churned or f.churn_recovery_s is not None) else 1


if __name__ == "__main__":
    sys.exit(main())
