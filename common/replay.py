"""Replay defences for received data packets (docs/EXTENSIONS.md 3).

``ReplayWindow``: the sliding window of one session direction, keyed by the
64-bit counter in its nonces (RFC 6479-style bitmap, as IPsec and
WireGuard keep it). ``NonceFilter``: a bounded set of the most recent
random nonces seen under static keys (reference peers), which catches an
exact replay while its nonce is still remembered.

A counter or nonce is checked before decryption (cheap rejection) and
recorded only after the packet authenticated, so forged packets cannot
move the window or flush the filter.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .native import kernel

WINDOW = 2048  # packets a session tolerates out of order (multipath, batches)


def new_window(native: bool = True, size: int = WINDOW) -> Any:
    """A session's window: the C kernel's (``common._kernel.ReplayWindow``,
    the one the native data path checks without a Python call) where built,
    else ``ReplayWindow`` below, the reference of the same rule (the property
    tests hold the two to the same answers)."""
    if native and kernel is not None:
        return kernel.ReplayWindow(size)
    return ReplayWindow(size)


class ReplayWindow:
    """Accepts each counter at most once and none older than ``size``
    below the highest seen."""

    __slots__ = ("bits", "mask", "size", "top")

    def __init__(self, size: int = WINDOW) -> None:
        self.size = size
        self.mask = (1 << size) - 1
        self.top = -1  # highest counter accepted so far
        self.bits = 0  # bit i set: counter top - i accepted

    def fresh(self, ctr: int) -> bool:
        """Could ``ctr`` still be accepted (not replayed, not too old)?"""
        if ctr > self.top:
            return True
        d = self.top - ctr
        return d < self.size and not (self.bits >> d) & 1

    def mark(self, ctr: int) -> None:
        """Record an authenticated counter (``fresh`` was true for it)."""
        if ctr > self.top:
            shift = ctr - self.top
            self.bits = ((self.bits << shift) | 1) & self.mask if shift < self.size else 1
            self.top = ctr
        else:
            self.bits |= 1 << (self.top - ctr)

    def check_and_mark(self, ctr: int) -> bool:
        if not self.fresh(ctr):
            return False
        self.mark(ctr)
        return True


NONCE_FILTER_SIZE = 65_536


class NonceFilter:
    """The last ``size`` random nonces accepted (FIFO). Memory is bounded
    (about 100 bytes per entry: 6.5 MB at the default); a replay older than
    ``size`` accepted packets is not caught. ``seen`` and ``order`` are
    public so a batch loop can test and add without a Python call."""

    __slots__ = ("order", "seen", "size")

    def __init__(self, size: int = NONCE_FILTER_SIZE) -> None:
        self.size = size
        self.seen: set[bytes] = set()
        self.order: deque[bytes] = deque()

    def __len__(self) -> int:
        return len(self.seen)

    def __contains__(self, nonce: bytes) -> bool:
        return nonce in self.seen

    def add(self, nonce: bytes) -> None:
        if nonce in self.seen:
            return
        self.seen.add(nonce)
        self.order.append(nonce)
        if len(self.order) > self.size:
            self.seen.discard(self.order.popleft())
