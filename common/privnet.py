"""Private networks (TRANSPORTS.md section 2): links become TLS 1.3 with an
external PSK whose identity is the network name and whose key is the first
32 bytes of the network key file; no certificates on either side.

Only the legacy PSK callbacks exist in Python's ``ssl`` (3.13+), and they
are exactly what the reference's OpenSSL configuration uses, so both sides
fall into OpenSSL's TLS 1.3 PSK emulation with a SHA-256 hash (2.2, 2.4).
This module holds the one definition of those contexts; the TLS link, the
launcher's validation and the tests all use it.
"""

from __future__ import annotations

import os
import ssl
import sys
from dataclasses import dataclass
from typing import Any

NETWORK_KEY_SIZE = 32
NAME_MIN, NAME_MAX = 2, 64  # bytes of UTF-8 (ref: mycelium/src/lib.rs)
HANDSHAKE_TIMEOUT = 5.0  # a handshake that has not finished by then is refused
# the reference client's TLS <= 1.2 list (PSK suites removed); TLS 1.3 suites are OpenSSL's defaults
CLIENT_CIPHER_LIST = "DEFAULT:!aNULL:!eNULL:!MD5:!3DES:!DES:!RC4:!IDEA:!SEED:!aDSS:!SRP:!PSK"


class PrivnetError(Exception):
    """An unusable network name or key file, or an interpreter without PSK
    support; the message is one user-facing line."""


@dataclass(frozen=True)
class PrivateNetwork:
    name: str
    key: bytes

    def __post_init__(self) -> None:
        check_name(self.name)
        if len(self.key) != NETWORK_KEY_SIZE:
            raise PrivnetError(f"network key must be {NETWORK_KEY_SIZE} bytes, got {len(self.key)}")

    def __repr__(self) -> str:  # never print the key
        return f"PrivateNetwork(name={self.name!r})"


def psk_support_problem() -> str | None:
    """Why this interpreter cannot run a private network, or None."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if not hasattr(ctx, "set_psk_client_callback") or not getattr(ssl, "HAS_PSK", False):
        v = sys.version_info
        return (
            f"private networks need TLS 1.3 PSK callbacks in Python's ssl module (Python 3.13+ with OpenSSL PSK "
            f"support); this is Python {v.major}.{v.minor}.{v.micro} with {ssl.OPENSSL_VERSION}"
        )
    return None


def check_name(name: str) -> str:
    size = len(name.encode())
    if not NAME_MIN <= size <= NAME_MAX:
        raise PrivnetError(f"network name must be {NAME_MIN}-{NAME_MAX} bytes of UTF-8, got {size} bytes")
    return name


def load_network_key(path: str | os.PathLike[str]) -> bytes:
    """The first 32 bytes of the key file (extra bytes ignored, as the
    reference's ``read_exact``). Never created or rewritten: a missing or
    short file is an error."""
    from .identity import IdentityError, load_key_file  # here: the Python check must import nothing heavy

    try:
        return load_key_file(path, "network key file")
    except IdentityError as exc:
        hint = f" (e.g. head -c 32 /dev/urandom > {path})" if "holds" in str(exc) else ""
        raise PrivnetError(f"{exc}{hint}") from exc


def server_context(net: PrivateNetwork) -> ssl.SSLContext:
    """The listener's context: TLS 1.3 only, no certificate (so OpenSSL
    prefers the SHA-256 suites the PSK needs), the key only for our name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_SINGLE_DH_USE | ssl.OP_SINGLE_ECDH_USE
    ctx.verify_mode = ssl.CERT_NONE  # clients authenticate with the PSK, never a certificate
    name, key = net.name, net.key

    def psk(identity: str | None) -> bytes:
        return key if identity == name else b""  # b"": no PSK, and with no certificate the handshake fails

    ctx.set_psk_server_callback(psk)
    return ctx


def client_context(net: PrivateNetwork) -> ssl.SSLContext:
    """The dialler's context: TLS 1.3 only, identity = name, no SNI and no
    host name check (the reference uses ``Ssl::new`` directly). Certificates
    are verified against an empty trust store, so a server that answers with
    a certificate instead of the PSK is refused."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_SINGLE_DH_USE | ssl.OP_SINGLE_ECDH_USE
    ctx.set_ciphers(CLIENT_CIPHER_LIST)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED  # the reference's VERIFY_PEER; nothing is trusted, a PSK needs no cert
    name, key = net.name, net.key
    ctx.set_psk_client_callback(lambda _hint: (name, key))
    return ctx


class TlsSession:
    """Sans-IO TLS: ciphertext in (``feed``), ciphertext out (``pending_out``)."""

    def __init__(self, ctx: ssl.SSLContext, server_side: bool) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server_side, server_hostname=None)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.incoming.write(data)

    def feed_eof(self) -> None:
        self.incoming.write_eof()

    def pending_out(self) -> bytes:
        return self.outgoing.read() if self.outgoing.pending else b""

    def handshake(self) -> bool:
        """One step: True once done; False when it needs more input; raises
        ``ssl.SSLError`` when refused (the alert is then in ``pending_out``)."""
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def read_into(self, view: memoryview) -> int:
        """Plaintext into ``view``; 0 when nothing is decrypted yet. Raises
        ``ssl.SSLZeroReturnError`` on close_notify, ``ssl.SSLError`` on bad records."""
        total = 0
        read: Any = self.obj.read  # with a buffer it returns a count (typeshed says bytes)
        while total < len(view):
            try:
                n: int = read(len(view) - total, view[total:])
            except ssl.SSLWantReadError:
                break
            if n == 0:
                break
            total += n
        return total

    def encrypt(self, data: bytes | bytearray | memoryview) -> bytes:
        self.obj.write(data)
        return self.pending_out()


def used_psk(obj: ssl.SSLObject | ssl.SSLSocket) -> bool:
    """After a handshake: TLS 1.3 and no certificate from the other side."""
    return obj.version() == "TLSv1.3" and obj.getpeercert(binary_form=True) is None


def refusal_reason(exc: BaseException) -> str:
    """A short counter name for why a handshake failed (counted, logged once)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    text = f"{getattr(exc, 'reason', '') or ''} {exc}".upper()
    if "BINDER" in text or "ILLEGAL_PARAMETER" in text:
        return "wrong_key"  # same name, other key: the PSK binder does not verify (alert 47)
    if "NO_SUITABLE_SIGNATURE" in text or "HANDSHAKE_FAILURE" in text or "NO_SHARED_CIPHER" in text:
        return "wrong_name"  # no PSK for that identity and no certificate to fall back on (alert 40)
    if "CERTIFICATE" in text:
        return "certificate"  # the other side authenticated with a certificate, not the PSK
    if "WRONG_VERSION" in text or "HTTP_REQUEST" in text or "UNSUPPORTED_PROTOCOL" in text or "RECORD" in text:
        return "not_tls"  # plain TCP (a public node) or a TLS version below 1.3
    if isinstance(exc, (ConnectionError, EOFError)) or "EOF" in text:
        return "closed"
    return "other"
