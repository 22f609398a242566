"""Link-local discovery beacon (PROTOCOL.md 2.7): 50 bytes on UDP 9650."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import CodecError

MAGIC = b"mycelium"
BEACON_SIZE = 50


@dataclass(frozen=True, slots=True)
class Beacon:
    tcp_port: int
    router_id: bytes

    def encode(self) -> bytes:
        if len(self.router_id) != 40 or not 0 <= self.tcp_port <= 0xFFFF:
            raise CodecError("invalid beacon fields")
        return MAGIC + struct.pack("!H", self.tcp_port) + self.router_id

    @classmethod
    def decode(cls, buf: bytes) -> Beacon:
        if len(buf) != BEACON_SIZE or buf[:8] != MAGIC:
            raise CodecError("not a discovery beacon")
        return cls(struct.unpack_from("!H", buf, 8)[0], bytes(buf[10:]))
