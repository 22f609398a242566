"""Which peerd processes a node runs (node.json ``peerd_families``), the
vsock option, and the per-family peer files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.endpoint import Endpoint
from common.nodeconfig import NodeConfig
from services.cli import launcher, options
from services.cli.main import build_parser
from services.peerd.peer_api import PeerApi, peers_file
from services.peerd.peer_table import PeerTable


def resolve(tmp_path: Path, *extra: str) -> NodeConfig:
    args = build_parser().parse_args(["--no-tun", "--run-dir", str(tmp_path / "r"), "-k", str(tmp_path / "k"), *extra])
    return options.resolve(args, lambda _w: None, check_ports=False)


def test_default_node_runs_peerd_tcp_and_peerd_quic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(options.DEBUG_STREAM_QUIC_ENV, raising=False)
    peers = ("tcp://192.0.2.1:9651", "vsock://3:9651", "quic://192.0.2.1:9651")
    cfg = resolve(tmp_path, "--peers", *peers)
    assert cfg.peerd_families == {"tcp": ["tcp", "vsock"], "quic": ["quic"]} and not cfg.disable_quic
    assert cfg.peers == list(peers)
    names = [name for name, _m, _p in launcher.programs(cfg)]
    assert names.count("peerd-tcp") == 1 and names.count("peerd-quic") == 1
    # --disable-quic: stream links only, quic:// peers skipped
    cfg = resolve(tmp_path, "--disable-quic", "--peers", *peers)
    assert list(cfg.peerd_families) == ["tcp"] and "vsock" in cfg.peerd_families["tcp"] and cfg.disable_quic
    assert cfg.peers == ["tcp://192.0.2.1:9651", "vsock://3:9651"]
    assert "peerd-quic" not in [name for name, _m, _p in launcher.programs(cfg)]


def test_a_quic_family_gets_its_own_peerd_program(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(options.DEBUG_STREAM_QUIC_ENV, "1")
    cfg = resolve(tmp_path, "--peers", "quic://192.0.2.1:9651")
    assert cfg.peerd_families["quic"] == ["quic"] and cfg.family_of_proto("quic") == "quic"
    assert cfg.family_of_proto("tcp") == "tcp" and cfg.peers == ["quic://192.0.2.1:9651"]
    launcher.prepare(cfg)
    conf = (tmp_path / "r" / "supervisord.conf").read_text()
    assert "[program:peerd-quic]" in conf and "--family quic" in conf and "--family tcp" in conf
    assert resolve(tmp_path, "--disable-quic").peerd_families.keys() == {"tcp"}


def test_vsock_listen_port_option(tmp_path: Path) -> None:
    assert resolve(tmp_path).vsock_listen_port is None
    assert resolve(tmp_path, "--vsock-listen-port", "9651").vsock_listen_port == 9651
    with pytest.raises(options.OptionError):
        resolve(tmp_path, "--vsock-listen-port", "-1")


def test_peer_files_are_per_family_and_read_the_old_single_file(tmp_path: Path) -> None:
    (tmp_path / "peers.json").write_text(json.dumps(["tcp://192.0.2.1:1", "quic://192.0.2.1:2"]))
    tcp = PeerApi(PeerTable(), peers_file(str(tmp_path), "tcp"), ["tcp", "vsock"])
    skipped = tcp.add_saved(tcp.load([]), 0.0)
    assert skipped == ["quic://192.0.2.1:2"] and list(tcp.table.entries) == ["tcp://192.0.2.1:1"]
    tcp.save()
    quic = PeerApi(PeerTable(), peers_file(str(tmp_path), "quic"), ["quic"])
    quic.add_saved(quic.load([]), 0.0)
    assert list(quic.table.entries) == ["quic://192.0.2.1:2"]
    answer, close = quic.add_or_remove("add_peer", {"endpoint": "tcp://192.0.2.9:1"})
    assert answer["error"] == "parse" and close is None
    answer, _ = tcp.add_or_remove("add_peer", {"endpoint": "vsock://3:7"})
    assert answer == {"ok": True}
    assert json.loads((tmp_path / "peers-tcp.json").read_text()) == ["tcp://192.0.2.1:1", "vsock://3:7"]
    assert Endpoint.parse("vsock://3:7") in [e.endpoint for e in tcp.table.entries.values()]
