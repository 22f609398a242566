"""The files the spec-vector and schema tests read are inside the project
(tests/data) and match the shared spec folder when it sits beside us."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from tests.conftest import MUST_RUN
from tests.vectors import DATA_DIR, REPO_ROOT, data_file, params, vectors_path

# where each copy comes from in the shared spec folder (tests/data/README.md)
SOURCES = {
    "vectors.json": "spec/vectors.json",
    "api.yaml": "spec/reference/api.yaml",
    "openrpc.json": "spec/reference/openrpc.json",
}
SHARED = REPO_ROOT.parent / "shared"


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_data_file_is_in_the_project(name: str) -> None:
    path = data_file(name)
    assert path.parent == DATA_DIR and path.stat().st_size > 0
    assert name in (DATA_DIR / "README.md").read_text()


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_copy_matches_the_shared_spec(name: str) -> None:
    """Only checkable beside the shared folder; in a bare clone the copy is all there is."""
    shared = SHARED / SOURCES[name]
    if shared.exists():
        assert data_file(name).read_bytes() == shared.read_bytes(), f"refresh tests/data/{name} from {shared}"


def test_missing_data_fails_instead_of_skipping() -> None:
    with pytest.raises(FileNotFoundError):
        data_file("no-such-file.json")


def test_vectors_load_without_skip_markers() -> None:
    groups = {v["group"] for v in json.loads(vectors_path().read_text())["vectors"]}
    assert len(groups) > 10
    for group in groups:
        for param in params(group):
            assert not param.marks, f"{group}: vector parameters carry marks {param.marks}"


def test_schema_tests_can_import_their_tools() -> None:
    for name in ("schemathesis", "hypothesis"):
        importlib.import_module(name)


def test_must_run_modules_exist() -> None:
    """The list of never-skip modules in tests/conftest.py names real files."""
    tests = Path(__file__).resolve().parents[1]
    for name in MUST_RUN:
        assert (tests / name).exists(), name
