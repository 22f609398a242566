"""peerd's event loop: data-path readers run the moment the wait returns,
and an optional short poll after traffic (common/spinpoll.py).

Why data first: an idle ping crosses each peerd twice, and each crossing
starts with a cold wake-up. asyncio's ``_run_once`` turns every ready
descriptor into a handle on its ready queue, behind whatever was queued
already (timers that fell due, the write loops' futures), and runs them in
turn: 15-50 µs of interpreter work (measured on the 2-vCPU VMs of
docs/PERFORMANCE.md) before the packet's own read starts. The readers
registered here (the links' sockets, the rings' announcement sockets) are
called straight from ``select`` instead; asyncio sees the rest of the
events as usual and does its bookkeeping after the packet has gone on.

The short poll (``MYCELIUM_SPIN_US``): while the SpinPolicy is hot, the
wait polls epoll without blocking, yielding the CPU between polls, until
an event comes, the window closes or the loop's own timeout (a timer due)
is reached; then it blocks for what is left as usual.
"""

from __future__ import annotations

import asyncio
import os
import select
import selectors
import time
import weakref
from collections.abc import Callable
from typing import Any

from common.native import kernel as _kernel
from common.spinpoll import SpinPolicy

Key = selectors.SelectorKey
Reader = Callable[[], object]

_selectors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, DataFirstSelector] = weakref.WeakKeyDictionary()


class DataFirstSelector(selectors.EpollSelector):
    """An epoll selector that calls the readers in ``first`` itself as soon
    as the wait returns; ``select`` hands asyncio only the other events.

    ``first`` maps a descriptor to asyncio's reader handle for it and the
    reader: the reader is called only while that handle is still the one
    asyncio holds for the descriptor (``key.data`` is asyncio's (reader,
    writer) pair), so an entry left behind by a plain ``remove_reader``, or
    an asyncio that keeps its handles elsewhere, falls back to asyncio's
    own dispatch instead of calling the wrong reader."""

    def __init__(self) -> None:
        super().__init__()
        self.first: dict[int, tuple[object, Reader]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None  # for the exception handler
        self.counts = {"ran_first": 0}  # readers called from the wait, here or in the kernel's (a test reads it)
        self.rings: tuple[Any, ...] | None = None  # data_wait's arguments (serve_rings), None: the Python wait

    @property
    def ran_first(self) -> int:
        return self.counts["ran_first"]

    def reader_failed(self, reader: Reader, exc: Exception) -> None:
        """As asyncio's Handle does: the loop's exception handler decides."""
        if self.loop is None:
            raise exc
        self.loop.call_exception_handler({"message": f"exception in data-path reader {reader!r}", "exception": exc})

    def serve_rings(self, rings: tuple[Any, ...]) -> None:
        """The kernel's data_wait waits from now on, drains the ring
        connections (DataIn's conns) itself and calls the data-first
        readers: ``rings`` is its arguments after the timeout (conns,
        readers, handle, direct, min_direct, data_in, counters); asyncio's
        ready queue and this selector's tables follow."""
        ready = getattr(self.loop, "_ready", None)  # asyncio's deque of callbacks due now
        keys = getattr(self, "_fd_to_key", None)  # selectors' fd -> SelectorKey
        if _kernel is not None and ready is not None and isinstance(keys, dict):
            self.rings = (*rings, ready, self.first, keys, self.counts, self.reader_failed)

    def wait(self, timeout: float | None) -> list[tuple[Key, int]]:
        rings = self.rings
        if rings is None or _kernel is None:
            return super().select(timeout)
        if timeout is not None:
            timeout = max(0.0, timeout)
        got: list[tuple[int, int]] = _kernel.data_wait(self._selector.fileno(), timeout, *rings)  # type: ignore[attr-defined]
        ready = []
        for fd, event in got:  # as EpollSelector.select
            events = 0
            if event & ~select.EPOLLIN:
                events |= selectors.EVENT_WRITE
            if event & ~select.EPOLLOUT:
                events |= selectors.EVENT_READ
            key = self._fd_to_key.get(fd)  # type: ignore[attr-defined]
            if key:
                ready.append((key, events & key.events))
        return ready

    def select(self, timeout: float | None = None) -> list[tuple[Key, int]]:
        ready = self.wait(timeout)
        first = self.first
        if not first or not ready:
            return ready
        rest: list[tuple[Key, int]] = []
        for key, events in ready:
            entry = first.get(key.fd) if events & selectors.EVENT_READ else None
            data = key.data
            if entry is None or not isinstance(data, tuple) or not data or data[0] is not entry[0]:
                rest.append((key, events))
                continue
            reader = entry[1]
            self.counts["ran_first"] += 1
            try:
                reader()
            except Exception as exc:
                self.reader_failed(reader, exc)
            if events & selectors.EVENT_WRITE:
                rest.append((key, selectors.EVENT_WRITE))
        return rest


class SpinSelector(DataFirstSelector):
    """A data-first selector that polls for a while after events instead of blocking."""

    def __init__(self, policy: SpinPolicy) -> None:
        super().__init__()
        self.policy = policy

    def wait(self, timeout: float | None) -> list[tuple[Key, int]]:
        policy = self.policy
        now = time.monotonic()
        block = 3600.0 if timeout is None else timeout
        if policy.timeout(now, block) == 0:
            due = now + block  # when the loop's next timer is due
            end = min(policy.spin_until(now), due)
            sched_yield = os.sched_yield
            while True:
                ready = super().wait(0)
                t = time.monotonic()
                if ready:
                    policy.traffic(t)
                    return ready
                policy.spun(now, t)
                now = t
                if now >= end or not policy.hot(now):
                    break
                sched_yield()
            if timeout is not None:
                timeout = max(0.0, due - now)
        ready = super().wait(timeout)
        if ready:
            policy.traffic(time.monotonic())
        return ready


def loop_factory(policy: SpinPolicy) -> Callable[[], asyncio.AbstractEventLoop]:
    """For asyncio.run(loop_factory=...): a selector loop over a data-first
    selector (one that also spins when the policy asks for it)."""

    def make() -> asyncio.AbstractEventLoop:
        selector = SpinSelector(policy) if policy.window > 0 else DataFirstSelector()
        loop = asyncio.SelectorEventLoop(selector)
        selector.loop = loop
        _selectors[loop] = selector
        return loop

    return make


def add_data_reader(fd: int, reader: Callable[..., object], *args: Any) -> None:
    """``loop.add_reader`` on the running loop, and where its selector is
    data first, the reader is called straight from the wait."""
    loop = asyncio.get_running_loop()
    loop.add_reader(fd, reader, *args)
    selector = _selectors.get(loop)
    if selector is not None:
        data = selector.get_key(fd).data
        if isinstance(data, tuple) and data:
            selector.first[fd] = (data[0], (lambda: reader(*args)) if args else reader)


def serve_rings(rings: tuple[Any, ...]) -> bool:
    """On the running loop, where its selector is data first and the
    kernel is built: the wake-ups of the ring connections and of the
    data-first readers in C (``DataFirstSelector.serve_rings``). False
    where they stay Python's."""
    selector = _selectors.get(asyncio.get_running_loop())
    if selector is None or _kernel is None:
        return False
    selector.serve_rings(rings)
    return selector.rings is not None


def remove_data_reader(fd: int) -> None:
    """The reverse of add_data_reader."""
    loop = asyncio.get_running_loop()
    selector = _selectors.get(loop)
    if selector is not None:
        selector.first.pop(fd, None)
    loop.remove_reader(fd)
