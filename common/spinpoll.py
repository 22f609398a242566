"""Adaptive short polling after traffic, for the data-path loops (tund,
peerd): sans IO, the loop tells it when events came and asks how long its
next wait may block.

Why: an idle ping crosses tund and peerd on each node each way, and every
hop wakes a process that was asleep. On the 2-vCPU VM of
docs/PERFORMANCE.md a cold wake-up (caches, TLB and branch predictors
taken over by others, the vCPU halted) costs 150-350 µs of CPU in each
process against ~20 µs warm, so an idle round trip costs 2.5x a busy one.
A loop that has just moved a packet is likely to move its answer within a
millisecond (the far side's reply, the kernel's ICMP echo): for a short
``window`` after traffic the loop polls without blocking, yielding the
CPU between polls, and catches the answer warm instead of being woken.

Bounds: the window only follows events (a node without traffic never
spins: idle CPU stays at the blocking loop's), and the time spent polling
in vain is paid from a token bucket (``budget`` seconds per second,
at most ``burst`` saved up), so no pattern of traffic makes a loop spin
more than ``budget`` of a core.

Off by default (``MYCELIUM_SPIN_US`` unset or 0): on the 2-vCPU VM the
whole chain ran on one vCPU, where a polling process holds the CPU the
next one needs, and the idle RTT got worse (docs/PERFORMANCE.md, "Idle
RTT and idle CPU"). Where the processes sit on separate idle cores it may
pay; measure with ``bench/bench_dataplane.py --rtt-only --spin-us 0,1200``.
"""

from __future__ import annotations

import os

WINDOW_ENV = "MYCELIUM_SPIN_US"  # microseconds of polling after traffic; "0" turns it off
DEFAULT_WINDOW = 0.0  # seconds: off (see above)
DEFAULT_BUDGET = 0.05  # seconds of fruitless polling per second, at most (5 % of a core)
DEFAULT_BURST = 0.02  # seconds of polling that can be saved up


def window_from_env(default: float = DEFAULT_WINDOW) -> float:
    """The window in seconds from MYCELIUM_SPIN_US (bad values: the default)."""
    text = os.environ.get(WINDOW_ENV, "")
    if not text:
        return default
    try:
        us = int(text)
    except ValueError:
        return default
    return max(0, min(us, 100_000)) / 1e6


class SpinPolicy:
    """Decides, from timestamps alone, whether the next wait polls or blocks."""

    def __init__(self, window: float = DEFAULT_WINDOW, budget: float = DEFAULT_BUDGET, burst: float = DEFAULT_BURST):
        self.window = max(0.0, window)
        self.budget = max(0.0, budget)
        self.burst = max(0.0, burst)
        self.tokens = self.burst
        self.last_traffic = float("-inf")  # when the loop last had events
        self.refilled = 0.0  # when tokens were last added
        self.spent = 0.0  # seconds polled in vain, in total (a gauge for stats)
        self.spins = 0  # non-blocking waits granted

    def traffic(self, now: float) -> None:
        """The loop's last wait returned events (it did some work)."""
        self.last_traffic = now

    def _refill(self, now: float) -> None:
        if now > self.refilled:
            self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.budget)
            self.refilled = now

    def hot(self, now: float) -> bool:
        """True while the next wait should poll without blocking: within
        ``window`` of the last traffic and with budget left."""
        if self.window <= 0 or now - self.last_traffic >= self.window:
            return False
        self._refill(now)
        return self.tokens > 0

    def timeout(self, now: float, block: float) -> float:
        """How long the next wait may block (seconds; ``block`` is what the
        loop would wait otherwise): 0 while hot."""
        if block > 0 and self.hot(now):
            self.spins += 1
            return 0.0
        return block

    def spun(self, started: float, now: float) -> None:
        """A non-blocking wait from ``started`` to ``now`` found nothing:
        charge it to the budget."""
        cost = max(0.0, now - started)
        self._refill(now)
        self.tokens -= cost
        self.spent += cost

    def spin_until(self, now: float) -> float:
        """The end of the current window (for a loop that spins inside one wait)."""
        return self.last_traffic + self.window
