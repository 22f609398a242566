"""`mycelium proxy list|connect|disconnect|probe start|stop` (API.md 4.2),
clients of a running node's proxy API (TRANSPORTS.md 3.1)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from common.endpoint import EndpointError, parse_socket_address

from .client import Client, ClientError, _json_flag, table

PROXY = "/api/v1/admin/proxy"
CONNECT_TIMEOUT = 20.0  # the node may race the known proxies for a few seconds first


def proxy_list(client: Client, args: argparse.Namespace) -> int:
    proxies, raw = client.get_json(PROXY)
    if args.json:
        print(raw.decode("utf-8", "replace").strip())
        return 0
    print(table(["IPv6 Address"], [[p] for p in proxies if isinstance(p, str)] if isinstance(proxies, list) else []))
    return 0


def proxy_connect(client: Client, args: argparse.Namespace) -> int:
    if args.remote is not None:
        try:
            parse_socket_address(args.remote)
        except EndpointError as exc:
            raise ClientError(f"--remote: {exc}") from exc
    slow = Client(client.api_addr, timeout=max(client.timeout, CONNECT_TIMEOUT))
    try:
        _status, raw = slow.request("POST", PROXY, {"remote": args.remote})
    except ClientError as exc:
        if ": 404 " in f"{exc} ":
            raise ClientError("no valid proxy available or connection failed") from exc
        raise
    if args.json:
        print(raw.decode("utf-8", "replace").strip())
        return 0
    try:
        print(json.loads(raw))
    except ValueError as exc:
        raise ClientError("POST /api/v1/admin/proxy: the node answered something that is not JSON") from exc
    return 0


def proxy_disconnect(client: Client, _args: argparse.Namespace) -> int:
    client.request("DELETE", PROXY)
    return 0


def probe(client: Client, args: argparse.Namespace) -> int:
    client.request("GET" if args.probe_command == "start" else "DELETE", PROXY + "/probe")
    return 0


def add_proxy_commands(sub: Any, parent: argparse.ArgumentParser, kw: dict[str, Any]) -> None:
    p_proxy = sub.add_parser("proxy", help="find and use SOCKS5 proxies on other nodes", parents=[parent])
    proxy_sub = p_proxy.add_subparsers(
        dest="proxy_command", required=True, metavar="{list,connect,disconnect,probe}", **kw
    )
    p = proxy_sub.add_parser("list", help="list the valid (no-auth) proxies found by probing", parents=[parent])
    _json_flag(p)
    p.set_defaults(client_handler=proxy_list)
    p = proxy_sub.add_parser("connect", help="relay local port 1080 to a proxy", parents=[parent])
    p.add_argument("--remote", metavar="[IP]:PORT", help="this proxy (default: the first valid one to answer)")
    _json_flag(p)
    p.set_defaults(client_handler=proxy_connect)
    p = proxy_sub.add_parser("disconnect", help="stop relaying", parents=[parent])
    p.set_defaults(client_handler=proxy_disconnect)
    p = proxy_sub.add_parser("probe", help="start or stop probing the nodes for proxies", parents=[parent])
    p.add_argument("probe_command", choices=("start", "stop"))
    p.set_defaults(client_handler=probe)
