"""Router arithmetic against spec/vectors.json: hold times, metrics, seqnos."""

from __future__ import annotations

from typing import Any

import pytest

from services.router.engine import hold_time_ms
from services.router.metric import metric_add, metric_sub
from services.router.seqno import seqno_add, seqno_gt, seqno_lt
from tests.vectors import params


@pytest.mark.parametrize("vector", params("route_hold_time"))
def test_route_hold_time(vector: dict[str, Any]) -> None:
    f = vector["fields"]
    # The interval travels in centiseconds, truncated (5.4).
    assert f["interval_requested_ms"] // 10 == f["interval_on_wire_cs"]
    assert hold_time_ms(f["interval_on_wire_cs"], f["metric"]) == f["hold_ms"]


@pytest.mark.parametrize("vector", params("metric_add"))
def test_metric_add(vector: dict[str, Any]) -> None:
    f = vector["fields"]
    assert metric_add(f["a"], f["b"]) == f["result"]
    assert metric_add(f["b"], f["a"]) == f["result"]


@pytest.mark.parametrize("vector", params("metric_sub"))
def test_metric_sub(vector: dict[str, Any]) -> None:
    f = vector["fields"]
    assert metric_sub(f["a"], f["b"]) == f["result"]


@pytest.mark.parametrize("vector", params("seqno_compare"))
def test_seqno_compare(vector: dict[str, Any]) -> None:
    f = vector["fields"]
    a, b = f["a"], f["b"]
    assert seqno_lt(a, b) is f["a_lt_b"]
    assert seqno_lt(b, a) is f["b_lt_a"]
    assert seqno_gt(a, b) is f["a_gt_b"]
    assert seqno_gt(b, a) is f["b_gt_a"]
    assert (a == b) is f["equal"]


@pytest.mark.parametrize("vector", params("seqno_arith"))
def test_seqno_arith(vector: dict[str, Any]) -> None:
    f = vector["fields"]
    assert seqno_add(f["seqno"], f["add"]) == f["result"]


def test_hold_time_of_zero_interval_is_zero() -> None:
    # A finite route advertised with interval 0 expires at once (6.4).
    assert hold_time_ms(0, 100) == 0
    assert hold_time_ms(30_000, 0) == 1_050_000
