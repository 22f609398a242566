"""Per-address packet statistics for `GET /api/v1/admin/stats/packets`
(API.md 1, PacketStatistics): every data packet that passes the forwarding
routine (originated, forwarded or delivered), counted by source and by
destination; bytes are the encrypted body length.

Counted where peerd parses packets anyway: packets received from peers
(delivered here or forwarded). Packets this node originates reach peerd as
opaque batches from tund and are not counted (the reference counts them).

Bounded: at most ``limit`` addresses per table; when full, the address
seen least recently is forgotten (counted in ``evicted``), so a flood of
spoofed sources cannot grow memory.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Any


class _Table:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.rows: OrderedDict[bytes, list[int]] = OrderedDict()
        self.evicted = 0

    def add(self, addr: bytes, packets: int, nbytes: int) -> None:
        row = self.rows.get(addr)
        if row is None:
            if len(self.rows) >= self.limit:
                self.rows.popitem(last=False)
                self.evicted += 1
            self.rows[addr] = [packets, nbytes]
        else:
            row[0] += packets
            row[1] += nbytes
            self.rows.move_to_end(addr)

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {"ip": str(ipaddress.IPv6Address(addr)), "packetCount": n, "byteCount": b}
            for addr, (n, b) in self.rows.items()
        ]


class PacketStats:
    def __init__(self, limit: int = 4096) -> None:
        self.by_source = _Table(limit)
        self.by_destination = _Table(limit)

    def add(self, src: bytes, dst: bytes, packets: int, body_bytes: int) -> None:
        """A run of ``packets`` with the same addresses (the data path counts
        runs, not single packets: one read usually carries one flow)."""
        self.by_source.add(src, packets, body_bytes)
        self.by_destination.add(dst, packets, body_bytes)

    def to_json(self) -> dict[str, list[dict[str, Any]]]:
        return {"bySource": self.by_source.to_json(), "byDestination": self.by_destination.to_json()}
