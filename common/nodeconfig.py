"""The resolved settings of one node, written by the launcher as
``<run_dir>/node.json`` and read by every service at start-up.

Services take only ``--run-dir``: one file holds the truth, so a service
restarted by supervisord sees exactly what its siblings see.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

NODE_FILE = "node.json"
# peerd processes ("families") and the endpoint protocols each serves: stream
# links in peerd-tcp, QUIC in its own peerd-quic (added by the launcher when
# QUIC is on); each restarts alone
STREAM_PROTOCOLS = ["tcp", "tls", "vsock"]


def default_families() -> dict[str, list[str]]:
    return {"tcp": list(STREAM_PROTOCOLS)}


@dataclass
class NodeConfig:
    run_dir: str
    key_file: str
    tcp_listen_port: int = 9651
    quic_listen_port: int = 9651
    peers: list[str] = field(default_factory=list)
    no_tun: bool = False
    tun_name: str = "mycelium"
    api_addr: str = "127.0.0.1:8989"
    jsonrpc_addr: str = "127.0.0.1:8990"
    metrics_api_address: str | None = None
    disable_quic: bool = False
    vsock_listen_port: int | None = None  # the reference's --vsock-listen-port (no listener without it)
    peerd_families: dict[str, list[str]] = field(default_factory=default_families)
    disable_peer_discovery: bool = False
    peer_discovery_port: int = 9650
    peer_discovery_interfaces: list[str] = field(default_factory=list)  # empty: every qualifying interface
    network_name: str | None = None  # private network (TRANSPORTS.md 2): TLS-PSK links with this identity ...
    network_key_file: str | None = None  # ... and the first 32 bytes of this file (a copy in the run directory)
    log_level: str = "info"
    topic_config: str | None = None
    start_time: int = 0
    message_timeout: float = 300.0  # abort unacknowledged messages after this long (the reference's 300 s)
    dashboard: bool = True  # the ops dashboard at /dashboard on the API address
    # security extensions (docs/EXTENSIONS.md)
    session_keys: bool = True  # negotiate forward-secret session keys with our own kind of node
    session_rekey_seconds: float = 120.0
    session_rekey_packets: int = 1 << 30
    firewall_file: str | None = None  # inbound TUN firewall rules (TOML); reloaded on SIGHUP / API
    enable_dns: bool = False  # dnsd: the resolver on port 53 (TRANSPORTS.md 3.4)
    dns_resolvers: list[str] | None = None  # overlay resolver nodes; None = the reference's ten public nodes
    dns_fallback: str = "1.1.1.1"  # resolver used while none of dns_resolvers has a selected route
    dns_names: dict[str, str] = field(default_factory=dict)  # [names]: short name -> 64-hex key or IPv6
    dns_port: int = 53

    def family_of_proto(self, proto: str) -> str | None:
        """The peerd family that serves endpoints of ``proto``, or None."""
        for family, protos in self.peerd_families.items():
            if proto in protos:
                return family
        return None

    def save(self) -> Path:
        path = Path(self.run_dir) / NODE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)
        return path

    @classmethod
    def load_or_exit(cls, run_dir: str | os.PathLike[str]) -> NodeConfig:
        """For a service's start: a missing or broken node.json is one line on
        stderr and exit status 1 (supervisord retries), never a traceback."""
        try:
            return cls.load(run_dir)
        except (OSError, ValueError, TypeError) as exc:
            sys.exit(f"cannot read {Path(run_dir) / NODE_FILE}: {exc}")

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> NodeConfig:
        data = json.loads((Path(run_dir) / NODE_FILE).read_text())
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


TUN_NAME_MAX = 15  # IFNAMSIZ - 1


def valid_tun_name(name: str) -> bool:
    """A name Linux accepts for an interface."""
    return 0 < len(name.encode()) <= TUN_NAME_MAX and not any(c in name for c in "/: \t\n") and name not in (".", "..")
