"""Link packets (PROTOCOL.md sections 3, 4.1 and 5.1) and the incremental
stream decoder that cuts a TCP byte stream into them.

Data packets keep their addresses as 16 raw bytes and their body as bytes:
the data path never needs ``ipaddress`` objects, and a transit node
forwards the body untouched.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import CodecError
from .rules import DATA_PREFIX, DATA_PREFIX_SIZE
from .tlv import Tlv, decode_tlv

VERSION = 1
TYPE_DATA = 0
TYPE_CONTROL = 1
BABEL_MAGIC = 42
BABEL_VERSION = 3

OUTER_HEADER_SIZE = 4
DATA_HEADER_SIZE = 36  # after the outer header
assert DATA_PREFIX_SIZE == OUTER_HEADER_SIZE + DATA_HEADER_SIZE
BABEL_HEADER_SIZE = 4
MAX_DATA_BODY = 0xFFFF
MAX_PACKET_SIZE = DATA_PREFIX_SIZE + MAX_DATA_BODY
MAX_BABEL_BODY = 2 + 0xFF  # one TLV: type, length (u8) and its body

_DATA_PREFIX = DATA_PREFIX
_CONTROL_PREFIX = struct.Struct("!BBxxBBHBB")


@dataclass(frozen=True, slots=True)
class DataPacket:
    """An end-to-end encrypted packet; only ``hop_limit`` changes in transit."""

    src: bytes  # 16-byte IPv6 address
    dst: bytes  # 16-byte IPv6 address
    hop_limit: int
    body: bytes

    def __init__(self, src: bytes, dst: bytes, hop_limit: int, body: bytes) -> None:
        # Built once per forwarded packet: the slot setters cost about half of the
        # object.__setattr__ calls the generated frozen __init__ makes.
        _set_src(self, src)
        _set_dst(self, dst)
        _set_hop_limit(self, hop_limit)
        _set_body(self, body)

    def encode(self) -> bytes:
        body = self.body
        if len(body) > MAX_DATA_BODY:
            raise CodecError(f"data body of {len(body)} bytes exceeds {MAX_DATA_BODY}")
        if len(self.src) != 16 or len(self.dst) != 16:
            raise CodecError("data packet addresses must be 16 bytes")
        try:  # struct checks the hop limit's range and type for free
            return _DATA_PREFIX.pack(VERSION, TYPE_DATA, len(body), self.hop_limit, self.src, self.dst) + body
        except struct.error as exc:
            raise CodecError(f"hop limit {self.hop_limit!r} out of range") from exc


# the slot descriptors' setters, taken from the class dict (what ``DataPacket.src`` is at runtime)
_set_src = DataPacket.__dict__["src"].__set__
_set_dst = DataPacket.__dict__["dst"].__set__
_set_hop_limit = DataPacket.__dict__["hop_limit"].__set__
_set_body = DataPacket.__dict__["body"].__set__


@dataclass(frozen=True, slots=True)
class ControlPacket:
    """Exactly one Babel TLV, as the reference sends and parses them."""

    tlv: Tlv

    def encode(self) -> bytes:
        body = self.tlv.encode_body()
        if len(body) > 0xFF:
            raise CodecError("TLV body longer than 255 bytes")
        return (
            _CONTROL_PREFIX.pack(
                VERSION, TYPE_CONTROL, BABEL_MAGIC, BABEL_VERSION, len(body) + 2, self.tlv.TYPE, len(body)
            )
            + body
        )


Packet = DataPacket | ControlPacket


def encode_data_header(src: bytes, dst: bytes, hop_limit: int, body_len: int) -> bytes:
    """The 40 bytes in front of a data body, for callers that already hold the body."""
    return _DATA_PREFIX.pack(VERSION, TYPE_DATA, body_len, hop_limit, src, dst)


def control_tlv_type(frame: bytes) -> int | None:
    """The TLV type of an encoded control packet without decoding it (None if
    it is not one), so a receiver can treat liveness TLVs before a backlog."""
    if len(frame) < _CONTROL_PREFIX.size or frame[0] != VERSION or frame[1] != TYPE_CONTROL:
        return None
    return frame[_CONTROL_PREFIX.size - 2]


def decode_babel_body(body: bytes) -> Tlv:
    """The first TLV of a babel body; trailing bytes are ignored (5.6)."""
    if len(body) < 2:
        raise CodecError("babel body shorter than a TLV header")
    tlv_type, tlv_len = body[0], body[1]
    if 2 + tlv_len > len(body):
        raise CodecError(f"TLV length {tlv_len} overruns babel body of {len(body)} bytes")
    return decode_tlv(tlv_type, bytes(body[2 : 2 + tlv_len]))


def decode_packet(buf: bytes) -> Packet:
    """Decode one complete packet occupying all of ``buf`` (a QUIC datagram)."""
    decoder = StreamDecoder()
    packets = decoder.feed(buf)
    if decoder.buffered or len(packets) != 1:
        raise CodecError("buffer does not hold exactly one packet")
    if decoder.drops:
        raise CodecError(f"malformed control packet: {next(iter(decoder.drops))}")
    return packets[0]


class StreamDecoder:
    """Cuts a byte stream into packets, fed chunk by chunk.

    Fatal framing errors (bad outer version or type) raise ``CodecError``:
    the link must be closed since the stream can no longer be trusted.
    A control packet whose babel header or TLV is invalid is skipped whole
    by its declared length and counted in ``drops``, so the stream stays in
    sync (the recommendation of PROTOCOL.md 5.6). The buffer never holds
    more than one maximum-size packet plus one fed chunk.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.drops: Counter[str] = Counter()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Packet]:
        pending = self._buf
        if pending:
            pending += data
            buf: bytes | bytearray = pending
        else:
            buf = data  # nothing pending: cut packets where they lie, copy only the tail
        try:
            with memoryview(buf) as view:
                out, pos = self._cut(buf, view)
                tail = None if buf is pending else bytearray(view[pos:])
        except CodecError:
            self._buf = bytearray()
            raise
        if tail is not None:
            self._buf = tail
        elif pos:
            del pending[:pos]
        return out

    def cut(self, buf: bytearray, end: int) -> tuple[list[ControlPacket], list[int], int]:
        """For a reader that keeps its own buffer: the control packets and
        the offsets of the complete data packets in ``buf[:end]``, and how
        many bytes they use (the caller keeps the rest for the next read).
        Nothing is buffered here; fatal framing errors raise ``CodecError``."""
        control: list[ControlPacket] = []
        offsets: list[int] = []
        with memoryview(buf) as view:
            pos = self._cut_split(buf, view, end, control, offsets)
        return control, offsets, pos

    def _cut_split(
        self, buf: bytes | bytearray, view: memoryview, end: int, control: list[ControlPacket], offsets: list[int]
    ) -> int:
        append = offsets.append
        pos = 0
        while end - pos >= OUTER_HEADER_SIZE:
            if buf[pos] != VERSION:
                raise CodecError(f"unsupported packet version {buf[pos]}")
            ptype = buf[pos + 1]
            if ptype == TYPE_DATA:
                if end - pos < DATA_PREFIX_SIZE:
                    break
                nxt = pos + DATA_PREFIX_SIZE + (buf[pos + 5] << 8 | buf[pos + 6])
                if nxt > end:
                    break
                append(pos)
                pos = nxt
            elif ptype == TYPE_CONTROL:
                nxt = self._control_at(buf, view, pos, end, control.append)
                if nxt < 0:
                    break
                pos = nxt
            else:
                raise CodecError(f"unknown packet type {ptype}")
        return pos

    def _control_at(
        self, buf: bytes | bytearray, view: memoryview, pos: int, end: int, append: Callable[[Any], None]
    ) -> int:
        """Where the control packet at ``pos`` ends (-1 while it is incomplete).
        A valid one is appended; a bad babel header or TLV is skipped whole by
        its declared length and counted, so the stream stays in sync (5.6)."""
        if end - pos < OUTER_HEADER_SIZE + BABEL_HEADER_SIZE:
            return -1
        body_len = (buf[pos + 6] << 8) | buf[pos + 7]
        if body_len > MAX_BABEL_BODY:
            raise CodecError(f"control packet length {body_len} exceeds {MAX_BABEL_BODY}")
        nxt = pos + OUTER_HEADER_SIZE + BABEL_HEADER_SIZE + body_len
        if nxt > end:
            return -1
        if buf[pos + 4] != BABEL_MAGIC or buf[pos + 5] != BABEL_VERSION:
            self.drops["babel_header"] += 1
        else:
            try:
                append(ControlPacket(decode_babel_body(bytes(view[pos + 8 : nxt]))))
            except CodecError:
                self.drops["tlv"] += 1
        return nxt

    def _cut(self, buf: bytes | bytearray, view: memoryview) -> tuple[list[Packet], int]:
        """Complete packets from the start of ``buf`` and where the rest begins."""
        out: list[Packet] = []
        append = out.append
        unpack_data = _DATA_PREFIX.unpack_from
        pos = 0
        end = len(buf)
        while end - pos >= OUTER_HEADER_SIZE:
            version, ptype = buf[pos], buf[pos + 1]
            if version != VERSION:
                raise CodecError(f"unsupported packet version {version}")
            if ptype == TYPE_DATA:
                if end - pos < DATA_PREFIX_SIZE:
                    break
                _, _, body_len, hop_limit, src, dst = unpack_data(buf, pos)
                nxt = pos + DATA_PREFIX_SIZE + body_len
                if nxt > end:
                    break
                append(DataPacket(src, dst, hop_limit, bytes(view[pos + DATA_PREFIX_SIZE : nxt])))
                pos = nxt
            elif ptype == TYPE_CONTROL:
                nxt = self._control_at(buf, view, pos, end, append)
                if nxt < 0:
                    break
                pos = nxt
            else:
                raise CodecError(f"unknown packet type {ptype}")
        return out, pos
