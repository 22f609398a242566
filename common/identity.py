"""Node identity: the key file, the overlay address derived from the public
key, the node's /64 and its router id (PROTOCOL.md section 1)."""

from __future__ import annotations

import errno
import ipaddress
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from .wire.subnet import Subnet

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

KEY_SIZE = 32
KEY_FILE_MODE = 0o600  # the reference uses 0o640; a secret key needs no group read
DEFAULT_KEY_FILE = "priv_key.bin"
ROUTER_ID_SIZE = 40


class IdentityError(Exception):
    """A key or key file that cannot be used; the message is user-facing."""


def public_key_of(secret: bytes) -> bytes:
    """X25519(secret, 9) by ``cryptography``: a hand-written ladder would save
    each service ~1.7 MiB of imports, not worth carrying our own curve code."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    if len(secret) != KEY_SIZE:
        raise ValueError(f"an X25519 secret key is {KEY_SIZE} bytes, got {len(secret)}")
    return X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def parse_public_key(text: str) -> bytes:
    """Exactly 64 hex characters, as the reference accepts."""
    text = text.strip()
    if len(text) != 2 * KEY_SIZE:
        raise IdentityError(f"public key must be 64 hex characters, got {len(text)}")
    if any(c not in string.hexdigits for c in text):
        raise IdentityError("public key contains non-hex characters")
    return bytes.fromhex(text)


def address_of(public_key: bytes) -> ipaddress.IPv6Address:
    """BLAKE3 rule of v0.5+: first byte becomes 0x04 | popcount parity."""
    return ipaddress.IPv6Address(address_int(public_key))


def address_int(public_key: bytes) -> int:
    """``address_of`` as a 128-bit int (the router's ownership check needs no address object)."""
    h = blake3.blake3(public_key).digest(length=16)
    return ((0x04 | (h[0].bit_count() & 1)) << 120) | int.from_bytes(h[1:])


def subnet_of(address: ipaddress.IPv6Address) -> Subnet:
    """The /64 holding ``address`` (host bits zero)."""
    return Subnet(ipaddress.IPv6Address(address.packed[:8] + bytes(8)), 64)


def make_router_id(public_key: bytes) -> bytes:
    """Public key, zone 0, and 6 random bytes fresh for every process start."""
    return public_key + b"\0\0" + os.urandom(6)


def router_id_text(router_id: bytes) -> str:
    return f"{router_id[:32].hex()}-{router_id[32:34].hex()}-{router_id[34:40].hex()}"


def load_key_file(path: str | os.PathLike[str], what: str = "key file") -> bytes:
    """The first 32 bytes of an existing key file (``what`` names it in
    errors); extra bytes are ignored."""
    try:
        with open(path, "rb") as f:
            data = f.read(KEY_SIZE)
    except FileNotFoundError as exc:
        raise IdentityError(f"{what} {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise IdentityError(f"{what} {path} is a directory") from exc
    except OSError as exc:
        raise IdentityError(f"cannot read {what} {path}: {exc.strerror}") from exc
    if len(data) < KEY_SIZE:
        raise IdentityError(f"{what} {path} holds {len(data)} bytes, expected {KEY_SIZE}")
    return data


def load_or_create_key(path: str | os.PathLike[str]) -> bytes:
    """Load the key, creating it (mode KEY_FILE_MODE, parent directories too)
    only if nothing exists at ``path``. An existing file is never rewritten,
    and a failed creation leaves no partial key file behind."""
    p = Path(path)
    try:
        os.lstat(p)  # not Path.exists(): that lets ENAMETOOLONG/EACCES escape as OSError
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise IdentityError(f"cannot access key file {p}: {exc.strerror}") from exc
    else:  # a file, directory or (even dangling) symlink: load it, never create through it
        return load_key_file(p)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IdentityError(f"cannot create directory {p.parent}: {exc.strerror}") from exc
    secret = os.urandom(KEY_SIZE)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.EEXIST:  # raced with another creator: use theirs
            return load_key_file(p)
        raise IdentityError(f"cannot create key file {p}: {exc.strerror}") from exc
    try:
        try:
            if os.write(fd, secret) != KEY_SIZE:
                raise OSError(errno.EIO, "short write")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        # An empty or short key file would make every later start fail; we created
        # it (O_EXCL), so removing it is safe.
        try:
            os.unlink(p)
        except OSError:
            pass
        raise IdentityError(f"cannot write key file {p}: {exc.strerror}") from exc
    return secret


@dataclass(frozen=True)
class Identity:
    """Everything derived from one secret key."""

    secret: bytes
    public_key: bytes
    address: ipaddress.IPv6Address
    subnet: Subnet

    @classmethod
    def from_secret(cls, secret: bytes) -> Identity:
        pk = public_key_of(secret)
        addr = address_of(pk)
        return cls(secret, pk, addr, subnet_of(addr))

    @property
    def private_key(self) -> X25519PrivateKey:
        """The key as a ``cryptography`` object, for the services that do
        key exchanges (tund); imported here so the others never load it."""
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        return X25519PrivateKey.from_private_bytes(self.secret)
