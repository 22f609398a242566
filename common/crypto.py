"""End-to-end body encryption (PROTOCOL.md 4.2).

The raw 32-byte X25519 output is the AES-256-GCM key; no KDF, no
associated data. A body is ``ciphertext || tag (16) || nonce (12)``.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .native import kernel
from .wire.errors import CodecError

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
MIN_SEALED_SIZE = NONCE_SIZE + TAG_SIZE + 4  # an inner header at least


class DecryptError(CodecError):
    """A body that is too short, fails authentication or has no usable key."""


def shared_secret(secret: X25519PrivateKey, peer_public: bytes) -> bytes:
    """Raw X25519 output; an all-zero result (small-order peer key) is refused."""
    try:
        return secret.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise DecryptError(f"no usable shared secret with {peer_public.hex()}") from exc


class SessionKey:
    """The AES-GCM state for one peer key; build once, reuse per packet.
    With the native kernel (common/native.py) it is the kernel's ``Aead``:
    the same ``encrypt``/``decrypt`` calls, with its OpenSSL contexts keyed
    once instead of set up on every call."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes, native: bool = True) -> None:
        if len(key) != KEY_SIZE:  # AESGCM would quietly run AES-128/192 on a short key
            raise ValueError(f"AES-256-GCM key must be {KEY_SIZE} bytes, got {len(key)}")
        self._aead = kernel.Aead(key) if native and kernel is not None else AESGCM(key)

    @property
    def aead(self) -> AESGCM:
        """The AES-GCM object itself, for batch loops that call
        ``encrypt``/``decrypt`` directly (one attribute lookup per batch)."""
        return self._aead

    def seal(self, plaintext: bytes, nonce: bytes | None = None) -> bytes:
        if nonce is None:
            nonce = os.urandom(NONCE_SIZE)
        return self._aead.encrypt(nonce, plaintext, None) + nonce

    def open(self, body: bytes) -> bytes:
        if len(body) < MIN_SEALED_SIZE:
            raise DecryptError(f"sealed body of {len(body)} bytes is shorter than {MIN_SEALED_SIZE}")
        try:
            return self._aead.decrypt(body[-NONCE_SIZE:], body[:-NONCE_SIZE], None)
        except InvalidTag as exc:
            raise DecryptError("authentication failed") from exc
