"""Client subcommands: talk to a running node's HTTP API (API.md 4.2).

``mycelium peers list|add|remove``, ``mycelium routes
selected|fallback|queried|no-route`` and ``mycelium stats [packets|services]``,
each with ``--json`` (where it lists something) and ``--api-addr`` (the
node to ask; default 127.0.0.1:8989). Errors are one line on stderr and
exit status 1: a node that is not running, an HTTP error status.

Adding a command group (the ``message`` subcommands, say): write
``add_<group>_commands(sub, parent)`` that creates its parsers with
``parents=[parent]`` and ``set_defaults(client_handler=fn)``, where
``fn(client, args) -> int`` uses ``Client`` below; then call it from
``add_commands``. ``main.py`` runs any parsed command that has a
``client_handler``.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any

DEFAULT_API_ADDR = "127.0.0.1:8989"
TIMEOUT = 10.0


class ClientError(Exception):
    """A failed request; the message is one user-facing line."""


class Client:
    def __init__(self, api_addr: str, timeout: float = TIMEOUT) -> None:
        self.api_addr = api_addr
        self.base = f"http://{api_addr}"
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, what: str = "") -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        label = f"{method} {urllib.parse.unquote(path)}" + (f" ({what})" if what else "")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            raise ClientError(f"{label}: {exc.code} {_phrase(exc.code)}{_error_text(exc.read())}") from exc
        except urllib.error.URLError as exc:
            raise ClientError(self._unreachable(exc.reason)) from exc
        except TimeoutError as exc:
            raise ClientError(self._unreachable(exc)) from exc
        except (ConnectionError, OSError, ValueError) as exc:  # reset mid-answer, bad address text
            raise ClientError(self._unreachable(exc)) from exc

    def _unreachable(self, reason: object) -> str:
        if isinstance(reason, ConnectionRefusedError):
            text = "connection refused"
        elif isinstance(reason, TimeoutError):
            text = f"no answer within {self.timeout:.0f} s"
        else:
            text = str(getattr(reason, "strerror", None) or reason)
        return f"cannot reach the node's API at {self.api_addr}: {text} (is the node running? pick it with --api-addr)"

    def get_json(self, path: str) -> tuple[Any, bytes]:
        _status, raw = self.request("GET", path)
        try:
            return json.loads(raw), raw
        except ValueError as exc:
            raise ClientError(f"GET {path}: the node answered something that is not JSON") from exc


def _phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "error"


def _error_text(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    try:
        doc = json.loads(text)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            text = doc["error"]
    except ValueError:
        pass
    text = " ".join(text.split())
    return f": {text[:300]}" if text else ""


# --- output ------------------------------------------------------------------


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A bordered table like the reference's prettytable output."""
    cells = [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def fmt(row: Sequence[str], header_row: bool = False) -> str:
        parts = []
        for i, (c, w) in enumerate(zip(row, widths, strict=True)):
            parts.append(c.rjust(w) if i in right and not header_row else c.ljust(w))
        return "| " + " | ".join(parts) + " |"

    out = [line, fmt(header, True), line, *(fmt(r) for r in cells)]
    if cells:
        out.append(line)
    return "\n".join(out)


def format_bytes(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"


def format_seconds(total: Any) -> str:
    if not isinstance(total, int | float):
        return "-"
    total = int(total)
    seconds, minutes, hours, days = total % 60, total // 60 % 60, total // 3600 % 24, total // 86400
    if days:
        return f"{days}d {hours}h {minutes}m {seconds}s"
    if hours:
        return f"{hours}h {minutes}m {seconds}s"
    if minutes:
        return f"{minutes}m {seconds}s"
    return f"{seconds}s"


def _print_raw(raw: bytes) -> None:
    sys.stdout.write(raw.decode("utf-8", "replace").rstrip("\n") + "\n")


# --- peers -------------------------------------------------------------------


def _socket_of(endpoint: Any) -> str:
    addr = endpoint.get("addr") if isinstance(endpoint, dict) else None
    if not isinstance(addr, dict):
        return "-"
    if "socket" in addr:
        return str(addr["socket"])
    vsock = addr.get("vsock")
    if isinstance(vsock, dict):
        return f"{vsock.get('cid')}:{vsock.get('port')}"
    return "-"


def peers_list(client: Client, args: argparse.Namespace) -> int:
    peers, _raw = client.get_json("/api/v1/admin/peers")
    if args.json:
        print(json.dumps(peers, indent=2))
        return 0
    rows = []
    for p in peers if isinstance(peers, list) else []:
        ep = p.get("endpoint") or {}
        last = p.get("lastConnected")
        rows.append(
            [
                ep.get("proto", "-"),
                _socket_of(ep),
                p.get("type"),
                p.get("connectionState"),
                format_bytes(p.get("rxBytes")),
                format_bytes(p.get("txBytes")),
                format_seconds(p.get("discovered")),
                "Never connected" if last is None else format_seconds(last),
            ]
        )
    header = ["Protocol", "Socket", "Type", "Connection", "Rx total", "Tx total", "Discovered", "Last connection"]
    print(table(header, rows, right=(4, 5)))
    return 0


def peers_add(client: Client, args: argparse.Namespace) -> int:
    for endpoint in args.endpoints:
        client.request("POST", "/api/v1/admin/peers", {"endpoint": endpoint}, what=endpoint)
    return 0


def peers_remove(client: Client, args: argparse.Namespace) -> int:
    for endpoint in args.endpoints:
        path = "/api/v1/admin/peers/" + urllib.parse.quote(endpoint, safe="")
        client.request("DELETE", path, what=endpoint)
    return 0


# --- routes ------------------------------------------------------------------


def _routes(path: str) -> Callable[[Client, argparse.Namespace], int]:
    def run(client: Client, args: argparse.Namespace) -> int:
        routes, raw = client.get_json(path)
        if args.json:
            _print_raw(raw)
            return 0
        rows = [[r.get("subnet"), r.get("nextHop"), r.get("metric"), r.get("seqno")] for r in routes or []]
        print(table(["Subnet", "Next Hop", "Metric", "Seq No"], rows, right=(2, 3)))
        return 0

    return run


def routes_queried(client: Client, args: argparse.Namespace) -> int:
    queries, raw = client.get_json("/api/v1/admin/routes/queried")
    if args.json:
        _print_raw(raw)
        return 0
    rows = [[q.get("subnet"), q.get("expiration")] for q in queries or []]
    print(table(["Subnet", "Query expiration"], rows, right=(1,)))
    return 0


def routes_no_route(client: Client, args: argparse.Namespace) -> int:
    """The reference dropped its no-route listing in 0.7.4 (API.md 6.12);
    there is nothing to list, but the node must still be there."""
    client.get_json("/api/v1/admin")
    if args.json:
        print("[]")
        return 0
    print(table(["Subnet", "Entry expiration"], []))
    print("(this node keeps no no-route entries: Mycelium removed them in 0.7.4)", file=sys.stderr)
    return 0


# --- stats -------------------------------------------------------------------


def stats(client: Client, args: argparse.Namespace) -> int:
    if args.what == "services":
        return stats_services(client, args)
    data, raw = client.get_json("/api/v1/admin/stats/packets")
    if args.json:
        _print_raw(raw)
        return 0
    for title, key, column in (
        ("Statistics by Source IP:", "bySource", "Source IP"),
        ("\nStatistics by Destination IP:", "byDestination", "Destination IP"),
    ):
        print(title)
        rows = [[e.get("ip"), e.get("packetCount"), e.get("byteCount")] for e in (data or {}).get(key) or []]
        print(table([column, "Packets", "Bytes"], rows, right=(1, 2)))
    return 0


def stats_services(client: Client, args: argparse.Namespace) -> int:
    """Our extension: each service's pid, uptime and counters."""
    data, raw = client.get_json("/api/v1/admin/services")
    if args.json:
        _print_raw(raw)
        return 0
    rows = []
    for name, fields in sorted((data or {}).items()):
        counters = fields.get("counters") or {}
        started = fields.get("started")
        received = fields.get("received")
        uptime = received - started if isinstance(started, int | float) and isinstance(received, int | float) else None
        busiest = sorted(counters.items(), key=lambda kv: -kv[1] if isinstance(kv[1], int | float) else 0)[:3]
        rows.append([name, fields.get("pid"), format_seconds(uptime), ", ".join(f"{k}={v}" for k, v in busiest) or "-"])
    print(table(["Service", "PID", "Uptime", "Top counters"], rows, right=(1, 2)))
    return 0


# --- registration ------------------------------------------------------------


def client_parent() -> argparse.ArgumentParser:
    """Options every client subcommand takes (after the subcommand too)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--api-addr",
        default=argparse.SUPPRESS,
        metavar="ADDR:PORT",
        help=f"HTTP API of the node to talk to (default {DEFAULT_API_ADDR})",
    )
    return parent


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the node's JSON instead of a table")


def add_commands(sub: Any, parser_class: type[argparse.ArgumentParser] | None = None) -> None:
    """Register ``peers``, ``routes`` and ``stats`` on a subparsers object."""
    parent = client_parent()
    kw: dict[str, Any] = {"parser_class": parser_class} if parser_class is not None else {}

    p_peers = sub.add_parser("peers", help="list, add or remove the node's peers", parents=[parent])
    peers_sub = p_peers.add_subparsers(dest="peers_command", required=True, metavar="{list,add,remove}", **kw)
    p = peers_sub.add_parser("list", help="list known peers", parents=[parent])
    _json_flag(p)
    p.set_defaults(client_handler=peers_list)
    p = peers_sub.add_parser("add", help="add peers by endpoint, e.g. tcp://192.0.2.6:9651", parents=[parent])
    p.add_argument("endpoints", nargs="+", metavar="ENDPOINT")
    p.set_defaults(client_handler=peers_add)
    p = peers_sub.add_parser("remove", help="remove peers by endpoint", parents=[parent])
    p.add_argument("endpoints", nargs="+", metavar="ENDPOINT")
    p.set_defaults(client_handler=peers_remove)

    p_routes = sub.add_parser("routes", help="list the node's routes", parents=[parent])
    routes_sub = p_routes.add_subparsers(
        dest="routes_command", required=True, metavar="{selected,fallback,queried,no-route}", **kw
    )
    for name, handler, text in (
        ("selected", _routes("/api/v1/admin/routes/selected"), "selected routes"),
        ("fallback", _routes("/api/v1/admin/routes/fallback"), "fallback (not selected) routes"),
        ("queried", routes_queried, "subnets being queried"),
        ("no-route", routes_no_route, "no-route entries (none since Mycelium 0.7.4)"),
    ):
        p = routes_sub.add_parser(name, help=text, parents=[parent])
        _json_flag(p)
        p.set_defaults(client_handler=handler)

    p_stats = sub.add_parser("stats", help="packet statistics, or the node's services", parents=[parent])
    p_stats.add_argument("what", nargs="?", choices=("packets", "services"), default="packets")
    _json_flag(p_stats)
    p_stats.set_defaults(client_handler=stats)


def run(args: argparse.Namespace) -> int:
    """Run a parsed client command; ClientError propagates to the caller."""
    client = Client(getattr(args, "api_addr", None) or DEFAULT_API_ADDR)
    handler: Callable[[Client, argparse.Namespace], int] = args.client_handler
    return handler(client, args)
