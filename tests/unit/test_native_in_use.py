"""The native kernel is in use wherever it was built (not skipped with the
kernel's other tests when it fails to load: that is the failure to catch)."""

from __future__ import annotations

import os

import pytest

from common import native
from common.crypto import SessionKey
from common.fib import FibReplica
from common.identity import Identity
from services.tund.dataplane import DataPlane, KeyCache


def test_native_kernel_in_use_when_built() -> None:
    """Fails when the extension is built but the services would silently
    run the pure-Python path (an import error swallowed, say)."""
    print(f"\n{native.describe()}")
    if not native.built() or os.environ.get(native.ENV) == "0":
        pytest.skip(f"no native kernel wanted here: {native.describe()}")
    assert native.NAME == "native", native.REASON
    me = Identity.from_secret(bytes([1]) * 32)
    dp = DataPlane(me, FibReplica(), KeyCache(me.private_key), tun=True, vnet=True)
    assert dp.kernel is native.kernel
    assert type(dp.gro).__module__ == "common._kernel"
    assert type(SessionKey(bytes(32)).aead).__name__ == "Aead"


def test_native_kernel_in_use_with_session_keys() -> None:
    """Session keys are on by default: the data plane, its session AES-GCM
    contexts and replay windows must still be the kernel's."""
    if not native.built() or os.environ.get(native.ENV) == "0":
        pytest.skip(f"no native kernel wanted here: {native.describe()}")
    from services.tund.sessions import RecvState, Session, SessionEngine

    me = Identity.from_secret(bytes([1]) * 32)
    keys = KeyCache(me.private_key)
    engine = SessionEngine(me, keys.get)
    dp = DataPlane(me, FibReplica(), keys, tun=True, vnet=True, sessions=engine)
    assert dp.kernel is native.kernel
    rs = RecvState(SessionKey(bytes(32)).aead, b"abcd", me.public_key, Session(True, 0.0), native=engine.native)
    assert type(rs.window).__module__ == "common._kernel"
