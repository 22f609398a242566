"""The 4-byte header at the start of every decrypted data body (PROTOCOL.md 4.3)."""

from __future__ import annotations

from .errors import CodecError

INNER_VERSION = 1
INNER_L3 = 0
INNER_MESSAGE = 1
INNER_OOB_ICMP = 2
INNER_TYPES = (INNER_L3, INNER_MESSAGE, INNER_OOB_ICMP)
INNER_HEADER_SIZE = 4

L3_HEADER = bytes((INNER_VERSION, INNER_L3, 0, 0))
MESSAGE_HEADER = bytes((INNER_VERSION, INNER_MESSAGE, 0, 0))
OOB_ICMP_HEADER = bytes((INNER_VERSION, INNER_OOB_ICMP, 0, 0))


def split_inner(plaintext: bytes) -> tuple[int, bytes]:
    """(inner type, payload) of a decrypted body; reserved bytes are ignored."""
    if len(plaintext) < INNER_HEADER_SIZE:
        raise CodecError("decrypted body shorter than the inner header")
    if plaintext[0] != INNER_VERSION:
        raise CodecError(f"unsupported inner version {plaintext[0]}")
    kind = plaintext[1]
    if kind not in INNER_TYPES:
        raise CodecError(f"unknown inner data type {kind}")
    return kind, plaintext[INNER_HEADER_SIZE:]
