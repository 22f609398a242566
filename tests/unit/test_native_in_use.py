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
