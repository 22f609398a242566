"""Per-packet costs of the shared wire rules (common/wire/rules.py, checksum.py).

Prints the call forms beside the inline expressions they replace, so a
change that makes a per-packet rule slower shows up. Run:
``.venv/bin/python bench/bench_rules.py``.
"""

from __future__ import annotations

import os
import struct
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.wire.icmp import icmpv6_checksum
from common.wire.rules import outbound_ok
from services.tund.dataplane import finish_checksum
from services.tund.gso import split_tcp
from services.tund.tun import VNET_HDR


def per_call_us(f: object, n: int) -> float:
    return min(timeit.repeat(f, number=n, repeat=5)) / n * 1e6  # type: ignore[arg-type]


def main() -> None:
    src, dst = b"\x04" + os.urandom(15), b"\x04" + os.urandom(15)
    mss = 1400
    payload = os.urandom(mss * 40)
    tcp = struct.pack("!HHIIBBHHH", 1, 2, 3, 4, 5 << 4, 0x10, 100, 0, 0)
    ip = struct.pack("!IHBB", 6 << 28, len(tcp) + len(payload), 6, 64) + src + dst
    superpacket = VNET_HDR.pack(1, 4, 60, mss, 40, 16) + ip + tcp + payload
    one = VNET_HDR.pack(1, 0, 0, 0, 40, 16) + ip[:4] + struct.pack("!H", 20 + mss) + ip[6:] + tcp + payload[:mss]
    icmp = os.urandom(1232)
    p, off, mtu = ip + tcp + payload[:mss], 0, 1500
    n = 200_000

    def inline() -> None:
        for _ in range(n):
            if p[off + 7] < 2 or p[off + 8] & 0xFE != 4 or len(p) - off > mtu:
                pass

    def call() -> None:
        for _ in range(n):
            if not outbound_ok(p, off, mtu):
                pass

    print(f"4.7 checks inline      {per_call_us(inline, 1) / n * 1e3:8.1f} ns/packet")
    print(f"4.7 checks outbound_ok {per_call_us(call, 1) / n * 1e3:8.1f} ns/packet")
    print(f"icmpv6_checksum (1232 B)       {per_call_us(lambda: icmpv6_checksum(src, dst, icmp), 20_000):6.2f} us")
    print(f"finish_checksum (1420 B)       {per_call_us(lambda: finish_checksum(one, 10), 20_000):6.2f} us")
    print(f"split_tcp (40 segments)        {per_call_us(lambda: split_tcp(superpacket, 10, b'1234'), 2_000):6.1f} us")


if __name__ == "__main__":
    main()
