"""Babel TLV bodies (PROTOCOL.md section 5.3): Hello, IHU, Update,
RouteRequest and SeqNoRequest.

Each TLV type is a frozen dataclass with ``encode_body()`` and a
``decode_body(buf)`` classmethod. Integers on the wire are big-endian.
Decoding is lenient about trailing bytes inside a TLV body (they are
ignored, never allowed to desynchronise the stream) and strict about
everything the fields themselves say.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import ClassVar

from .errors import CodecError
from .subnet import IPAddress, Subnet

ROUTER_ID_SIZE = 40

AE_WILDCARD = 0
AE_IPV4 = 1
AE_IPV6 = 2
AE_IPV6_LINK_LOCAL = 3

HELLO_UNICAST = 0x8000
UPDATE_FLAGS_MASK = 0xC0
METRIC_INFINITE = 0xFFFF

TYPE_HELLO = 4
TYPE_IHU = 5
TYPE_UPDATE = 8
TYPE_ROUTE_REQUEST = 9
TYPE_SEQNO_REQUEST = 10

_LINK_LOCAL_PREFIX = bytes.fromhex("fe80000000000000")


def _u16(name: str, value: int) -> None:
    if not 0 <= value <= 0xFFFF:
        raise CodecError(f"{name} {value} does not fit in 16 bits")


def _u8(name: str, value: int) -> None:
    if not 0 <= value <= 0xFF:
        raise CodecError(f"{name} {value} does not fit in 8 bits")


def _check_router_id(router_id: bytes) -> None:
    if len(router_id) != ROUTER_ID_SIZE:
        raise CodecError(f"router id must be {ROUTER_ID_SIZE} bytes, got {len(router_id)}")


def _prefix_bytes(plen: int) -> int:
    return (plen + 7) // 8


def _encode_prefix(subnet: Subnet) -> tuple[int, bytes]:
    """AE and the first ceil(plen/8) bytes of the (unmasked) address."""
    ae = AE_IPV6 if subnet.is_ipv6 else AE_IPV4
    return ae, subnet.address.packed[: _prefix_bytes(subnet.prefix_len)]


def _decode_prefix(ae: int, plen: int, buf: bytes, offset: int, *, wildcard_ok: bool) -> tuple[Subnet, int]:
    """Read a prefix for ``ae``/``plen`` at ``offset``; return it and the new offset."""
    if ae == AE_WILDCARD:
        if not wildcard_ok or plen != 0:
            raise CodecError("wildcard address encoding with non-zero prefix length")
        return Subnet(ipaddress.IPv6Address(0), 0), offset
    if ae == AE_IPV4:
        if plen > 32:
            raise CodecError(f"IPv4 prefix length {plen} > 32")
        n = _prefix_bytes(plen)
        raw = _take(buf, offset, n)
        return Subnet(ipaddress.IPv4Address(raw.ljust(4, b"\0")), plen), offset + n
    if ae == AE_IPV6:
        if plen > 128:
            raise CodecError(f"IPv6 prefix length {plen} > 128")
        n = _prefix_bytes(plen)
        raw = _take(buf, offset, n)
        return Subnet(ipaddress.IPv6Address(raw.ljust(16, b"\0")), plen), offset + n
    if ae == AE_IPV6_LINK_LOCAL:
        if plen != 64:
            raise CodecError("link-local address encoding requires prefix length 64")
        raw = _take(buf, offset, 8)
        return Subnet(ipaddress.IPv6Address(_LINK_LOCAL_PREFIX + raw), 64), offset + 8
    raise CodecError(f"unknown address encoding {ae}")


def _take(buf: bytes, offset: int, n: int) -> bytes:
    end = offset + n
    if end > len(buf):
        raise CodecError(f"TLV body truncated: need {end} bytes, have {len(buf)}")
    return bytes(buf[offset:end])


@dataclass(frozen=True, slots=True)
class Hello:
    """Liveness probe; the receiver answers with an IHU."""

    TYPE: ClassVar[int] = TYPE_HELLO
    flags: int
    seqno: int
    interval: int  # centiseconds

    def encode_body(self) -> bytes:
        for name in ("flags", "seqno", "interval"):
            _u16(name, getattr(self, name))
        return struct.pack("!HHH", self.flags, self.seqno, self.interval)

    @classmethod
    def decode_body(cls, buf: bytes) -> Hello:
        if len(buf) < 6:
            raise CodecError("Hello body shorter than 6 bytes")
        flags, seqno, interval = struct.unpack_from("!HHH", buf)
        return cls(flags & HELLO_UNICAST, seqno, interval)


@dataclass(frozen=True, slots=True)
class Ihu:
    """ "I heard you": refreshes liveness and yields an RTT sample."""

    TYPE: ClassVar[int] = TYPE_IHU
    rx_cost: int
    interval: int  # centiseconds
    address: IPAddress | None = None

    def encode_body(self) -> bytes:
        _u16("rx_cost", self.rx_cost)
        _u16("interval", self.interval)
        if self.address is None:
            return struct.pack("!BBHH", AE_WILDCARD, 0, self.rx_cost, self.interval)
        ae = AE_IPV6 if self.address.version == 6 else AE_IPV4
        return struct.pack("!BBHH", ae, 0, self.rx_cost, self.interval) + self.address.packed

    @classmethod
    def decode_body(cls, buf: bytes) -> Ihu:
        if len(buf) < 6:
            raise CodecError("IHU body shorter than 6 bytes")
        ae, _reserved, rx_cost, interval = struct.unpack_from("!BBHH", buf)
        address: IPAddress | None
        if ae == AE_WILDCARD:
            address = None
        elif ae == AE_IPV4:
            address = ipaddress.IPv4Address(_take(buf, 6, 4))
        elif ae == AE_IPV6:
            address = ipaddress.IPv6Address(_take(buf, 6, 16))
        elif ae == AE_IPV6_LINK_LOCAL:
            address = ipaddress.IPv6Address(_LINK_LOCAL_PREFIX + _take(buf, 6, 8))
        else:
            raise CodecError(f"unknown address encoding {ae}")
        return cls(rx_cost, interval, address)


@dataclass(frozen=True, slots=True)
class Update:
    """A route announcement (metric 0xFFFF = retraction), carrying its
    originator's 40-byte router id."""

    TYPE: ClassVar[int] = TYPE_UPDATE
    flags: int
    interval: int  # centiseconds
    seqno: int
    metric: int
    subnet: Subnet
    router_id: bytes

    def encode_body(self) -> bytes:
        _u8("flags", self.flags)
        for name in ("interval", "seqno", "metric"):
            _u16(name, getattr(self, name))
        _check_router_id(self.router_id)
        ae, prefix = _encode_prefix(self.subnet)
        head = struct.pack(
            "!BBBBHHH", ae, self.flags, self.subnet.prefix_len, 0, self.interval, self.seqno, self.metric
        )
        return head + prefix + self.router_id

    @classmethod
    def decode_body(cls, buf: bytes) -> Update:
        if len(buf) < 10:
            raise CodecError("Update body shorter than 10 bytes")
        ae, flags, plen, _omitted, interval, seqno, metric = struct.unpack_from("!BBBBHHH", buf)
        subnet, offset = _decode_prefix(ae, plen, buf, 10, wildcard_ok=True)
        router_id = _take(buf, offset, ROUTER_ID_SIZE)
        return cls(flags & UPDATE_FLAGS_MASK, interval, seqno, metric, subnet, router_id)


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """Ask neighbours for a route to ``subnet`` (None = full table dump)."""

    TYPE: ClassVar[int] = TYPE_ROUTE_REQUEST
    generation: int
    subnet: Subnet | None

    def encode_body(self) -> bytes:
        _u8("generation", self.generation)
        if self.subnet is None:
            return struct.pack("!BBB", self.generation, AE_WILDCARD, 0)
        ae, prefix = _encode_prefix(self.subnet)
        return struct.pack("!BBB", self.generation, ae, self.subnet.prefix_len) + prefix

    @classmethod
    def decode_body(cls, buf: bytes) -> RouteRequest:
        if len(buf) < 3:
            raise CodecError("RouteRequest body shorter than 3 bytes")
        generation, ae, plen = struct.unpack_from("!BBB", buf)
        if ae == AE_WILDCARD:
            return cls(generation, None)
        subnet, _ = _decode_prefix(ae, plen, buf, 3, wildcard_ok=False)
        return cls(generation, subnet)


@dataclass(frozen=True, slots=True)
class SeqNoRequest:
    """Ask the originator of (subnet, router_id) for a newer seqno."""

    TYPE: ClassVar[int] = TYPE_SEQNO_REQUEST
    seqno: int
    hop_count: int
    router_id: bytes
    subnet: Subnet

    def encode_body(self) -> bytes:
        _u16("seqno", self.seqno)
        _u8("hop_count", self.hop_count)
        if self.hop_count == 0:
            raise CodecError("SeqNoRequest hop count must be at least 1")
        _check_router_id(self.router_id)
        ae, prefix = _encode_prefix(self.subnet)
        head = struct.pack("!BBHBB", ae, self.subnet.prefix_len, self.seqno, self.hop_count, 0)
        return head + self.router_id + prefix

    @classmethod
    def decode_body(cls, buf: bytes) -> SeqNoRequest:
        if len(buf) < 6:
            raise CodecError("SeqNoRequest body shorter than 6 bytes")
        ae, plen, seqno, hop_count, _reserved = struct.unpack_from("!BBHBB", buf)
        router_id = _take(buf, 6, ROUTER_ID_SIZE)
        subnet, _ = _decode_prefix(ae, plen, buf, 6 + ROUTER_ID_SIZE, wildcard_ok=True)
        if hop_count == 0:
            raise CodecError("SeqNoRequest hop count 0")
        return cls(seqno, hop_count, router_id, subnet)


Tlv = Hello | Ihu | Update | RouteRequest | SeqNoRequest

TLV_TYPES: dict[int, type[Tlv]] = {
    TYPE_HELLO: Hello,
    TYPE_IHU: Ihu,
    TYPE_UPDATE: Update,
    TYPE_ROUTE_REQUEST: RouteRequest,
    TYPE_SEQNO_REQUEST: SeqNoRequest,
}


def decode_tlv(tlv_type: int, body: bytes) -> Tlv:
    cls = TLV_TYPES.get(tlv_type)
    if cls is None:
        raise CodecError(f"unknown TLV type {tlv_type}")
    try:
        return cls.decode_body(body)
    except (ValueError, struct.error, IndexError) as exc:  # defensive: library errors never escape
        raise CodecError(f"malformed TLV type {tlv_type}: {exc}") from exc
