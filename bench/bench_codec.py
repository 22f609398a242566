"""Data-path codec throughput on one core, against raw AES-256-GCM as the ceiling.

Run: ``.venv/bin/python bench/bench_codec.py [--seconds S] [--batch N] [--cpu C]``

Each packet is what a node originates for a full-MTU TUN packet: a 4-byte
inner header plus a 1400-byte IPv6 packet (1404 bytes of plaintext), sealed
to a 1432-byte body and framed into a 1472-byte link packet.

Rows:
  encode path  SessionKey.seal + DataPacket(...).encode()  (per packet)
  decode path  StreamDecoder.feed of the batch's frames in 64 KiB reads (as a socket
               delivers them; packets straddle reads) + SessionKey.open + split_inner
  ceiling      AESGCM.encrypt / AESGCM.decrypt of the same 1404-byte buffer
The component rows split each path so a regression can be located.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.crypto import SessionKey
from common.wire.inner import L3_HEADER, split_inner
from common.wire.packet import DataPacket, StreamDecoder, encode_data_header

PAYLOAD = 1400
KEY = bytes(range(32))
NONCE = bytes(12)
SRC = bytes.fromhex("052d0dc0ab0c851a6e34e79d1f3f15d3")
DST = bytes.fromhex("0520c662fd009e925d9934ed0ab882ab")


def _ipv6_packet() -> bytes:
    header = bytes.fromhex("60000000") + (PAYLOAD - 40).to_bytes(2, "big") + bytes((17, 64)) + SRC + DST
    return header + bytes(i & 0xFF for i in range(PAYLOAD - 40))


def measure(run_batch: Callable[[], int], seconds: float) -> float:
    """Packets per second over whole batches run for about ``seconds``."""
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        done += run_batch()
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - start)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="time budget per row (default 3)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per row, best one reported (default 5)")
    ap.add_argument("--batch", type=int, default=1000, help="packets per timed batch (default 1000)")
    ap.add_argument("--read-size", type=int, default=65536, help="bytes per StreamDecoder.feed (default 65536)")
    ap.add_argument("--cpu", type=int, default=None, help="pin to this CPU (default: the first allowed one)")
    args = ap.parse_args()

    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if hasattr(os, "sched_setaffinity"):
        cpu = args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})

    n = args.batch
    plaintext = L3_HEADER + _ipv6_packet()
    assert len(plaintext) == PAYLOAD + 4
    key = SessionKey(KEY)
    aead = AESGCM(KEY)
    bodies = [key.seal(plaintext) for _ in range(n)]
    frames = [DataPacket(SRC, DST, 64, b).encode() for b in bodies]
    stream = b"".join(frames)
    reads = [stream[i : i + args.read_size] for i in range(0, len(stream), args.read_size)]
    assert len(frames[0]) == 1472
    ct = aead.encrypt(NONCE, plaintext, None)

    def encode_path() -> int:
        seal, pkt = key.seal, DataPacket
        for _ in range(n):
            pkt(SRC, DST, 64, seal(plaintext)).encode()
        return n

    def encode_header_concat() -> int:
        seal = key.seal
        for _ in range(n):
            body = seal(plaintext)
            encode_data_header(SRC, DST, 64, len(body)) + body
        return n

    def seal_only() -> int:
        seal = key.seal
        for _ in range(n):
            seal(plaintext)
        return n

    def frame_only() -> int:
        body, pkt = bodies[0], DataPacket
        for _ in range(n):
            pkt(SRC, DST, 64, body).encode()
        return n

    def ceiling_encrypt() -> int:
        enc = aead.encrypt
        for _ in range(n):
            enc(NONCE, plaintext, None)
        return n

    decoder = StreamDecoder()

    def decode_path() -> int:
        opener, feed, count = key.open, decoder.feed, 0
        for chunk in reads:
            for p in feed(chunk):
                split_inner(opener(p.body))
                count += 1
        return count

    def feed_only() -> int:
        feed, count = decoder.feed, 0
        for chunk in reads:
            count += len(feed(chunk))
        return count

    def feed_whole() -> int:
        return len(decoder.feed(stream))

    def open_only() -> int:
        opener = key.open
        for b in bodies:
            opener(b)
        return n

    def ceiling_decrypt() -> int:
        dec = aead.decrypt
        for _ in range(n):
            dec(NONCE, ct, None)
        return n

    assert decode_path() == feed_only() == feed_whole() == n and decoder.buffered == 0
    rows = [
        ("encode: seal + DataPacket.encode", encode_path, ceiling_encrypt),
        ("  variant: seal + encode_data_header + body", encode_header_concat, ceiling_encrypt),
        ("  component: SessionKey.seal", seal_only, ceiling_encrypt),
        ("  component: DataPacket.encode", frame_only, None),
        ("ceiling: AESGCM.encrypt (1404 B)", ceiling_encrypt, None),
        ("decode: feed + open + split_inner", decode_path, ceiling_decrypt),
        ("  component: StreamDecoder.feed (64 KiB reads)", feed_only, None),
        ("  component: feed, whole batch in one call", feed_whole, None),
        ("  component: SessionKey.open", open_only, ceiling_decrypt),
        ("ceiling: AESGCM.decrypt (1404 B)", ceiling_decrypt, None),
    ]
    # Each row runs interleaved with its ceiling (row, ceiling, row, ceiling, ...) and the
    # best run of each is kept, so a burst of load elsewhere skews neither side alone.
    best: dict[Callable[[], int], float] = {}
    slice_s = args.seconds / args.repeat
    for fn in {fn for _, fn, _ in rows} | {c for _, _, c in rows if c is not None}:
        fn()  # warm up
    for _label, fn, ceiling in rows:
        for _ in range(args.repeat):
            for f in (fn, ceiling):
                if f is not None:
                    best[f] = max(best.get(f, 0.0), measure(f, slice_s))
    width = max(len(label) for label, _, _ in rows)
    print(f"# nproc {nproc}, {cpu_model()}, Python {platform.python_version()}")
    print(
        f"# 1404 B plaintext -> 1472 B frame; batch {n}; {args.read_size} B reads; "
        f"{args.seconds:g} s per row, best of {args.repeat}; one CPU"
    )
    print()
    print(f"| {'path':<{width}} | {'packets/s':>10} | {'MB/s (payload)':>14} | {'vs ceiling':>10} |")
    print(f"|{'-' * (width + 2)}|{'-' * 11}:|{'-' * 15}:|{'-' * 11}:|")
    for label, fn, ceiling in rows:
        pps = best[fn]
        ratio = "" if ceiling is None else f"{pps / best[ceiling]:.2f}"
        print(f"| {label:<{width}} | {pps:>10,.0f} | {pps * PAYLOAD / 1e6:>14,.1f} | {ratio:>10} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
