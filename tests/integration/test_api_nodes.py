"""Helpers for the API, CLI and dashboard tests (no tests here): nodes with
known JSON-RPC and metrics ports, a module-scoped mesh that is always
stopped, and small clients for the three servers."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from .nodes import Node, free_port, learn_all_routes, wait_for


class ApiNode(Node):
    """A node whose JSON-RPC and metrics servers are on known ports."""

    def __init__(self, base: Path, name: str, extra: list[str] | None = None) -> None:
        super().__init__(base, name)
        self.rpc_port = free_port()
        self.metrics_port = free_port()
        self.extra = list(extra or [])

    def args(self) -> list[str]:
        args = super().args()
        args[args.index("--jsonrpc-addr") + 1] = f"127.0.0.1:{self.rpc_port}"
        return [*args, "--metrics-api-address", f"127.0.0.1:{self.metrics_port}", *self.extra]

    def raw(
        self, path: str, method: str = "GET", data: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """Any request to the HTTP API: (status, headers, body), never raising for a status."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.api_port}{path}", data=data, method=method)
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def rpc_raw(self, body: bytes, path: str = "/rpc", content_type: str = "application/json") -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.rpc_port}{path}", data=body, method="POST")
        req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def rpc(self, method: str, params: Any = None, rid: Any = 1) -> dict[str, Any]:
        """One JSON-RPC call; the whole response object."""
        req: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            req["params"] = params
        status, body = self.rpc_raw(json.dumps(req).encode())
        assert status == 200, (status, body)
        return dict(json.loads(body))

    def result(self, method: str, params: Any = None) -> Any:
        answer = self.rpc(method, params)
        assert "error" not in answer, answer
        return answer["result"]

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as resp:
            return resp.read().decode()


@contextmanager
def running_mesh(
    base: Path, count: int, request: pytest.FixtureRequest, extra: list[str] | None = None
) -> Iterator[list[ApiNode]]:
    """``count`` nodes in a ring (a line for two), started and converged;
    always stopped, with their logs printed if a test of the module failed."""
    nodes = [ApiNode(base, f"node{i}", extra) for i in range(count)]
    failed_before = request.session.testsfailed
    try:
        for i, node in enumerate(nodes):
            if count > 2 or i == 0:
                node.peers = [nodes[(i + 1) % count].endpoint]
            node.start()
        for node in nodes:
            node.wait_ready()
        wait_for("links up", lambda: all(n.alive_peers() == min(2, count - 1) for n in nodes), 30)
        learn_all_routes(nodes, 30)
        yield nodes
    finally:
        if request.session.testsfailed != failed_before:
            for node in nodes:
                print(f"\n===== log of {node.name} =====\n{node.log_tail(80)}")
        for node in nodes:
            node.stop()
