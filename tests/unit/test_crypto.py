"""Body encryption (PROTOCOL.md 4.2): raw X25519 output as the AES-256-GCM
key, ``ciphertext || tag || nonce``, no associated data, 32-byte minimum."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.crypto import MIN_SEALED_SIZE, NONCE_SIZE, TAG_SIZE, DecryptError, SessionKey, shared_secret
from common.identity import public_key_of
from common.wire.errors import CodecError

KEY = bytes(range(32))


def test_layout_is_ciphertext_tag_nonce() -> None:
    pt = b"\x01\x00\x00\x00" + os.urandom(100)
    nonce = os.urandom(12)
    body = SessionKey(KEY).seal(pt, nonce)
    assert body == AESGCM(KEY).encrypt(nonce, pt, None) + nonce
    assert len(body) == len(pt) + TAG_SIZE + NONCE_SIZE
    assert AESGCM(KEY).decrypt(body[-12:], body[:-12], None) == pt  # no associated data


@pytest.mark.parametrize("size", [4, 5, 100, 1404, 65535 - 28])
def test_roundtrip(size: int) -> None:
    key = SessionKey(KEY)
    pt = os.urandom(size)
    assert key.open(key.seal(pt)) == pt
    assert key.open(bytearray(key.seal(pt))) == pt


def test_fresh_nonce_per_seal() -> None:
    key = SessionKey(KEY)
    nonces = {key.seal(b"same plaintext")[-12:] for _ in range(64)}
    assert len(nonces) == 64


def test_minimum_body() -> None:
    """Below 12 + 16 + 4 bytes the reference refuses to decrypt, even an authentic body."""
    key = SessionKey(KEY)
    assert MIN_SEALED_SIZE == 32
    assert key.open(key.seal(b"abcd")) == b"abcd"
    with pytest.raises(DecryptError):
        key.open(key.seal(b"abc"))  # 31 bytes, authentic
    for n in range(MIN_SEALED_SIZE):
        with pytest.raises(DecryptError):
            key.open(bytes(n))


def test_wrong_key_and_tampering() -> None:
    body = SessionKey(KEY).seal(b"\x01\x00\x00\x00payload")
    with pytest.raises(DecryptError):
        SessionKey(bytes(32)).open(body)
    with pytest.raises(DecryptError):
        SessionKey(KEY).open(body + b"\0")  # an appended byte shifts the nonce
    with pytest.raises(DecryptError):
        SessionKey(KEY).open(body[1:])


def test_decrypt_error_is_a_codec_error() -> None:
    """Receive loops catch CodecError once; an undecryptable body must be among them."""
    assert issubclass(DecryptError, CodecError)


@pytest.mark.parametrize("size", [0, 16, 24, 31, 33])
def test_session_key_must_be_256_bits(size: int) -> None:
    """AESGCM would quietly accept a 16- or 24-byte key and run AES-128/192."""
    with pytest.raises(ValueError):
        SessionKey(bytes(size))


def test_shared_secret_symmetric() -> None:
    a, b = os.urandom(32), os.urandom(32)
    ka = shared_secret(X25519PrivateKey.from_private_bytes(a), public_key_of(b))
    kb = shared_secret(X25519PrivateKey.from_private_bytes(b), public_key_of(a))
    assert ka == kb and len(ka) == 32
    body = SessionKey(ka).seal(b"\x01\x01\x00\x00hello")
    assert SessionKey(kb).open(body) == b"\x01\x01\x00\x00hello"


# Small-order points give an all-zero X25519 output: "cannot decrypt", not a crash.
SMALL_ORDER = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
]


@pytest.mark.parametrize("peer", SMALL_ORDER, ids=["zero", "one", "order8a", "order8b"])
def test_shared_secret_small_order_peer(peer: bytes) -> None:
    with pytest.raises(DecryptError):
        shared_secret(X25519PrivateKey.generate(), peer)


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_shared_secret_bad_length(size: int) -> None:
    with pytest.raises(DecryptError):
        shared_secret(X25519PrivateKey.generate(), bytes([9]) * size)
