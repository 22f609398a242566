"""The launcher refuses bad input before starting anything."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import launcher
from services.cli.main import build_parser
from services.cli.options import merge, resolve


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "XDG_CONFIG_HOME": str(cwd / "cfg"), "PYTHONPATH": str(Path.cwd())},
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--no-tun", "--peers", "foo"], "missing '://'"),
        (["--no-tun", "--bogus"], "unrecognized arguments"),
        (["--no-tun", "-c", "/nonexistent/m.toml"], "does not exist"),
        (["--no-tun", "--api-addr", "nonsense"], "api address"),
        (["--no-tun", "-t", "0"], "port number"),
        (["--tun-name", "a/b"], "invalid --tun-name"),
        (["--tun-name", "much-too-long-for-linux"], "invalid --tun-name"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path: Path, args: list[str], needle: str) -> None:
    out = run_cli(*args, "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert needle in lines[0]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_port_in_use_is_reported(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::", 0))
        s.listen()
        port = s.getsockname()[1]
        out = run_cli("--no-tun", "-t", str(port), "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 1
    assert f"[::]:{port} is not available" in out.stderr


def test_unreadable_config_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("peers = [")
    out = run_cli("--no-tun", "-c", str(bad), cwd=tmp_path)
    assert out.returncode == 1 and "not valid TOML" in out.stderr


def test_config_merge_follows_reference_rules(tmp_path: Path) -> None:
    parser = build_parser()
    file = {"tcp_listen_port": 9000, "peers": "tcp://192.0.2.1:1", "no_tun": True, "api_addr": "127.0.0.1:7000"}
    file["peers"] = [file["peers"]]
    args = parser.parse_args(["-t", "9651", "--api-addr", "127.0.0.1:7001"])
    merged = merge(args, file)
    assert merged["tcp_listen_port"] == 9000  # CLI equal to the default does not override the file
    assert merged["api_addr"] == "127.0.0.1:7001"  # CLI differing from the default wins
    assert merged["no_tun"] is True  # booleans are OR-ed
    assert merged["peers"] == ["tcp://192.0.2.1:1"]
    args = parser.parse_args(["--peers", "tcp://192.0.2.2:2"])
    assert merge(args, file)["peers"] == ["tcp://192.0.2.2:2"]


def test_config_file_values_are_used(tmp_path: Path) -> None:
    conf = tmp_path / "m.toml"
    conf.write_text('peers = ["tcp://192.0.2.9:9651", "quic://[::1]:9651"]\nno_tun = true\ntcp_listen_port = 0\n')
    warnings: list[str] = []
    args = build_parser().parse_args(["-c", str(conf), "--run-dir", str(tmp_path / "r")])
    with pytest.raises(Exception, match="port number"):
        resolve(args, warnings.append, check_ports=False)  # the file's port 0 is used, and refused
    args = build_parser().parse_args(["-c", str(conf), "--run-dir", str(tmp_path / "r"), "-t", "1"])
    conf.write_text('peers = ["tcp://192.0.2.9:9651", "quic://[::1]:9651"]\nno_tun = true\nquic_listen_port = 9700\n')
    cfg = resolve(args, warnings.append, check_ports=False)
    assert cfg.no_tun and cfg.peers == ["tcp://192.0.2.9:9651", "quic://[::1]:9651"] and cfg.tcp_listen_port == 1
    assert cfg.quic_listen_port == 9700 and not cfg.disable_quic and not warnings
    args = build_parser().parse_args(["-c", str(conf), "--run-dir", str(tmp_path / "r"), "--disable-quic"])
    cfg = resolve(args, warnings.append, check_ports=False)
    assert cfg.disable_quic and cfg.peers == ["tcp://192.0.2.9:9651"]
    assert warnings and "quic" in warnings[0] and "disabled" in warnings[0]


def test_generated_supervisord_config_matches_deploy_template(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--no-tun", "--run-dir", str(tmp_path / "r"), "-k", str(tmp_path / "k")])
    cfg = resolve(args, print, check_ports=False)
    launcher.prepare(cfg)
    conf = (tmp_path / "r" / "supervisord.conf").read_text()
    template = (Path(__file__).resolve().parents[2] / "deploy" / "supervisord.conf").read_text()
    for name, module, _ in launcher.PROGRAMS:
        assert f"[program:{name}]" in conf and f"-m {module} --run-dir" in conf
        assert f"[program:{name}]" in template and f"-m {module} --run-dir" in template
    assert (tmp_path / "r" / "node.json").exists()
    assert (tmp_path / "k").stat().st_size == 32
