"""Suite-wide rule: the spec-vector and schema tests never skip.

They are the proof of wire and API compatibility; a skip there (a missing
file, a missing package) would make a green run mean nothing, so it is
reported as a failure instead (tests/data/README.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.background import BackgroundCheck

# test modules whose every test must run (paths relative to tests/)
MUST_RUN = frozenset(
    {
        "unit/test_vectors.py",
        "unit/test_router_vectors.py",
        "unit/test_test_data.py",
        "integration/test_wire_interop.py",
        "integration/test_api_schema.py",
    }
)


def must_run(item: pytest.Item) -> bool:
    path = item.path.as_posix()
    return any(path.endswith("/tests/" + name) for name in MUST_RUN)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and must_run(item) and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"a spec-vector/schema test must not skip (tests/conftest.py): {reason}"


# ---------------------------------------------------------------- background checks (tests/background.py)

BACKGROUND: dict[str, BackgroundCheck] = {}
BACKGROUND_DEADLINE = 1200.0  # seconds a background check may take from its start


def _background_target(item: pytest.Item) -> tuple[str, float] | None:
    marker = item.get_closest_marker("background")
    if marker is None:
        return None
    return str(marker.args[0]), float(marker.kwargs.get("deadline", BACKGROUND_DEADLINE))


@pytest.hookimpl(trylast=True)  # after -k/-m deselection
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Background tests go last: they only collect what ran beside the rest."""
    later = [item for item in items if _background_target(item)]
    for item in later:
        items.remove(item)
    items.extend(later)


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    for item in session.items:
        found = _background_target(item)
        if found:
            BACKGROUND[item.nodeid] = BackgroundCheck(*found)


def pytest_sessionfinish() -> None:
    for check in BACKGROUND.values():
        check.stop()


@pytest.fixture
def background_figures(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The figures of this test's background check, once it has finished."""
    found = _background_target(request.node)
    assert found, "background_figures needs @pytest.mark.background('module:function')"
    check = BACKGROUND.get(request.node.nodeid)
    if check is None:  # not started at collection (e.g. --collect-only then run by hand)
        check = BACKGROUND[request.node.nodeid] = BackgroundCheck(*found)
    return check.result()
