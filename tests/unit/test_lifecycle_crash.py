"""A service whose thread or main loop dies exits non-zero with the
traceback in its log (common/lifecycle.exit_on_crash), so supervisord
restarts it instead of leaving a process that lost part of its work."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.lifecycle import EXIT_BUG

ROOT = Path(__file__).resolve().parents[2]

PRELUDE = """
import logging, sys, threading, time
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
from common.lifecycle import exit_on_crash
exit_on_crash("svc")
"""

CASES = {
    "thread": """
def work():
    raise RuntimeError("engine bug in a thread")
threading.Thread(target=work, name="sampler", daemon=True).start()
time.sleep(30)  # the main thread would live on without the hook
""",
    "main": """
raise RuntimeError("engine bug in the main loop")
""",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_dying_thread_or_loop_exits_non_zero_with_its_traceback(case: str) -> None:
    code = textwrap.dedent(PRELUDE) + textwrap.dedent(CASES[case])
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert out.returncode == EXIT_BUG, out.stderr
    assert "Traceback" in out.stderr and "engine bug" in out.stderr
    if case == "thread":
        assert "thread sampler died" in out.stderr


def test_a_clean_exit_stays_clean() -> None:
    code = textwrap.dedent(PRELUDE) + "threading.Thread(target=sys.exit).start()\nsys.exit(0)\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
