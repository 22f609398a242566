"""Cost of the security extensions (docs/EXTENSIONS.md), baseline in the same run.

    sudo .venv/bin/python bench/bench_security.py [--seconds 5] [--no-netns]

1. In process (one core, no IO): tund's DataPlane sealing (``from_tun``)
   and opening (``from_peer``) 1400-byte packets in batches of 64, with the
   static key and random nonces (the reference scheme) and with session
   keys, counter nonces, the replay window and the static-nonce filter;
   CPU seconds per GB and packets per second.
2. Negotiation: CPU time of one INIT/RESP/CONFIRM exchange between two
   engines (both sides), and the handshake time measured by a real node
   in the netns run (INIT sent -> RESP taken, includes the link RTT).
3. Memory per session: tracemalloc over 1,000 negotiated peers (both
   halves of a session and the peer entry, on one side).
4. Two nodes in namespaces, single-stream iperf3 A->B: --no-session-keys
   then session keys (rotation at the default 120 s; not hit).

The machine is shared: figures vary from run to run by 10-20 %.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.fib import FibReplica  # noqa: E402
from common.identity import Identity  # noqa: E402
from services.tund.dataplane import DataPlane, KeyCache  # noqa: E402
from services.tund.sessions import SessionConfig, SessionEngine  # noqa: E402

PKT_SIZE = 1400
BATCH = 64


def plane(me: Identity, peer: Identity, sessions: bool) -> DataPlane:
    fib = FibReplica()
    fib.load_snapshot(
        {"epoch": 1, "seq": 0, "entries": [[peer.address.packed[:8] + bytes(8), 64, "p", peer.public_key]]}
    )
    keys = KeyCache(me.private_key)
    engine = SessionEngine(me, keys.get, SessionConfig()) if sessions else None
    return DataPlane(me, fib, keys, tun=True, vnet=False, sessions=engine)


def udp(src: Identity, dst: Identity, i: int) -> bytes:
    payload = struct.pack("!I", i) + bytes(PKT_SIZE - 48 - 4)
    hdr = struct.pack("!IHBB", 6 << 28, 8 + len(payload), 17, 64) + src.address.packed + dst.address.packed
    return hdr + struct.pack("!HHHH", 1000, 2000, 8 + len(payload), 0) + payload


def pair(sessions: bool) -> tuple[DataPlane, DataPlane, Identity, Identity]:
    ia, ib = Identity.from_secret(os.urandom(32)), Identity.from_secret(os.urandom(32))
    a, b = plane(ia, ib, sessions), plane(ib, ia, sessions)
    if sessions:  # negotiate first: traffic both ways until A seals with a session
        for _ in range(3):
            a.from_tun([udp(ia, ib, 0)], 1.0)
            for blob in a.take_out().values():
                b.from_peer(blob, 1.0)
            b.from_tun([udp(ib, ia, 0)], 1.0)
            for blob in b.take_out().values():
                a.from_peer(blob, 1.0)
        a.gro.flush(), b.gro.flush()
        assert a.routes and a.routes[ib.address.packed[:8]][2] is not None, "no session"
    return a, b, ia, ib


BASELINE = REPO / "services" / "tund" / "_bench_baseline_dataplane.py"


def baseline_class() -> type | None:
    """main's DataPlane (before the extensions), from git, as a sibling
    module (it imports .gro, .gso, .tun); None if git cannot show it."""
    import importlib
    import subprocess

    out = subprocess.run(["git", "show", "main:services/tund/dataplane.py"], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0 or "SessionEngine" in out.stdout:
        return None
    BASELINE.write_text(out.stdout)
    try:
        return importlib.import_module("services.tund._bench_baseline_dataplane").DataPlane  # type: ignore[no-any-return]
    finally:
        BASELINE.unlink()


def crypto_rate(sessions: bool, packets: int, cls: type | None = None) -> tuple[float, float]:
    """(seal+open CPU s/GB, packets/s) for ``packets`` packets."""
    if cls is not None:
        ia, ib = Identity.from_secret(os.urandom(32)), Identity.from_secret(os.urandom(32))
        fa, fb = FibReplica(), FibReplica()
        fa.load_snapshot(
            {"epoch": 1, "seq": 0, "entries": [[ib.address.packed[:8] + bytes(8), 64, "p", ib.public_key]]}
        )
        fb.load_snapshot(
            {"epoch": 1, "seq": 0, "entries": [[ia.address.packed[:8] + bytes(8), 64, "p", ia.public_key]]}
        )
        a = cls(ia, fa, KeyCache(ia.private_key), tun=True, vnet=False)
        b = cls(ib, fb, KeyCache(ib.private_key), tun=True, vnet=False)
    else:
        a, b, ia, ib = pair(sessions)
    batches = [[udp(ia, ib, i) for i in range(j, j + BATCH)] for j in range(0, packets, BATCH)]
    t0 = time.process_time()
    for pkts in batches:
        a.from_tun(pkts, 2.0)
        for blob in a.take_out().values():
            b.from_peer(blob, 2.0)
        b.gro.flush()
    cpu = time.process_time() - t0
    assert b.counters["rx_opened"] >= packets, b.counters
    n = len(batches) * BATCH
    return cpu / (n * PKT_SIZE / 1e9), n / cpu


def negotiation_cpu(rounds: int) -> float:
    times = []
    for _ in range(rounds):
        ia, ib = Identity.from_secret(os.urandom(32)), Identity.from_secret(os.urandom(32))
        a, b = plane(ia, ib, True), plane(ib, ia, True)
        a.keys.get(ib.public_key), b.keys.get(ia.public_key)  # static X25519 as the data path caches it anyway
        t0 = time.process_time()
        a.from_tun([udp(ia, ib, 0)], 1.0)  # triggers INIT
        for blob in a.take_out().values():
            b.from_peer(blob, 1.0)  # INIT -> RESP
        for blob in b.take_out().values():
            a.from_peer(blob, 1.0)  # RESP -> CONFIRM
        for blob in a.take_out().values():
            b.from_peer(blob, 1.0)  # CONFIRM
        times.append(time.process_time() - t0)
        assert b.sessions is not None and b.sessions.counters["session_confirmed"] == 1
    return statistics.median(times)


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def memory_per_session(peers: int) -> tuple[float, float]:
    """(Python heap bytes per session, RSS growth per session: includes
    OpenSSL's cipher contexts, which tracemalloc does not see, and the other
    side's engines, so an upper bound)."""
    me = Identity.from_secret(os.urandom(32))
    others = [Identity.from_secret(os.urandom(32)) for _ in range(peers)]
    keys_me = KeyCache(me.private_key)
    mine = SessionEngine(me, keys_me.get)
    theirs = [(o, SessionEngine(o, KeyCache(o.private_key).get)) for o in others]
    for o, _ in theirs:
        keys_me.get(o.public_key)
    from common.wire.inner import INNER_HEADER_SIZE

    def deliver(dst: SessionEngine, src_addr: bytes, src_pk: bytes, body: bytes, key: KeyCache) -> None:
        pt = key.get(src_pk).open(body)
        dst.on_packet(src_addr, src_pk, pt[INNER_HEADER_SIZE:], None, 1.0)

    rss0 = rss()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for o, eng in theirs:
        eng.send_state(me.public_key, 1.0)  # INIT from them
        (_, init), eng.outbox = eng.outbox[0], []
        deliver(mine, o.address.packed, o.public_key, init, keys_me)
        mine.outbox.clear()  # RESP (not needed for the memory of our half)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    grown = rss() - rss0
    assert len(mine.by_index) == peers
    return used / peers, grown / peers


def netns_iperf(seconds: int) -> list[tuple[str, float, float, float | None]]:
    from bench.bench_dataplane import Result, measure, warm
    from tests.integration.netns import NODE_PORT, Topology, cleanup_stale

    out = []
    for name, extra in (
        ("static keys (--no-session-keys), round 1", ["--no-session-keys"]),
        ("session keys + replay window, round 1", []),
        ("static keys (--no-session-keys), round 2", ["--no-session-keys"]),
        ("session keys + replay window, round 2", []),
    ):
        cleanup_stale()
        topo = Topology(["a", "b"])
        try:
            a_ab, _ = topo.connect("a", "b", 1)
            topo.add_node("a", extra=extra)
            topo.add_node("b", peers=[f"tcp://{a_ab}:{NODE_PORT}"], extra=extra)
            topo.start_all()
            b = topo.nodes["b"]
            warm(topo, "a", b.address)
            warm(topo, "b", topo.nodes["a"].address)
            res = measure(topo, "a", "b", b.address, seconds, Result(name))
            hs = topo.nodes["a"].rpc("tund", "stats")["gauges"].get("session_handshake_ms")
            out.append((name, res.gbit, res.per_gb(res.proc_cpu), hs))
        finally:
            topo.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--packets", type=int, default=20_000)
    parser.add_argument("--no-netns", action="store_true")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, shared with other work (figures are noisy)\n")
    print("| data plane in process (seal + open, 1400 B) | CPU s/GB | packets/s |\n|---|---|---|")
    base = baseline_class()
    rows = [
        ("static key, random nonce + recent-nonce filter (reference peers now)", False, None),
        ("session key, counter nonce, replay window (our peers now)", True, None),
    ]
    if base is not None:
        rows.insert(0, ("main's DataPlane: static key, random nonce (baseline)", False, base))
    for _ in range(2):  # interleaved rounds, both printed
        for label, on, cls in rows:
            s_gb, pps = crypto_rate(on, args.packets, cls=cls)
            print(f"| {label} | {s_gb:.2f} | {pps:,.0f} |")
    print(f"\nnegotiation CPU (INIT+RESP+CONFIRM, both sides, median of 30): {negotiation_cpu(30) * 1000:.2f} ms")
    heap, grown = memory_per_session(1000)
    print(
        f"memory per session (one side, 1000 peers): {heap:,.0f} B Python heap; RSS growth {grown:,.0f} B (upper bound)"
    )
    if not args.no_netns:
        print("\n| two nodes in namespaces, iperf3 A->B | Gbit/s | CPU s/GB (proc) | handshake ms |\n|---|---|---|---|")
        for name, gbit, s_gb, hs in netns_iperf(args.seconds):
            print(f"| {name} | {gbit:.2f} | {s_gb:.2f} | {hs if hs is not None else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
