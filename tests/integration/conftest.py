"""Fixtures that start real nodes and always stop them, printing their logs
when a test fails."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .nodes import Node, stop_all


@pytest.fixture
def make_nodes(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Callable[..., list[Node]]]:
    # a short base path: IPC socket paths must stay under 107 bytes
    base = Path(tmp_path_factory.mktemp("n", numbered=True))
    created: list[Node] = []

    def make(count: int) -> list[Node]:
        nodes = [Node(base, f"node{len(created) + i}") for i in range(count)]
        created.extend(nodes)
        return nodes

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    if failed:
        for node in created:
            print(f"\n===== log of {node.name} =====\n{node.log_tail()}")
            print(f"----- non-zero counters of {node.name} -----\n{node.counter_report()}")
    stop_all([node.stop for node in created])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
