"""Per-packet cost of tund's data plane: the native kernel (common/_kernel.c)
against the pure-Python reference, in the same run, interleaved.

Run: ``.venv/bin/python bench/bench_kernel.py [--seconds S] [--cpu C]``

Workloads (what tund does per wake-up under a bulk TCP transfer):
  seal TSO      from_tun of 8 TSO super packets of 64 KiB (MSS 1328, as the
                kernel hands them with TUN MTU 1400): cut, checksums, AES-GCM,
                framing, grouped by next hop; take_out joins the batch
  seal plain    from_tun of 64 single 1400-byte packets (TSO off, or small flows)
  open + GRO    from_peer of 48 framed full-size segments of one flow, then
                the GRO flush (one 64 KiB super packet for the TUN)
  AES-GCM       seal of one 1404-byte plaintext through SessionKey (cryptography's
                AESGCM vs the kernel's Aead with its EVP context kept)
The three data-path rows run twice: with the reference's static key and
random nonces (``--no-session-keys``), and with session keys (the default:
counter nonces, the session looked up by the index in each nonce, the
replay window checked and marked, the static-key nonce filter and the
downgrade check armed; docs/EXTENSIONS.md 9); open + GRO also with a
``--firewall`` rule file (``RULES``) on top.
Figures are µs per packet, best of 5 slices per row; the CPU time of a slice
is the process's own (load elsewhere on the machine moves it less than
wall time). This is less load-sensitive than bench_dataplane.py.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import native
from common.crypto import SessionKey, shared_secret
from common.fib import FibReplica
from common.firewall import Firewall, load_rules
from common.identity import Identity
from common.replay import new_window
from common.wire.inner import L3_HEADER
from services.tund.dataplane import DataPlane, KeyCache
from services.tund.service import tune_malloc
from services.tund.sessions import RecvState, SendState, Session, SessionEngine
from services.tund.tun import VNET_HDR_SIZE

MSS = 1328
ME, PEER = Identity.from_secret(bytes([1]) * 32), Identity.from_secret(bytes([2]) * 32)
KEY_IN, KEY_OUT, IDX_IN, IDX_OUT = bytes([7]) * 32, bytes([8]) * 32, b"\x01\x02\x03\x04", b"\x05\x06\x07\x08"


# a rule file as a server might use (deny by default, replies to own connections pass,
# TCP to a port range from anyone): the open + GRO row's ACK segments take the first rule
RULES = 'default = "deny"\n[[rule]]\nprotocol = "icmpv6"\n[[rule]]\nprotocol = "tcp"\nport = "8000-8100"\n'


def plane(use_native: bool, sessions: bool, rules: str | None = None) -> DataPlane:
    fib = FibReplica()
    entry = [PEER.address.packed[:8] + bytes(8), 64, "p", PEER.public_key]
    fib.load_snapshot({"epoch": 1, "seq": 0, "entries": [entry]})
    keys = KeyCache(ME.private_key, native=use_native)
    engine = None
    if sessions:  # an established session with PEER, as after a handshake
        engine = SessionEngine(ME, keys.get, native=use_native)
        s = Session(initiator=True, created=0.0)
        s.send = SendState(SessionKey(KEY_OUT, use_native).aead, IDX_OUT)
        s.recv = RecvState(SessionKey(KEY_IN, use_native).aead, IDX_IN, PEER.public_key, s, native=use_native)
        peer = engine._peer(PEER.public_key)
        engine._add(peer, s)
        engine._take_over(peer, s, 0.0)
    kernel = native.kernel if use_native else None
    fw = None if rules is None else Firewall(load_rules(rules))
    return DataPlane(ME, fib, keys, tun=True, vnet=True, kernel=kernel, sessions=engine, firewall=fw)


def tcp(src: bytes, dst: bytes, seq: int, payload: bytes, flags: int = 0x10) -> bytes:
    th = struct.pack("!HHIIBBHHH", 5000, 443, seq, 77, 8 << 4, flags, 512, 0, 0) + b"\x01\x01\x08\x0a" + bytes(8)
    return struct.pack("!IHBB", 0x60000000, len(th) + len(payload), 6, 64) + src + dst + th + payload


def super_packet(seq: int) -> bytes:
    payload = bytes(i & 0xFF for i in range(MSS * 49))
    pkt = tcp(ME.address.packed, PEER.address.packed, seq, payload)
    return struct.pack("=BBHHHH", 1, 4, 72, MSS, 40, 16) + pkt


def peer_frames(sessions: bool) -> bytes:
    key = SessionKey(KEY_IN if sessions else shared_secret(PEER.private_key, ME.public_key), native=False)
    out = []
    for i in range(48):
        pt = L3_HEADER + tcp(PEER.address.packed, ME.address.packed, 1000 + i * MSS, bytes(MSS))
        body = key.seal(pt, IDX_IN + i.to_bytes(8, "big") if sessions else None)
        out.append(struct.pack("!BBxxxHB", 1, 0, len(body), 63) + PEER.address.packed + ME.address.packed + body)
    return b"".join(out)


def workloads(use_native: bool) -> dict[str, tuple[Callable[[], None], int]]:
    rows = data_path(use_native, False)
    key = SessionKey(bytes(32), native=use_native)
    pt = bytes(1404)

    def aead() -> None:
        for _ in range(64):
            key.seal(pt)

    rows |= {f"{name}, session keys": row for name, row in data_path(use_native, True).items()}
    name, row = list(data_path(use_native, True, RULES).items())[-1]
    rows[f"{name}, session keys, --firewall"] = row
    rows["AES-GCM seal (SessionKey.seal, 1404 B)"] = (aead, 64)
    return rows


def data_path(use_native: bool, sessions: bool, rules: str | None = None) -> dict[str, tuple[Callable[[], None], int]]:
    dp = plane(use_native, sessions, rules)
    sps = [super_packet(i * MSS * 49) for i in range(8)]
    plain = [bytes(VNET_HDR_SIZE) + tcp(ME.address.packed, PEER.address.packed, i, bytes(1400 - 72)) for i in range(64)]
    frames = peer_frames(sessions)
    rs = dp.by_index.get(IDX_IN)

    def seal_tso() -> None:
        dp.from_tun(sps, 0.0)
        dp.take_out()

    def seal_plain() -> None:
        dp.from_tun(plain, 0.0)
        dp.take_out()

    def open_gro() -> None:
        if rs is not None:
            rs.window = new_window(use_native)  # the same counters again: a fresh window, not replays
        dp.from_peer(frames, 0.0)
        dp.gro.flush()

    def check() -> None:
        """Every workload does what it says: packets out, segments into the TUN, no drops."""
        dp.from_tun(sps, 0.0)
        sealed = dp.take_out()["p"]
        assert not sessions or sealed[-12:-8] == IDX_OUT  # counter nonces of the session
        open_gro()
        c = dp.all_counters()
        assert c["tx_sealed"] == 8 * 49 and c["rx_opened"] == 48 and not c["replay"], dict(c)
        assert not c["rx_firewall_dropped"] and len(dp.gro.flush()) == 0, dict(c)
        dp.counters.clear()

    check()
    return {
        "seal TSO (from_tun, 64 KiB super packets)": (seal_tso, 8 * 49),
        "seal plain (from_tun, 1400-byte packets)": (seal_plain, 64),
        "open + GRO (from_peer, 48 segments)": (open_gro, 48),
    }


def per_packet(fn: Callable[[], None], packets: int, seconds: float) -> float:
    """Best µs per packet (process CPU time) over 5 slices."""
    best = float("inf")
    for _ in range(5):
        done = 0
        t0 = time.process_time()
        end = time.perf_counter() + seconds / 5
        while time.perf_counter() < end:
            fn()
            done += packets
        best = min(best, (time.process_time() - t0) / done * 1e6)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per row and kernel (default 2)")
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    args = parser.parse_args()
    tune_malloc()  # as tund does: batch buffers stay on the heap
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if native.kernel is None:
        print(f"bench_kernel: {native.describe()}; only the reference can run", file=sys.stderr)
        return 1
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        model = "?"
    load = os.getloadavg()[0]
    print(f"CPU: {model}, {os.cpu_count()} CPUs, load {load:.1f}; {native.describe()}")
    py, nat = workloads(False), workloads(True)
    print("| workload | python µs/pkt | native µs/pkt | speed-up |")
    print("|---|---:|---:|---:|")
    for name in py:
        a = per_packet(*py[name], args.seconds)  # type: ignore[misc]
        b = per_packet(*nat[name], args.seconds)  # type: ignore[misc]
        print(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
