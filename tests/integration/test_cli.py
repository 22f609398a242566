"""The client subcommands (API.md 4.2) against a running 2-node mesh and
against no node at all: tables by default, the node's JSON with --json,
--api-addr before or after the subcommand, one-line errors and exit 1."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from .nodes import REPO, free_port
from .test_api_nodes import ApiNode, running_mesh

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[list[ApiNode]]:
    with running_mesh(tmp_path_factory.mktemp("cli"), 2, request) as nodes:
        yield nodes


def cli(*args: str, node: ApiNode | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--api-addr", f"127.0.0.1:{node.api_port}"] if node is not None else []
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args, *extra],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )


def test_peers_list(mesh: list[ApiNode]) -> None:
    a, b = mesh
    out = cli("peers", "list", node=a)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = [c.strip() for c in lines[1].strip("|").split("|")]
    assert header == [
        "Protocol",
        "Socket",
        "Type",
        "Connection",
        "Rx total",
        "Tx total",
        "Discovered",
        "Last connection",
    ]
    assert any(f"127.0.0.1:{b.tcp_port}" in line and "static" in line and "alive" in line for line in lines)
    as_json = cli("peers", "list", "--json", node=a)
    assert as_json.returncode == 0
    assert [p["endpoint"] for p in json.loads(as_json.stdout)] == [p["endpoint"] for p in a.api("/api/v1/admin/peers")]
    # --api-addr is also accepted before the subcommand
    before = subprocess.run(
        [sys.executable, "-m", "services.cli", "--api-addr", f"127.0.0.1:{a.api_port}", "peers", "list", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert before.returncode == 0 and json.loads(before.stdout)


def test_peers_add_and_remove(mesh: list[ApiNode]) -> None:
    a, _b = mesh
    eps = ["tcp://127.0.0.1:4", "tcp://[::1]:5"]
    assert cli("peers", "add", *eps, node=a).returncode == 0
    listed = json.loads(cli("peers", "list", "--json", node=a).stdout)
    sockets = {p["endpoint"]["addr"]["socket"] for p in listed}
    assert {"127.0.0.1:4", "[::1]:5"} <= sockets
    again = cli("peers", "add", eps[0], node=a)
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1 and "409" in again.stderr and "already exists" in again.stderr
    bad = cli("peers", "add", "nonsense", node=a)
    assert bad.returncode == 1 and "400" in bad.stderr and bad.stderr.count("\n") == 1
    assert cli("peers", "remove", *eps, node=a).returncode == 0
    gone = cli("peers", "remove", eps[0], node=a)
    assert gone.returncode == 1 and "404" in gone.stderr and "does not exist" in gone.stderr
    assert a.alive_peers() == 1


def test_routes(mesh: list[ApiNode]) -> None:
    a, b = mesh
    out = cli("routes", "selected", node=a)
    assert out.returncode == 0
    assert "Next Hop" in out.stdout and b.subnet in out.stdout
    as_json = json.loads(cli("routes", "selected", "--json", node=a).stdout)
    assert {r["subnet"] for r in as_json} == {b.subnet}
    fallback = cli("routes", "fallback", "--json", node=a)
    assert fallback.returncode == 0 and isinstance(json.loads(fallback.stdout), list)
    assert cli("routes", "fallback", node=a).returncode == 0
    a.lookup("5ff:1:2:3::1")  # nobody has it: starts a query
    queried = cli("routes", "queried", node=a)
    assert queried.returncode == 0 and "5ff:1:2:3::/64" in queried.stdout and "Query expiration" in queried.stdout
    assert "5ff:1:2:3::/64" in {q["subnet"] for q in json.loads(cli("routes", "queried", "--json", node=a).stdout)}
    no_route = cli("routes", "no-route", "--json", node=a)
    assert no_route.returncode == 0 and json.loads(no_route.stdout) == []
    assert cli("routes", "no-route", node=a).returncode == 0


def test_stats(mesh: list[ApiNode]) -> None:
    a, _b = mesh
    out = cli("stats", node=a)
    assert out.returncode == 0 and "Statistics by Source IP:" in out.stdout and "Destination IP" in out.stdout
    packets = json.loads(cli("stats", "packets", "--json", node=a).stdout)
    assert set(packets) == {"bySource", "byDestination"}
    services = cli("stats", "services", node=a)
    assert services.returncode == 0
    assert all(name in services.stdout for name in ("router", "peerd-tcp"))
    assert "router" in json.loads(cli("stats", "services", "--json", node=a).stdout)


def test_inspect_still_works(mesh: list[ApiNode]) -> None:
    a, _b = mesh
    out = cli("inspect", "--json", "-k", str(a.key_file))
    assert out.returncode == 0
    assert json.loads(out.stdout) == {"publicKey": a.info["nodePubkey"], "address": a.address}


@pytest.mark.parametrize(
    "args",
    [
        ("peers", "list"),
        ("peers", "list", "--json"),
        ("peers", "add", "tcp://127.0.0.1:9"),
        ("peers", "remove", "tcp://127.0.0.1:9"),
        ("routes", "selected"),
        ("routes", "fallback", "--json"),
        ("routes", "queried"),
        ("routes", "no-route"),
        ("stats",),
        ("stats", "services"),
    ],
)
def test_no_node(args: tuple[str, ...]) -> None:
    addr = f"127.0.0.1:{free_port()}"
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", *args, "--api-addr", addr],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1, out.stderr
    assert addr in out.stderr and "connection refused" in out.stderr


def test_usage_errors() -> None:
    for args in (("peers",), ("routes", "nowhere"), ("peers", "add")):
        out = subprocess.run(
            [sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=30, cwd=REPO
        )
        assert out.returncode == 2 and out.stderr.startswith("mycelium: error:")
