"""ICMPv6 packets the overlay builds itself: host-local errors written to
the TUN (PROTOCOL.md 4.7) and out-of-band errors carried to a packet's
source inside an encrypted data body (4.6)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .checksum import NEXT_ICMPV6, finish, ones_sum, pseudo_header_sum
from .errors import CodecError
from .inner import OOB_ICMP_HEADER
from .rules import OOB_HOP_LIMIT

IPV6_HEADER_SIZE = 40
ICMPV6_HEADER_SIZE = 8
NEXT_HEADER_ICMPV6 = NEXT_ICMPV6
ICMP_PAYLOAD_CAP = 1232  # 1280 - 48


DEST_UNREACHABLE = 1
TIME_EXCEEDED = 3
CODE_NO_ROUTE = 0
CODE_ADDRESS_UNREACHABLE = 3
CODE_SOURCE_POLICY = 5
CODE_HOP_LIMIT = 0

_OOB_MIN = 16 + IPV6_HEADER_SIZE + ICMPV6_HEADER_SIZE
_OOB_MAX = 1280 + 16


def icmpv6_checksum(src: bytes, dst: bytes, icmp: bytes) -> int:
    """RFC 4443 checksum over the IPv6 pseudo-header and the ICMPv6 message."""
    return finish(pseudo_header_sum(src + dst, len(icmp), NEXT_HEADER_ICMPV6) + ones_sum(icmp))


def build_icmpv6(
    src: bytes, dst: bytes, hop_limit: int, icmp_type: int, code: int, payload: bytes, rest: bytes = bytes(4)
) -> bytes:
    """A whole IPv6 packet carrying one ICMPv6 message with a valid checksum."""
    icmp = struct.pack("!BBH", icmp_type, code, 0) + rest + payload
    csum = icmpv6_checksum(src, dst, icmp)
    icmp = icmp[:2] + struct.pack("!H", csum) + icmp[4:]
    header = struct.pack("!IHBB", 6 << 28, len(icmp), NEXT_HEADER_ICMPV6, hop_limit) + src + dst
    return header + icmp


@dataclass(frozen=True, slots=True)
class OobIcmp:
    """An ICMP error about a packet we sent to ``original_dst``."""

    original_dst: bytes
    src: bytes
    dst: bytes
    icmp_type: int
    code: int
    rest: bytes
    payload: bytes  # the original encrypted body, or empty when it was too large


def oob_icmp_plaintext(
    reporter_net: bytes, original_src: bytes, original_dst: bytes, icmp_type: int, code: int, original_body: bytes
) -> bytes:
    """Plaintext (inner header included) an intermediate node seals for the source."""
    payload = original_body if len(original_body) <= ICMP_PAYLOAD_CAP else b""
    packet = build_icmpv6(reporter_net, original_src, OOB_HOP_LIMIT, icmp_type, code, payload)
    return OOB_ICMP_HEADER + original_dst + packet


def parse_oob_icmp(payload: bytes) -> OobIcmp:
    """Payload after the inner header of an OOB ICMP body."""
    if not _OOB_MIN <= len(payload) <= _OOB_MAX:
        raise CodecError(f"OOB ICMP payload of {len(payload)} bytes out of range")
    original_dst = bytes(payload[:16])
    ip = payload[16:]
    if ip[0] >> 4 != 6 or ip[6] != NEXT_HEADER_ICMPV6:
        raise CodecError("OOB ICMP does not hold an IPv6 ICMPv6 packet")
    plen = struct.unpack_from("!H", ip, 4)[0]
    if plen < ICMPV6_HEADER_SIZE or IPV6_HEADER_SIZE + plen > len(ip):
        raise CodecError("OOB ICMP payload length inconsistent")
    icmp = ip[IPV6_HEADER_SIZE : IPV6_HEADER_SIZE + plen]
    return OobIcmp(
        original_dst,
        bytes(ip[8:24]),
        bytes(ip[24:40]),
        icmp[0],
        icmp[1],
        bytes(icmp[4:8]),
        bytes(icmp[8:]),
    )
