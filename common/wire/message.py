"""Message-subsystem packets (PROTOCOL.md 7.2-7.3), the payload of data
packets with inner type 1.

Every packet starts with a 12-byte header: id (8), flags (u16), reserved
(u16, echoed in answers). The flag word selects the body. Decoding never
trusts a length it has not checked: a truncated packet (which crashes the
reference's message worker) is a ``CodecError`` here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import CodecError

FLAG_INIT = 0x8000
FLAG_DONE = 0x4000
FLAG_ABORTED = 0x2000
FLAG_CHUNK = 0x1000
FLAG_READ = 0x0800
FLAG_REPLY = 0x0400
FLAG_ACK = 0x0100

HEADER_SIZE = 12
MESSAGE_ID_SIZE = 8
CHECKSUM_SIZE = 32
MAX_TOPIC_LEN = 255

_HEADER = struct.Struct("!8sHH")
_INIT = struct.Struct("!QB")
_CHUNK = struct.Struct("!QQQ")
_DONE = struct.Struct("!Q32s")


@dataclass(frozen=True, slots=True)
class Init:
    id: bytes
    length: int
    topic: bytes
    reply: bool = False
    reserved: int = 0


@dataclass(frozen=True, slots=True)
class InitAck:
    id: bytes
    length: int
    topic_len: int
    reply: bool = False
    reserved: int = 0


@dataclass(frozen=True, slots=True)
class Chunk:
    id: bytes
    index: int
    offset: int
    size: int  # the size field as sent; may disagree with len(data)
    data: bytes
    reserved: int = 0


@dataclass(frozen=True, slots=True)
class ChunkAck:
    id: bytes
    index: int
    offset: int
    size: int
    reserved: int = 0


@dataclass(frozen=True, slots=True)
class Done:
    id: bytes
    chunk_count: int
    checksum: bytes
    reserved: int = 0


@dataclass(frozen=True, slots=True)
class DoneAck:
    id: bytes
    chunk_count: int
    checksum: bytes
    reserved: int = 0


@dataclass(frozen=True, slots=True)
class Read:
    id: bytes
    reserved: int = 0


@dataclass(frozen=True, slots=True)
class ReadAck:
    """Defined by the flag table but never sent by the reference."""

    id: bytes
    reserved: int = 0


@dataclass(frozen=True, slots=True)
class Abort:
    id: bytes
    reserved: int = 0


MessagePacket = Init | InitAck | Chunk | ChunkAck | Done | DoneAck | Read | ReadAck | Abort


def _header(pkt: MessagePacket, flags: int) -> bytes:
    if len(pkt.id) != MESSAGE_ID_SIZE:
        raise CodecError(f"message id must be {MESSAGE_ID_SIZE} bytes")
    if not 0 <= pkt.reserved <= 0xFFFF:
        raise CodecError("reserved field out of range")
    return _HEADER.pack(pkt.id, flags, pkt.reserved)


def _u64(name: str, value: int) -> None:
    if not 0 <= value < 1 << 64:
        raise CodecError(f"{name} {value} does not fit in 64 bits")


def encode_message(pkt: MessagePacket) -> bytes:
    """Bytes of a message packet, without the inner data header."""
    if isinstance(pkt, Init):
        _u64("length", pkt.length)
        if len(pkt.topic) > MAX_TOPIC_LEN:
            raise CodecError(f"topic longer than {MAX_TOPIC_LEN} bytes")
        flags = FLAG_INIT | (FLAG_REPLY if pkt.reply else 0)
        return _header(pkt, flags) + _INIT.pack(pkt.length, len(pkt.topic)) + pkt.topic
    if isinstance(pkt, InitAck):
        _u64("length", pkt.length)
        if not 0 <= pkt.topic_len <= MAX_TOPIC_LEN:
            raise CodecError("topic length out of range")
        flags = FLAG_INIT | FLAG_ACK | (FLAG_REPLY if pkt.reply else 0)
        return _header(pkt, flags) + _INIT.pack(pkt.length, pkt.topic_len)
    if isinstance(pkt, (Chunk, ChunkAck)):
        for name in ("index", "offset", "size"):
            _u64(name, getattr(pkt, name))
        if isinstance(pkt, Chunk):
            return _header(pkt, FLAG_CHUNK) + _CHUNK.pack(pkt.index, pkt.offset, pkt.size) + pkt.data
        return _header(pkt, FLAG_CHUNK | FLAG_ACK) + _CHUNK.pack(pkt.index, pkt.offset, pkt.size)
    if isinstance(pkt, (Done, DoneAck)):
        _u64("chunk_count", pkt.chunk_count)
        if len(pkt.checksum) != CHECKSUM_SIZE:
            raise CodecError("checksum must be 32 bytes")
        flags = FLAG_DONE | (FLAG_ACK if isinstance(pkt, DoneAck) else 0)
        return _header(pkt, flags) + _DONE.pack(pkt.chunk_count, pkt.checksum)
    if isinstance(pkt, Read):
        return _header(pkt, FLAG_READ)
    if isinstance(pkt, ReadAck):
        return _header(pkt, FLAG_READ | FLAG_ACK)
    if isinstance(pkt, Abort):
        return _header(pkt, FLAG_ABORTED)
    raise CodecError(f"not a message packet: {type(pkt).__name__}")


def _need(buf: bytes, n: int, what: str) -> None:
    if len(buf) < n:
        raise CodecError(f"{what} truncated: need {n} bytes, have {len(buf)}")


def decode_message(buf: bytes) -> MessagePacket:
    """Decode a message packet (after the inner data header), dispatching on
    flags in the reference's order (7.2)."""
    _need(buf, HEADER_SIZE, "message header")
    mid, flags, reserved = _HEADER.unpack_from(buf)
    body = bytes(buf[HEADER_SIZE:])
    reply = bool(flags & FLAG_REPLY)
    if flags & FLAG_ACK:
        if flags & FLAG_INIT:
            _need(body, _INIT.size, "INIT ACK")
            length, topic_len = _INIT.unpack_from(body)
            return InitAck(mid, length, topic_len, reply, reserved)
        if flags & FLAG_CHUNK:
            _need(body, _CHUNK.size, "CHUNK ACK")
            index, offset, size = _CHUNK.unpack_from(body)
            return ChunkAck(mid, index, offset, size, reserved)
        if flags & FLAG_DONE:
            _need(body, _DONE.size, "DONE ACK")
            count, checksum = _DONE.unpack_from(body)
            return DoneAck(mid, count, checksum, reserved)
        if flags & FLAG_READ:
            return ReadAck(mid, reserved)
        raise CodecError(f"ACK without a packet type (flags {flags:#06x})")
    if flags & FLAG_INIT:
        _need(body, _INIT.size, "INIT")
        length, topic_len = _INIT.unpack_from(body)
        _need(body, _INIT.size + topic_len, "INIT topic")
        return Init(mid, length, body[_INIT.size : _INIT.size + topic_len], reply, reserved)
    if flags & FLAG_CHUNK:
        _need(body, _CHUNK.size, "CHUNK")
        index, offset, size = _CHUNK.unpack_from(body)
        return Chunk(mid, index, offset, size, body[_CHUNK.size :], reserved)
    if flags & FLAG_DONE:
        _need(body, _DONE.size, "DONE")
        count, checksum = _DONE.unpack_from(body)
        return Done(mid, count, checksum, reserved)
    if flags & FLAG_READ:
        return Read(mid, reserved)
    if flags & FLAG_ABORTED:
        return Abort(mid, reserved)
    raise CodecError(f"message packet without a type flag (flags {flags:#06x})")
