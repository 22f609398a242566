"""tests/background.py: a background check's figures, failures and deadline
reach the test that waits for it."""

from __future__ import annotations

import os
import time

import pytest

from tests.background import BackgroundCheck


def passing_check() -> dict[str, int]:
    return {"answer": 42}


def niceness_check() -> dict[str, int]:
    return {"nice": os.nice(0)}


def failing_check() -> dict[str, int]:
    assert 1 + 1 == 3, "arithmetic is off"
    return {}


def hanging_check() -> dict[str, int]:
    time.sleep(60)
    return {}


def test_figures_come_back() -> None:
    assert BackgroundCheck(f"{__name__}:passing_check", deadline=60).result() == {"answer": 42}


def test_the_check_only_gets_spare_cpu() -> None:
    assert BackgroundCheck(f"{__name__}:niceness_check", deadline=60).result() == {"nice": 19}


def test_a_failed_assertion_fails_the_waiting_test_with_its_traceback() -> None:
    with pytest.raises(AssertionError, match="arithmetic is off") as caught:
        BackgroundCheck(f"{__name__}:failing_check", deadline=60).result()
    assert "failing_check" in str(caught.value)  # the child's traceback


def test_a_check_past_its_deadline_is_killed() -> None:
    started = time.monotonic()
    check = BackgroundCheck(f"{__name__}:hanging_check", deadline=2)
    with pytest.raises(AssertionError, match="still running after 2 s"):
        check.result()
    assert check.proc.returncode is not None and time.monotonic() - started < 30


def test_a_missing_target_is_an_error_not_a_pass() -> None:
    with pytest.raises(AssertionError, match="failed in its background process"):
        BackgroundCheck(f"{__name__}:no_such_check", deadline=60).result()
