"""Access to the wire-format vectors (tests/data/vectors.json, a copy of
shared/spec/vectors.json; see tests/data/README.md).

``MYCELIUM_VECTORS`` overrides the location. A missing file is an error,
never a skip: the vector tests are the proof of wire compatibility.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "tests" / "data"
DEFAULT_PATH = DATA_DIR / "vectors.json"


def vectors_path() -> Path:
    return Path(os.environ.get("MYCELIUM_VECTORS", DEFAULT_PATH))


def data_file(name: str) -> Path:
    """A file of tests/data; raises if it is missing (a test must fail, not skip)."""
    path = DATA_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"test data {path} not found (see tests/data/README.md)")
    return path


@cache
def _all() -> list[dict[str, Any]]:
    path = vectors_path()
    if not path.exists():
        raise FileNotFoundError(f"spec vectors not found at {path} (MYCELIUM_VECTORS overrides the path)")
    return list(json.loads(path.read_text())["vectors"])


def vectors(group: str) -> list[dict[str, Any]]:
    """All vectors of one group; fails loudly if the group is empty."""
    found = [v for v in _all() if v["group"] == group]
    assert found, f"no vectors in group {group!r}"
    return found


def params(group: str) -> list[Any]:
    """pytest parameters for a group, with vector names as ids (collected lazily)."""
    return [pytest.param(v, id=v["name"]) for v in _all() if v["group"] == group]
