"""Long CPU-bound checks that run beside the rest of the suite.

Why: the 1,000-node router simulation costs ~2 CPU minutes and does no
IO, while the integration tests spend most of their time waiting on
nodes in namespaces with one of the two cores idle. A test marked
``@pytest.mark.background("module:function")`` has that function started
in a child process at nice 19 as soon as the suite is collected
(tests/conftest.py), and is itself moved to the end of the run, where it
waits for the child and fails with the child's traceback if the check
failed. Run alone it simply waits for the whole check.

The function takes no arguments, makes its own assertions and returns a
JSON-able dict (its figures); the child prints ``{"ok": ..., ...}`` as its
last line of output.

Bounds: the child is killed at ``deadline`` seconds after it started,
and whenever the session ends (a ``-x`` stop, Ctrl-C) before it did.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NICE = 19  # only the CPU time nothing else in the suite wants


class BackgroundCheck:
    """One check running in its own process."""

    def __init__(self, target: str, deadline: float):
        self.target = target
        self.deadline = deadline
        # a file, not a pipe: the child never blocks on a full one; closed with this object
        self.output = tempfile.TemporaryFile(mode="w+b")  # noqa: SIM115
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.background", target],
            cwd=ROOT,
            stdout=self.output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own group, killed whole by stop()
        )
        # set from here rather than in a preexec_fn (not safe in a process with threads);
        # the child is single-threaded this early, and threads inherit it
        os.setpriority(os.PRIO_PROCESS, self.proc.pid, NICE)

    def result(self) -> dict[str, Any]:
        """Wait (up to the deadline) and return the check's figures, or
        raise AssertionError with what the child printed."""
        left = self.deadline - (time.monotonic() - self.started)
        try:
            self.proc.wait(timeout=max(left, 0.1))
        except subprocess.TimeoutExpired:
            self.stop()
            text = self.text()
            raise AssertionError(f"{self.target}: still running after {self.deadline:.0f} s, killed\n{text}") from None
        text = self.text()
        last = text.strip().splitlines()[-1] if text.strip() else ""
        try:
            report = json.loads(last)
        except ValueError:
            report = None
        if not isinstance(report, dict):
            raise AssertionError(f"{self.target}: exited {self.proc.returncode} without a report\n{text[-20000:]}")
        if not report.get("ok"):
            raise AssertionError(f"{self.target} failed in its background process:\n{report.get('error')}")
        figures: dict[str, Any] = report["figures"]
        return figures

    def text(self) -> str:
        self.output.seek(0)
        return self.output.read().decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def run(target: str) -> int:
    """The child: run ``module:function`` and print its report as the last line."""
    module, _, name = target.partition(":")
    try:
        report = {"ok": True, "figures": getattr(importlib.import_module(module), name)()}
    except BaseException:  # everything goes back to the waiting test
        report = {"ok": False, "error": traceback.format_exc()}
    sys.stdout.flush()
    print(json.dumps(report, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1]))
