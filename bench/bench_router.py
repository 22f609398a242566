"""Router engine alone on one core: Updates/s, route and seqno requests/s,
bytes per route (tracemalloc) at a public-node-sized table.

Run: ``.venv/bin/python bench/bench_router.py [--routes N] [--cpu C]``

Rows:
  updates       N fresh subnets from three neighbours: filters (router id owns
                subnet), feasibility, selection, triggered update to the
                other neighbours, FIB output (drained like the service does)
  refresh       the same N Updates again (same seqno/metric: the steady state
                of periodic re-announcements)
  route_req     N RouteRequests for subnets in the table (answered from it)
  seqno_req     N SeqNoRequests for subnets in the table (answered from it)
  bytes/route   tracemalloc growth of the engine while learning N routes,
                divided by N (Update objects the bench built are excluded)
  RSS           a fresh child process that imports only the engine and fills
                one engine with N routes from three neighbours (Updates
                decoded from wire bytes, as the service receives them):
                its resident set before and after, and the growth per route
The ``baseline`` row is a plain dict insert per Update in the same run, the
floor any table costs in this interpreter on this (shared) machine.
All rates are per CPU second of this process (time.process_time), so other
developers' load on the shared machine slows them less than wall time would.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.identity import address_of, subnet_of
from common.wire.tlv import RouteRequest, SeqNoRequest, Update, decode_tlv
from services.router.engine import PeerInfo, RouterEngine


def make_updates(n: int, seed: int = 7) -> list[Update]:
    """Updates whose router ids own their subnets (random 32-byte keys: the
    engine derives the address with BLAKE3; it never needs a curve point)."""
    rng = random.Random(seed)
    out = []
    seen = set()
    while len(out) < n:
        pk = rng.randbytes(32)
        subnet = subnet_of(address_of(pk))
        if subnet in seen:
            continue
        seen.add(subnet)
        out.append(Update(0, 30_000, 1, 100, subnet, pk + b"\0\0" + rng.randbytes(6)))
    return out


LEARN_FROM = ["tcp-1-0", "tcp-1-1", "tcp-1-2"]  # no neighbour may hold more than half the table


def new_engine(peers: int = 4) -> RouterEngine:
    rng = random.Random(1)
    pk = rng.randbytes(32)
    e = RouterEngine(pk, pk + bytes(8), 0.0)
    for i in range(peers):
        e.peer_up(PeerInfo(f"tcp-1-{i}", 10, f"peer{i}"), 0.0)
    e.tlvs_to_send()
    e.fib_changes()
    return e


def feed(e: RouterEngine, peers: list[str], tlvs: list, now: float, slice_len: int = 256) -> float:
    """CPU seconds to feed ``tlvs`` (slice by slice, each slice from the next
    peer in turn) and drain the outputs after every slice, as the service does."""
    receive = e.receive_tlv
    start = time.process_time()
    for k, i in enumerate(range(0, len(tlvs), slice_len)):
        peer = peers[k % len(peers)]
        for tlv in tlvs[i : i + slice_len]:
            receive(peer, tlv, now)
        e.tlvs_to_send()
        e.fib_changes()
    return time.process_time() - start


def bench(n: int) -> dict[str, float]:
    updates = make_updates(n)
    results: dict[str, float] = {}

    start = time.process_time()
    d = {}
    for u in updates:
        d[(u.subnet, "tcp-1-0")] = (u.router_id, u.seqno, u.metric)
    results["baseline dict insert/s"] = n / (time.process_time() - start)
    del d

    e = new_engine()
    results["updates/s"] = n / feed(e, LEARN_FROM, updates, 1.0)
    results["refresh updates/s"] = n / feed(e, LEARN_FROM, updates, 2.0)
    requests = [RouteRequest(0, u.subnet) for u in updates]
    results["route requests/s"] = n / feed(e, ["tcp-1-3"], requests, 3.0)
    seqnos = [SeqNoRequest(1, 64, u.router_id, u.subnet) for u in updates]
    results["seqno requests/s"] = n / feed(e, ["tcp-1-3"], seqnos, 4.0)
    del e

    # Memory: Updates decoded from wire bytes inside the traced window, as
    # the service does, so whatever the table keeps of them is counted.
    bodies = [u.encode_body() for u in updates]
    del updates, requests, seqnos
    tracemalloc.start()
    e = new_engine()
    before = tracemalloc.get_traced_memory()[0]
    for k, i in enumerate(range(0, n, 256)):
        peer = LEARN_FROM[k % len(LEARN_FROM)]
        for body in bodies[i : i + 256]:
            e.receive_tlv(peer, decode_tlv(Update.TYPE, body), 1.0)
        e.tlvs_to_send()
        e.fib_changes()
    after = tracemalloc.get_traced_memory()[0]
    snapshot = tracemalloc.take_snapshot()
    tracemalloc.stop()
    for stat in snapshot.statistics("lineno")[:8]:
        print(f"    {stat.size / n:7.0f} B/route  {stat.traceback}")
    results["bytes/route"] = (after - before) / n
    results["routes in table"] = len(e.fib_snapshot())
    return results


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_child(path: str) -> None:
    """Print (as JSON) the resident set of this process before and after one
    engine learns the Updates in ``path`` (wire bodies, one size), read 256
    at a time: a fresh process that holds nothing else."""
    e = new_engine()
    gc.collect()
    before = rss_mib()
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(2))
        k = 0
        while chunk := f.read(size * 256):
            peer = LEARN_FROM[k % len(LEARN_FROM)]
            k += 1
            for i in range(0, len(chunk), size):
                e.receive_tlv(peer, decode_tlv(Update.TYPE, chunk[i : i + size]), 1.0)
            e.tlvs_to_send()
            e.fib_changes()
    gc.collect()
    print(json.dumps({"before": before, "after": rss_mib(), "routes": e.subnet_count()}))


def rss_figures(n: int) -> dict[str, float]:
    bodies = [u.encode_body() for u in make_updates(n)]
    assert len({len(b) for b in bodies}) == 1
    with tempfile.NamedTemporaryFile(suffix=".updates") as f:
        f.write(len(bodies[0]).to_bytes(2) + b"".join(bodies))
        f.flush()
        out = subprocess.run(
            [sys.executable, __file__, "--rss-child", f.name], check=True, capture_output=True, text=True
        ).stdout
    r = json.loads(out.splitlines()[-1])
    return {
        "RSS MiB, engine empty": r["before"],
        "RSS MiB, with the routes": r["after"],
        "RSS bytes/route (growth)": (r["after"] - r["before"]) * 2**20 / max(1, r["routes"]),
        "routes in child's table": r["routes"],
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--routes", type=int, default=100_000)
    ap.add_argument("--cpu", type=int, default=None, help="pin to this core")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child is not None:
        rss_child(args.rss_child)
        return 0
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    print(f"router engine bench, {args.routes} routes, one core, Python {sys.version.split()[0]}")
    print("(machine shared with other developers: figures are noisy lower bounds)")
    for name, value in {**bench(args.routes), **rss_figures(args.routes)}.items():
        print(f"  {name:26s} {value:12,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
