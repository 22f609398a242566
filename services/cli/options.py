"""Node options: command-line flags and the TOML config file, merged the
way the reference merges them (API.md 4.3), validated before anything
starts."""

from __future__ import annotations

import argparse
import os
import socket
import tomllib
from pathlib import Path
from typing import Any

from common.endpoint import Endpoint, EndpointError
from common.nodeconfig import NodeConfig

DEFAULTS: dict[str, Any] = {
    "tcp_listen_port": 9651,
    "quic_listen_port": 9651,
    "peer_discovery_port": 9650,
    "api_addr": "127.0.0.1:8989",
    "jsonrpc_addr": "127.0.0.1:8990",
    "tun_name": "mycelium",
    "metrics_api_address": None,
    "topic_config": None,
    "firewall_mark": None,
    "update_workers": 1,
}
BOOLEANS = ("no_tun", "disable_quic", "disable_peer_discovery", "enable_dns", "no_dashboard")
SUPPORTED_PEER_PROTOCOLS = ("tcp",)


class OptionError(Exception):
    """An invalid option or config file; the message is user-facing."""


def add_node_options(p: argparse.ArgumentParser) -> None:
    """The reference's top-level flags (API.md 4.1), plus --run-dir."""
    p.add_argument("-c", "--config-file", help="TOML config file (default: $XDG_CONFIG_HOME/mycelium/mycelium.toml)")
    p.add_argument("-d", "--debug", action="store_true", help="debug logging")
    p.add_argument("--silent", action="store_true", help="log errors only")
    p.add_argument("--log-format", choices=("compact", "logfmt", "plain"), help="accepted for compatibility")
    p.add_argument("--peers", nargs="+", default=[], metavar="ENDPOINT", help="static peers, e.g. tcp://192.0.2.6:9651")
    p.add_argument("-t", "-p", "--tcp-listen-port", type=int, metavar="PORT", help="TCP listen port (default 9651)")
    p.add_argument("--disable-quic", action="store_true", help="do not use QUIC")
    p.add_argument("-q", "--quic-listen-port", type=int, metavar="PORT", help="QUIC listen port (default 9651)")
    p.add_argument("--peer-discovery-port", type=int, metavar="PORT", help="link-local discovery port (default 9650)")
    p.add_argument("--disable-peer-discovery", action="store_true", help="no link-local multicast discovery")
    p.add_argument("--peer-discovery-interface", action="append", default=[], metavar="NAME")
    p.add_argument("--api-addr", metavar="ADDR:PORT", help="HTTP API address (default 127.0.0.1:8989)")
    p.add_argument("--jsonrpc-addr", metavar="ADDR:PORT", help="JSON-RPC address (default 127.0.0.1:8990)")
    p.add_argument("--no-tun", action="store_true", help="run without a TUN device (unprivileged; messages only)")
    p.add_argument("--tun-name", metavar="NAME", help="TUN interface name (default mycelium)")
    p.add_argument("--metrics-api-address", metavar="ADDR:PORT", help="Prometheus /metrics address")
    p.add_argument("--no-dashboard", action="store_true", help="do not serve the ops dashboard at /dashboard")
    p.add_argument("--firewall-mark", type=int, metavar="MARK")
    p.add_argument("--update-workers", type=int, metavar="N")
    p.add_argument("--topic-config", metavar="PATH", help="topic ACL TOML")
    p.add_argument(
        "--message-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="abort a message not acknowledged within this time (default 300, as the reference)",
    )
    p.add_argument("--enable-dns", action="store_true")
    p.add_argument("--run-dir", metavar="DIR", help="directory for this node's sockets, supervisord config and logs")
    add_security_options(p)


def add_security_options(p: argparse.ArgumentParser) -> None:
    """Our extensions (docs/EXTENSIONS.md); none changes what a reference node sees."""
    p.add_argument("--no-session-keys", action="store_true", help="static keys only, as the reference")
    p.add_argument("--session-rekey-seconds", type=float, default=120.0, metavar="S", help="session key lifetime")
    p.add_argument("--session-rekey-packets", type=int, default=1 << 30, metavar="N", help="packets per session key")
    p.add_argument("--firewall", metavar="PATH", help="inbound TUN firewall rules (TOML; reload: SIGHUP or the API)")


def security_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The NodeConfig fields of add_security_options, checked."""
    if not 1.0 <= args.session_rekey_seconds <= 86400.0:
        raise OptionError(f"--session-rekey-seconds must be 1-86400, got {args.session_rekey_seconds}")
    if not 1000 <= args.session_rekey_packets <= 1 << 48:
        raise OptionError(f"--session-rekey-packets must be 1000-2^48, got {args.session_rekey_packets}")
    path = None
    if args.firewall is not None:
        from common.firewall import FirewallError, load_rules  # validated before anything starts

        path = os.path.abspath(args.firewall)
        try:
            load_rules(Path(path).read_text())
        except OSError as exc:
            raise OptionError(f"cannot read firewall rules {path}: {exc.strerror}") from exc
        except FirewallError as exc:
            raise OptionError(f"firewall rules {path}: {exc}") from exc
    return {
        "session_keys": not args.no_session_keys,
        "session_rekey_seconds": args.session_rekey_seconds,
        "session_rekey_packets": args.session_rekey_packets,
        "firewall_file": path,
    }


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "mycelium" / "mycelium.toml"


def read_config_file(path: str | None) -> dict[str, Any]:
    if path is None:
        default = default_config_path()
        if not default.exists():
            return {}
        file = default
    else:
        file = Path(path)
        if not file.exists():
            raise OptionError(f"config file {file} does not exist")
    try:
        with open(file, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise OptionError(f"cannot read config file {file}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise OptionError(f"config file {file} is not valid TOML: {exc}") from exc
    if isinstance(data.get("peers"), str):
        data["peers"] = [data["peers"]]
    return data


def merge(args: argparse.Namespace, file: dict[str, Any]) -> dict[str, Any]:
    """CLI wins only where it differs from the default; booleans are OR-ed;
    lists come from the CLI when non-empty (the reference's rule)."""
    out: dict[str, Any] = {}
    for key, default in DEFAULTS.items():
        cli = getattr(args, key, None)
        if cli is not None and cli != default:
            out[key] = cli
        else:
            out[key] = file.get(key, default)
    for key in BOOLEANS:
        out[key] = bool(getattr(args, key, False)) or bool(file.get(key, False))
    out["peers"] = list(args.peers) or list(file.get("peers", []))
    return out


def _check_timeout(value: float) -> float:
    if not 1.0 <= value <= 86400.0:
        raise OptionError(f"message timeout must be between 1 and 86400 seconds, got {value}")
    return value


def _check_port(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 0xFFFF:
        raise OptionError(f"{name} must be a port number 1-65535, got {value!r}")
    return value


def parse_socket_addr(name: str, text: Any) -> tuple[str, int]:
    if not isinstance(text, str):
        raise OptionError(f"{name} must be ADDR:PORT, got {text!r}")
    try:
        ep = Endpoint.parse(f"tcp://{text}")
    except EndpointError as exc:
        raise OptionError(f"{name} {text!r} is not a valid ADDR:PORT") from exc
    return str(ep.ip), ep.port


def _show_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def ensure_free(kind: int, host: str, port: int, what: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise OptionError(f"{what} {shown} is not available: {exc.strerror}") from exc


def default_run_dir(tcp_port: int) -> str:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return os.path.join(base, f"mycelium-{tcp_port}")
    return os.path.join("/tmp", f"mycelium-{os.getuid()}-{tcp_port}")


def resolve(args: argparse.Namespace, warn: Any, check_ports: bool = True) -> NodeConfig:
    """Everything the node needs, validated; raises OptionError."""
    merged = merge(args, read_config_file(args.config_file))
    tcp_port = _check_port("tcp listen port", merged["tcp_listen_port"])
    _check_port("quic listen port", merged["quic_listen_port"])
    peers: list[str] = []
    for text in merged["peers"]:
        if not isinstance(text, str):
            raise OptionError(f"peer {text!r} is not a string")
        try:
            ep = Endpoint.parse(text)
        except EndpointError as exc:
            raise OptionError(str(exc)) from exc
        if ep.proto not in SUPPORTED_PEER_PROTOCOLS:
            warn(f"skipping peer {ep}: the {ep.proto} transport is not available in this build")
            continue
        if str(ep) not in peers:
            peers.append(str(ep))
    api_host, api_port = parse_socket_addr("api address", merged["api_addr"])
    rpc_host, rpc_port = parse_socket_addr("json-rpc address", merged["jsonrpc_addr"])
    metrics: tuple[str, int] | None = None
    if merged["metrics_api_address"] is not None:
        metrics = parse_socket_addr("metrics address", merged["metrics_api_address"])
    listeners = [("API address", (api_host, api_port)), ("JSON-RPC address", (rpc_host, rpc_port))]
    if metrics is not None:
        listeners.append(("metrics address", metrics))
    for i, (what, addr) in enumerate(listeners):
        for other, other_addr in listeners[:i]:
            if addr == other_addr:
                raise OptionError(f"{what} and {other} are both {_show_addr(*addr)}; they need different ports")
    if check_ports:
        ensure_free(socket.SOCK_STREAM, "::", tcp_port, "TCP listen port")
        for what, (host, port) in listeners:
            ensure_free(socket.SOCK_STREAM, host, port, what)
    level = "error" if args.silent else "debug" if args.debug else "info"
    run_dir = os.path.abspath(args.run_dir or default_run_dir(tcp_port))
    return NodeConfig(
        run_dir=run_dir,
        key_file=os.path.abspath(args.key_file),
        tcp_listen_port=tcp_port,
        quic_listen_port=merged["quic_listen_port"],
        peers=peers,
        no_tun=merged["no_tun"],
        tun_name=str(merged["tun_name"]),
        api_addr=_show_addr(api_host, api_port),
        jsonrpc_addr=_show_addr(rpc_host, rpc_port),
        metrics_api_address=None if metrics is None else _show_addr(*metrics),
        disable_quic=True,  # no QUIC transport in this build yet
        disable_peer_discovery=merged["disable_peer_discovery"],
        peer_discovery_port=_check_port("peer discovery port", merged["peer_discovery_port"]),
        log_level=level,
        topic_config=merged["topic_config"],
        message_timeout=_check_timeout(args.message_timeout),
        dashboard=not merged["no_dashboard"],
        **security_settings(args),
    )
