"""Coverage-guided fuzzing of fuzz/targets.py with atheris (libFuzzer).

    .venv/bin/python fuzz/run.py [libFuzzer flags] [corpus dirs]

``make fuzz`` writes the seeds (tests/data/vectors.json) into a corpus
directory and runs 10^6 inputs with a per-input time bound (-timeout) and
a memory bound (-rss_limit_mb); see docs/TESTING.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports(include=["common", "services", "fuzz"]):
    from fuzz import targets

    targets.api()  # imports apid's extensions (messages) inside the instrumented block


def write_seeds(corpus: Path) -> int:
    corpus.mkdir(parents=True, exist_ok=True)
    n = 0
    for n, seed in enumerate(targets.seeds(), 1):
        (corpus / f"seed-{n:04d}").write_bytes(seed)
    return n


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] == "--seeds":
        print(write_seeds(Path(args[1])), "seeds written to", args[1])
        return
    atheris.Setup([sys.argv[0], *args], targets.run_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
