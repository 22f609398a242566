"""Access to the shared wire-format vectors (../shared/spec/vectors.json).

The file lives beside the project, not inside it, so that the tests always
read the spec's own copy. ``MYCELIUM_VECTORS`` overrides the location. When
the file is missing the vector tests skip with the path they looked at;
under CI (``CI=true``) a missing file is an error instead.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PATH = REPO_ROOT.parent / "shared" / "spec" / "vectors.json"


def vectors_path() -> Path:
    return Path(os.environ.get("MYCELIUM_VECTORS", DEFAULT_PATH))


@cache
def _all() -> list[dict[str, Any]]:
    path = vectors_path()
    if not path.exists():
        if os.environ.get("CI") == "true":
            raise FileNotFoundError(f"spec vectors not found at {path}")
        pytest.skip(f"spec vectors not found at {path} (set MYCELIUM_VECTORS)")
    return list(json.loads(path.read_text())["vectors"])


def vectors(group: str) -> list[dict[str, Any]]:
    """All vectors of one group; fails loudly if the group is empty."""
    found = [v for v in _all() if v["group"] == group]
    assert found, f"no vectors in group {group!r}"
    return found


def params(group: str) -> list[Any]:
    """pytest parameters for a group, with vector names as ids (collected lazily)."""
    path = vectors_path()
    if not path.exists():
        if os.environ.get("CI") == "true":
            raise FileNotFoundError(f"spec vectors not found at {path}")
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"spec vectors not found at {path}"))]
    data = json.loads(path.read_text())["vectors"]
    return [pytest.param(v, id=v["name"]) for v in data if v["group"] == group]
