"""Suite-wide rule: the spec-vector and schema tests never skip.

They are the proof of wire and API compatibility; a skip there (a missing
file, a missing package) would make a green run mean nothing, so it is
reported as a failure instead (tests/data/README.md).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
