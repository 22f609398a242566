"""Session negotiation packets and session nonces (docs/EXTENSIONS.md 2).

All of them travel as the plaintext of an ordinary data packet with inner
type ``INNER_SESSION`` (0x10), which the reference drops after decryption
("unknown protocol type", data.rs) without any other effect. INIT and
RESP are sealed with the static key of the two nodes; CONFIRM is sealed
with the new session key.

Plaintext after the 4-byte inner header ``01 10 00 00``::

    0      1      2      4
    | kind | ver  | 0000 | ...
    INIT    (88 bytes): index_i(4) timestamp_ns(8) eph_i(32) addr_i(16) addr_r(16) nonce(8)
    RESP    (92 bytes): index_r(4) index_i(4) timestamp_ns(8) eph_r(32) addr_i(16) addr_r(16) nonce(8)
    CONFIRM (8 bytes):  index_i(4)

Session data nonce (12 bytes, the last 12 of the body as always)::

    receiver's session index (4) | counter (8, big-endian, from 0)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import CodecError

INNER_SESSION = 0x10
SESSION_HEADER = bytes((1, INNER_SESSION, 0, 0))
SESSION_VERSION = 1
KIND_INIT = 1
KIND_RESP = 2
KIND_CONFIRM = 3

_HEAD = struct.Struct("!BBxx")
_INIT = struct.Struct("!BBxx4sQ32s16s16s8s")
_RESP = struct.Struct("!BBxx4s4sQ32s16s16s8s")
_CONFIRM = struct.Struct("!BBxx4s")


@dataclass(frozen=True, slots=True)
class Init:
    index: bytes  # the initiator's receive index (responder puts it in its nonces)
    timestamp: int  # wall clock ns: a responder refuses one not newer than the last it took
    ephemeral: bytes
    initiator: bytes  # 16-byte overlay addresses: bind the packet to its direction
    responder: bytes
    nonce: bytes  # random: RESP echoes the whole INIT into the key derivation

    def encode(self) -> bytes:
        return SESSION_HEADER + _INIT.pack(
            KIND_INIT, SESSION_VERSION, self.index, self.timestamp, self.ephemeral, self.initiator, self.responder,
            self.nonce,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Resp:
    index: bytes  # the responder's receive index
    initiator_index: bytes
    timestamp: int  # echoed from INIT
    ephemeral: bytes
    initiator: bytes
    responder: bytes
    nonce: bytes  # echoed from INIT

    def encode(self) -> bytes:
        return SESSION_HEADER + _RESP.pack(
            KIND_RESP, SESSION_VERSION, self.index, self.initiator_index, self.timestamp, self.ephemeral,
            self.initiator, self.responder, self.nonce,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Confirm:
    index: bytes  # the initiator's receive index of the confirmed session

    def encode(self) -> bytes:
        return SESSION_HEADER + _CONFIRM.pack(KIND_CONFIRM, SESSION_VERSION, self.index)


SessionPacket = Init | Resp | Confirm


def decode_session(payload: bytes) -> SessionPacket:
    """The packet after the inner header; exact sizes, known kind and version."""
    if len(payload) < _HEAD.size:
        raise CodecError("session packet shorter than its header")
    kind, version = _HEAD.unpack_from(payload)
    if version != SESSION_VERSION:
        raise CodecError(f"unsupported session version {version}")
    try:
        if kind == KIND_INIT and len(payload) == _INIT.size:
            _, _, idx, ts, eph, a, b, n = _INIT.unpack(payload)
            return Init(idx, ts, eph, a, b, n)
        if kind == KIND_RESP and len(payload) == _RESP.size:
            _, _, idx, idx_i, ts, eph, a, b, n = _RESP.unpack(payload)
            return Resp(idx, idx_i, ts, eph, a, b, n)
        if kind == KIND_CONFIRM and len(payload) == _CONFIRM.size:
            return Confirm(_CONFIRM.unpack(payload)[2])
    except struct.error as exc:
        raise CodecError(str(exc)) from exc
    raise CodecError(f"session packet kind {kind} with {len(payload)} bytes")
