"""Per-address packet statistics for `GET /api/v1/admin/stats/packets`
(API.md 1, PacketStatistics): every data packet that passes the forwarding
routine (originated, forwarded or delivered), counted by source and by
destination; bytes are the encrypted body length.

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

    def add(self, addr: bytes, nbytes: int) -> None:
        row = self.rows.get(addr)
        if row is None:
            if len(self.rows) >= self.limit:
                self.rows.popitem(last=False)
                self.evicted += 1
            self.rows[addr] = [1, nbytes]
        else:
            row[0] += 1
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

    def add(self, src: bytes, dst: bytes, body_len: int) -> None:
        self.by_source.add(src, body_len)
        self.by_destination.add(dst, body_len)

    def to_json(self) -> dict[str, list[dict[str, Any]]]:
        return {"bySource": self.by_source.to_json(), "byDestination": self.by_destination.to_json()}
