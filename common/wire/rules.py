"""Data-plane rules of PROTOCOL.md written once: the data packet's layout
(3, 4.1), the hop-limit rule (4.4), the overlay-address check (1.4) and
the outbound checks of 4.7. tund, peerd, the router and the API call these.

Per-packet loops bind the precompiled ``struct.Struct`` objects and the
offsets below. The predicates are one expression each; a call adds ~15 ns
to the inline expression (bench/bench_rules.py), so the two hottest loops
(tund's ``from_tun``, peerd's ``route_batch``) keep the expression inline,
with a comment naming the definition it spells.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import TypeIs

# --- the data packet (outer header + data header), offsets from its start ---
DATA_PREFIX_SIZE = 40
BODY_LEN_OFFSET = 5  # u16, bytes after the 40-byte prefix
HOP_OFFSET = 7
SRC_OFFSET = 8
DST_OFFSET = 24
DST_PREFIX_END = 32  # the destination's /64
#: outer version, type, reserved(2); data reserved, body length, hop limit
DATA8 = struct.Struct("!BBxxxHB")
#: DATA8 followed by source and destination
DATA_PREFIX = struct.Struct("!BBxxxHB16s16s")

# --- the IPv6 header of a packet read from the TUN, offsets from its start ---
IPV6_HEADER_SIZE = 40
IPV6_HOP_OFFSET = 7
IPV6_SRC_OFFSET = 8
IPV6_DST_OFFSET = 24

# --- hop limit (4.4) ---
MIN_FORWARD_HOP_LIMIT = 2  # a packet arriving with less is not forwarded (time exceeded)
MESSAGE_HOP_LIMIT = 64
OOB_HOP_LIMIT = 64

# --- overlay addresses (1.4) ---
OVERLAY_PREFIX = ipaddress.IPv6Network("400::/7")
_OVERLAY_MASK = 0xFE
_OVERLAY_BYTE = 0x04


def body_len(buf: bytes | bytearray | memoryview, off: int) -> int:
    """Body length of the data packet starting at ``off``."""
    return buf[off + 5] << 8 | buf[off + 6]


def split_batch(blob: bytes, limit: int) -> list[bytes]:
    """``blob`` (data packets back to back) cut at packet boundaries into
    pieces of at most ``limit`` bytes (a packet longer than ``limit``
    alone in its piece); the blob itself when it fits."""
    if len(blob) <= limit:
        return [blob]
    pieces: list[bytes] = []
    view = memoryview(blob)
    start = pos = 0
    end = len(blob)
    while pos < end:
        if end - pos < DATA_PREFIX_SIZE:  # a torn tail: never produced here; kept whole, the reader counts it
            break
        size = DATA_PREFIX_SIZE + body_len(blob, pos)
        if pos > start and pos + size - start > limit:
            pieces.append(bytes(view[start:pos]))
            start = pos
        pos += size
    pieces.append(bytes(view[start:end]))
    return pieces


def can_forward(hop_limit: int) -> bool:
    """4.4: a packet is forwarded (hop limit decremented) only while this holds."""
    return hop_limit >= MIN_FORWARD_HOP_LIMIT


def overlay_byte(first: int) -> bool:
    """Whether an address whose first byte is ``first`` lies in 400::/7."""
    return first & _OVERLAY_MASK == _OVERLAY_BYTE


def is_overlay_packed(addr: bytes | bytearray | memoryview, off: int = 0) -> bool:
    """Whether the 16-byte address at ``addr[off:]`` lies in 400::/7."""
    return addr[off] & _OVERLAY_MASK == _OVERLAY_BYTE


def is_overlay_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> TypeIs[ipaddress.IPv6Address]:
    """Whether an address object lies in 400::/7 (IPv4 never does)."""
    return address.version == 6 and address in OVERLAY_PREFIX


def is_overlay_network(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    """Whether a whole network lies inside 400::/7."""
    return isinstance(network, ipaddress.IPv6Network) and network.subnet_of(OVERLAY_PREFIX)


# --- 4.7: checks on a packet read from the TUN before it is sealed ---
OUTBOUND_OK = 0
OUTBOUND_SOURCE_NOT_OVERLAY = 1  # -> destination unreachable, source policy
OUTBOUND_HOP_LIMIT = 2  # -> time exceeded
OUTBOUND_TOO_BIG = 3  # -> packet too big (MTU)


def outbound_check(p: bytes | bytearray | memoryview, off: int, mtu: int) -> int:
    """4.7 for the IPv6 packet at ``p[off:]``: OUTBOUND_OK or which check fails
    first (the order decides which ICMPv6 error the host gets)."""
    if p[off + IPV6_SRC_OFFSET] & _OVERLAY_MASK != _OVERLAY_BYTE:
        return OUTBOUND_SOURCE_NOT_OVERLAY
    if p[off + IPV6_HOP_OFFSET] < MIN_FORWARD_HOP_LIMIT:
        return OUTBOUND_HOP_LIMIT
    if len(p) - off > mtu:
        return OUTBOUND_TOO_BIG
    return OUTBOUND_OK


def outbound_ok(p: bytes | bytearray | memoryview, off: int, mtu: int) -> bool:
    """The fast form of ``outbound_check`` for the per-packet loop."""
    return p[off + 7] >= 2 and p[off + 8] & 0xFE == 4 and len(p) - off <= mtu
