"""The short fuzzing run CI makes (``make fuzz`` makes the long one): every
target of fuzz/targets.py, coverage-guided from the spec vectors, for
MYCELIUM_FUZZ_SECONDS (default 60) with a per-input time bound and a
memory bound. Any finding fails the suite with the input that caused it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fuzz import targets

ROOT = Path(__file__).resolve().parents[2]


def test_every_seed_runs_clean() -> None:
    seeds = list(targets.seeds())
    assert {s[0] for s in seeds} == set(range(len(targets.TARGETS)))  # every target has seeds
    try:
        for seed in seeds:
            targets.run_one(seed)
    finally:
        targets.reset()


def test_short_fuzzing_run_finds_nothing(tmp_path: Path) -> None:
    seconds = int(os.environ.get("MYCELIUM_FUZZ_SECONDS", "60"))
    corpus = tmp_path / "corpus"
    run = [sys.executable, str(ROOT / "fuzz" / "run.py")]
    subprocess.run([*run, "--seeds", str(corpus)], check=True, capture_output=True, timeout=120, cwd=ROOT)
    out = subprocess.run(
        [
            *run,
            f"-max_total_time={seconds}",
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 240,
        cwd=ROOT,
    )
    tail = "\n".join(line for line in out.stderr.splitlines() if not line.startswith("INFO: Instrumenting"))[-4000:]
    assert out.returncode == 0, f"fuzzing found a problem (input saved under {tmp_path}):\n{tail}"
    executed = [line for line in out.stderr.splitlines() if line.startswith("stat::number_of_executed_units")]
    assert executed and int(executed[0].split()[-1]) > 1000, tail
    print(f"\nFIGURE fuzz-short: {executed[0].split()[-1]} inputs in {seconds} s")
