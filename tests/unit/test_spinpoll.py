"""The adaptive short poll's state machine (common/spinpoll.py), sans IO:
only timestamps go in."""

from __future__ import annotations

import pytest

from common.spinpoll import WINDOW_ENV, SpinPolicy, window_from_env


def test_idle_loop_never_spins() -> None:
    policy = SpinPolicy(window=0.001)
    for now in (0.0, 1.0, 100.0):
        assert policy.timeout(now, 1.0) == 1.0
    assert policy.spins == 0


def test_spins_only_within_the_window_after_traffic() -> None:
    policy = SpinPolicy(window=0.001, budget=0.5, burst=0.01)
    policy.traffic(10.0)
    assert policy.timeout(10.0002, 1.0) == 0.0
    assert policy.timeout(10.0009, 1.0) == 0.0
    assert policy.timeout(10.0011, 1.0) == 1.0  # the window has closed: block again
    assert policy.spins == 2
    assert policy.spin_until(10.0) == pytest.approx(10.001)


def test_a_zero_timeout_stays_zero_and_window_zero_is_off() -> None:
    policy = SpinPolicy(window=0.001)
    policy.traffic(5.0)
    assert policy.timeout(5.0001, 0.0) == 0.0
    off = SpinPolicy(window=0.0)
    off.traffic(5.0)
    assert off.timeout(5.0001, 1.0) == 1.0


def test_fruitless_polling_is_bounded_by_the_budget() -> None:
    """Traffic every 2 ms with nothing to catch in between: the loop spins
    at most ``budget`` of the time, however long this goes on."""
    policy = SpinPolicy(window=0.002, budget=0.1, burst=0.004)
    now = 0.0
    spun = 0.0
    for _ in range(5000):  # 10 s of a packet every 2 ms
        policy.traffic(now)
        step = 0.0001
        end = now + 0.002
        while now < end:
            if policy.timeout(now, 1.0) == 0.0:
                policy.spun(now, now + step)
                spun += step
                now += step
            else:
                now = end  # blocked until the next packet
    assert spun <= 0.1 * now + 0.004 + 1e-6
    assert spun > 0.05 * now  # and it does use what it may
    assert policy.spent == pytest.approx(spun)


def test_tokens_refill_after_a_quiet_spell() -> None:
    policy = SpinPolicy(window=0.01, budget=0.1, burst=0.002)
    policy.traffic(0.0)
    policy.spun(0.0, 0.003)  # more than the burst: in debt
    assert not policy.hot(0.003)
    policy.traffic(1.0)  # a second later the bucket is full again
    assert policy.hot(1.0)


def test_window_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WINDOW_ENV, "300")
    assert window_from_env() == pytest.approx(0.0003)
    monkeypatch.setenv(WINDOW_ENV, "junk")
    assert window_from_env(0.5) == 0.5
    monkeypatch.setenv(WINDOW_ENV, "-5")
    assert window_from_env() == 0.0
    monkeypatch.setenv(WINDOW_ENV, "999999999")
    assert window_from_env() == pytest.approx(0.1)
    monkeypatch.delenv(WINDOW_ENV)
    assert window_from_env(0.25) == 0.25
