"""peerd's event loop with a short poll after traffic (common/spinpoll.py).

asyncio blocks in its selector's ``select(timeout)``; this selector asks
the SpinPolicy first and, while it is hot, polls epoll without blocking,
yielding the CPU between polls, until an event comes, the window closes
or the loop's own timeout (a timer due) is reached; then it blocks for
what is left as usual. Any event counts as traffic.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import time
from collections.abc import Callable

from common.spinpoll import SpinPolicy


class SpinSelector(selectors.EpollSelector):
    """An epoll selector that polls for a while after events instead of blocking."""

    def __init__(self, policy: SpinPolicy) -> None:
        super().__init__()
        self.policy = policy

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        policy = self.policy
        now = time.monotonic()
        block = 3600.0 if timeout is None else timeout
        if policy.timeout(now, block) == 0:
            due = now + block  # when the loop's next timer is due
            end = min(policy.spin_until(now), due)
            sched_yield = os.sched_yield
            while True:
                ready = super().select(0)
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
        ready = super().select(timeout)
        if ready:
            policy.traffic(time.monotonic())
        return ready


def loop_factory(policy: SpinPolicy) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """For asyncio.run(loop_factory=...): a selector loop over SpinSelector,
    or None (asyncio's own loop) when the policy never spins."""
    if policy.window <= 0:
        return None

    def make() -> asyncio.AbstractEventLoop:
        return asyncio.SelectorEventLoop(SpinSelector(policy))

    return make
