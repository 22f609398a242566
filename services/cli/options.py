"""Node options: command-line flags and the TOML config file, merged the
way the reference merges them (API.md 4.3), validated before anything
starts."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import socket
import tomllib
from pathlib import Path
from typing import Any

from common import privnet
from common.dnsnames import DnsNameError, parse_names, parse_overlay_address
from common.endpoint import Endpoint, EndpointError
from common.nodeconfig import STREAM_PROTOCOLS, NodeConfig, valid_tun_name
from common.options import OptionError, parse_socket_addr

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
    "vsock_listen_port": None,
}
BOOLEANS = ("no_tun", "disable_quic", "disable_peer_discovery", "enable_dns", "no_dashboard")
SUPPORTED_PEER_PROTOCOLS = ("tcp", "tls", "vsock", "quic")
# tests only: quic:// peers over a TCP stream in a peerd-quic (services/peerd/links/tcp.py)
DEBUG_STREAM_QUIC_ENV = "MYCELIUM_DEBUG_STREAM_QUIC"


def peerd_families(disable_quic: bool, private: bool = False) -> dict[str, list[str]]:
    """node.json's peerd processes and the protocols each serves: stream
    links in peerd-tcp (tls:// only in a private network); peerd-quic only
    when QUIC is available and on (never in a private network)."""
    stream = [p for p in STREAM_PROTOCOLS if p in SUPPORTED_PEER_PROTOCOLS and (p != "tls" or private)]
    families = {"tcp": stream}
    debug_quic = os.environ.get(DEBUG_STREAM_QUIC_ENV) == "1"
    if ("quic" in SUPPORTED_PEER_PROTOCOLS or debug_quic) and not disable_quic and not private:
        families["quic"] = ["quic"]
    return families


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
    p.add_argument("--vsock-listen-port", type=int, metavar="PORT", help="vsock listen port (Linux; default none)")
    p.add_argument("--peer-discovery-port", type=int, metavar="PORT", help="link-local discovery port (default 9650)")
    p.add_argument("--disable-peer-discovery", action="store_true", help="no link-local multicast discovery")
    p.add_argument(
        "--peer-discovery-interface",
        action="append",
        default=[],
        dest="peer_discovery_interfaces",
        metavar="NAME",
        help="discover peers only on this interface (repeatable; default: every qualifying interface)",
    )
    p.add_argument(
        "--network-name",
        metavar="NAME",
        help="run a private network with this name (2-64 bytes, sent in clear); needs --network-key-file",
    )
    p.add_argument(
        "--network-key-file",
        metavar="PATH",
        help="the private network's secret key: the file's first 32 raw bytes; needs --network-name",
    )
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
    p.add_argument(
        "--enable-dns",
        action="store_true",
        help="DNS resolver on port 53 (UDP and TCP): <key>.mycelium, [names], the rest forwarded over the overlay",
    )
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
    out["peer_discovery_interfaces"] = list(getattr(args, "peer_discovery_interfaces", None) or []) or list(
        file.get("peer_discovery_interfaces", [])
    )
    for key in ("network_name", "network_key_file"):  # the private binary's rule: the CLI, else the file
        cli = getattr(args, key, None)
        out[key] = cli if cli is not None else file.get(key)
    return out


def resolve_private_network(merged: dict[str, Any]) -> tuple[str | None, str | None]:
    """The network name and the key file's absolute path, both or neither;
    the key file is read now so a bad one is an error before anything starts."""
    name, key_file = merged["network_name"], merged["network_key_file"]
    if name is None and key_file is None:
        return None, None
    if name is None:
        raise OptionError("--network-key-file requires --network-name (network_name in the config file)")
    if key_file is None:
        raise OptionError("--network-name requires --network-key-file (network_key_file in the config file)")
    if not isinstance(name, str) or not isinstance(key_file, str):
        raise OptionError("network_name and network_key_file must be strings")
    problem = privnet.psk_support_problem()
    if problem is not None:
        raise OptionError(problem)
    try:
        privnet.check_name(name)
        privnet.load_network_key(key_file)
    except privnet.PrivnetError as exc:
        raise OptionError(str(exc)) from exc
    return name, os.path.abspath(key_file)


def _check_timeout(value: float) -> float:
    if not 1.0 <= value <= 86400.0:
        raise OptionError(f"message timeout must be between 1 and 86400 seconds, got {value}")
    return value


def _check_port(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 0xFFFF:
        raise OptionError(f"{name} must be a port number 1-65535, got {value!r}")
    return value


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


def dns_settings(file: dict[str, Any]) -> dict[str, Any]:
    """The resolver's settings from the config file (our keys: ``dns_resolvers``,
    ``dns_fallback``, ``dns_port`` and the ``[names]`` table), validated."""
    out: dict[str, Any] = {}
    resolvers = file.get("dns_resolvers")
    if resolvers is not None:
        if not isinstance(resolvers, list) or not all(isinstance(r, str) for r in resolvers):
            raise OptionError("dns_resolvers must be an array of overlay IPv6 addresses")
        try:
            out["dns_resolvers"] = [str(parse_overlay_address(text)) for text in resolvers]
        except DnsNameError as exc:
            raise OptionError(f"dns_resolvers: {exc}") from exc
    fallback = file.get("dns_fallback", "1.1.1.1")
    try:
        out["dns_fallback"] = str(ipaddress.ip_address(fallback if isinstance(fallback, str) else ""))
    except ValueError as exc:
        raise OptionError(f"dns_fallback must be an IP address, got {fallback!r}") from exc
    out["dns_port"] = _check_port("dns_port", file.get("dns_port", 53))
    try:
        parse_names(file.get("names", {}))
    except DnsNameError as exc:
        raise OptionError(str(exc)) from exc
    out["dns_names"] = {str(k): str(v) for k, v in file.get("names", {}).items()}
    return out


def ensure_dns_port_free(port: int) -> None:
    """The one-line error the reference does not give (it panics): port 53 taken."""
    for kind, proto in ((socket.SOCK_DGRAM, "UDP"), (socket.SOCK_STREAM, "TCP")):
        with socket.socket(socket.AF_INET6, kind) as s:
            try:
                s.bind(("::", port))
            except OSError as exc:
                why = (
                    "binding it needs root or CAP_NET_BIND_SERVICE"
                    if exc.errno == errno.EACCES
                    else "another DNS server (systemd-resolved, dnsmasq) may be using it"
                )
                text = f"--enable-dns: {proto} port {port} is not available ({exc.strerror}); {why}"
                raise OptionError(text) from exc


def default_run_dir(tcp_port: int) -> str:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return os.path.join(base, f"mycelium-{tcp_port}")
    return os.path.join("/tmp", f"mycelium-{os.getuid()}-{tcp_port}")


def resolve(args: argparse.Namespace, warn: Any, check_ports: bool = True) -> NodeConfig:
    """Everything the node needs, validated; raises OptionError."""
    file = read_config_file(args.config_file)
    merged = merge(args, file)
    if not merged["no_tun"] and not valid_tun_name(str(merged["tun_name"])):
        raise OptionError(f"invalid --tun-name {merged['tun_name']!r} (1-15 characters, no '/', ':' or spaces)")
    tcp_port = _check_port("tcp listen port", merged["tcp_listen_port"])
    quic_port = _check_port("quic listen port", merged["quic_listen_port"])
    network_name, network_key_file = resolve_private_network(merged)
    interfaces = merged["peer_discovery_interfaces"]
    if not isinstance(interfaces, list) or not all(isinstance(i, str) and i for i in interfaces):
        raise OptionError(f"peer discovery interfaces must be interface names, got {interfaces!r}")
    if merged["disable_peer_discovery"] and interfaces:
        warn("--disable-peer-discovery is set, ignoring --peer-discovery-interface values")
    vsock_port = merged["vsock_listen_port"]
    if vsock_port is not None and (
        isinstance(vsock_port, bool) or not isinstance(vsock_port, int) or not 0 <= vsock_port < 1 << 32
    ):
        raise OptionError(f"vsock listen port must be a number 0-4294967295, got {vsock_port!r}")
    # QUIC is off in private mode, as in the reference (TRANSPORTS.md 2.3)
    families = peerd_families(bool(merged["disable_quic"]), private=network_name is not None)
    served = {p for protos in families.values() for p in protos}
    peers: list[str] = []
    for text in merged["peers"]:
        if not isinstance(text, str):
            raise OptionError(f"peer {text!r} is not a string")
        try:
            ep = Endpoint.parse(text)
        except EndpointError as exc:
            raise OptionError(str(exc)) from exc
        if ep.proto == "quic" and merged["disable_quic"]:
            warn(f"skipping peer {ep}: QUIC is disabled")
            continue
        if ep.proto == "quic" and network_name is not None:
            warn(f"skipping peer {ep}: QUIC is off in a private network (as in the reference)")
            continue
        if ep.proto == "tls" and network_name is None:
            warn(f"skipping peer {ep}: tls:// needs a private network (--network-name); use tcp:// instead")
            continue
        if ep.proto not in served:
            warn(f"skipping peer {ep}: the {ep.proto} transport is not available in this build")
            continue
        if ep.proto == "tcp" and network_name is not None:
            warn(f"peer {ep}: a private network is configured, the connection is upgraded to TLS")
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
        if "quic" in families:
            ensure_free(socket.SOCK_DGRAM, "::", quic_port, "QUIC listen port")
        for what, (host, port) in listeners:
            ensure_free(socket.SOCK_STREAM, host, port, what)
    dns = dns_settings(file) if merged["enable_dns"] else {}
    if dns and check_ports:
        ensure_dns_port_free(dns["dns_port"])
    level = "error" if args.silent else "debug" if args.debug else "info"
    run_dir = os.path.abspath(args.run_dir or default_run_dir(tcp_port))
    return NodeConfig(
        run_dir=run_dir,
        key_file=os.path.abspath(args.key_file),
        tcp_listen_port=tcp_port,
        quic_listen_port=quic_port,
        peers=peers,
        no_tun=merged["no_tun"],
        tun_name=str(merged["tun_name"]),
        api_addr=_show_addr(api_host, api_port),
        jsonrpc_addr=_show_addr(rpc_host, rpc_port),
        metrics_api_address=None if metrics is None else _show_addr(*metrics),
        disable_quic="quic" not in families,
        vsock_listen_port=vsock_port,
        peerd_families=families,
        disable_peer_discovery=merged["disable_peer_discovery"],
        peer_discovery_port=_check_port("peer discovery port", merged["peer_discovery_port"]),
        peer_discovery_interfaces=[str(i) for i in interfaces],
        network_name=network_name,
        network_key_file=network_key_file,
        log_level=level,
        topic_config=merged["topic_config"],
        message_timeout=_check_timeout(args.message_timeout),
        dashboard=not merged["no_dashboard"],
        enable_dns=merged["enable_dns"],
        **dns,
        **security_settings(args),
    )
