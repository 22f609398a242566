"""--enable-dns in the options and the launcher: the config keys of the
resolver, their errors, and dnsd as a program only when enabled."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from common.identity import Identity
from services.cli import launcher
from services.cli.main import build_parser, main
from services.cli.options import OptionError, resolve
from tests.integration.nodes import free_port as free_tcp_port

NODE = Identity.from_secret(bytes(range(32)))


def cfg_with(tmp_path: Path, toml: str, *flags: str):  # type: ignore[no-untyped-def]
    conf = tmp_path / "c.toml"
    conf.write_text(toml)
    args = build_parser().parse_args(
        ["--no-tun", "-c", str(conf), "--run-dir", str(tmp_path / "r"), "-k", str(tmp_path / "k"), *flags]
    )
    return resolve(args, print, check_ports=False)


def test_dns_settings_reach_node_json(tmp_path: Path) -> None:
    toml = (
        f'enable_dns = true\ndns_resolvers = ["{NODE.address}"]\ndns_fallback = "9.9.9.9"\ndns_port = 5353\n'
        f'[names]\nbob = "{NODE.public_key.hex()}"\n'
    )
    cfg = cfg_with(tmp_path, toml)
    assert cfg.enable_dns and cfg.dns_resolvers == [str(NODE.address)] and cfg.dns_fallback == "9.9.9.9"
    assert cfg.dns_port == 5353 and cfg.dns_names == {"bob": NODE.public_key.hex()}
    plain = cfg_with(tmp_path, "")
    assert not plain.enable_dns and plain.dns_resolvers is None


@pytest.mark.parametrize(
    "toml",
    [
        'dns_resolvers = "40a::1"',
        'dns_resolvers = ["10.0.0.1"]',
        'dns_resolvers = ["2001:db8::1"]',
        'dns_fallback = "dns.example"',
        "dns_port = 0",
        "[names]\nbob = 1",
        '[names]\nbob = "zz"',
    ],
)
def test_bad_dns_settings_are_option_errors(tmp_path: Path, toml: str) -> None:
    with pytest.raises(OptionError):
        cfg_with(tmp_path, toml, "--enable-dns")
    cfg_with(tmp_path, toml)  # ignored without --enable-dns


def test_dnsd_runs_only_with_enable_dns_and_starts_privileged(tmp_path: Path) -> None:
    off = cfg_with(tmp_path, "")
    assert "dnsd" not in [p[0] for p in launcher.programs(off)]
    on = cfg_with(tmp_path, "", "--enable-dns")
    names = [p[0] for p in launcher.programs(on)]
    assert "dnsd" in names and "proxyd" in names and names[-1].startswith("peerd-")  # peerds start last
    conf = launcher.supervisord_conf(on, privsep=launcher.Privsep(user="mycelium"))
    section = conf.split("[program:dnsd]")[1].split("[program:")[0]
    assert "--user mycelium" in section and "user=mycelium" not in section
    proxyd = conf.split("[program:proxyd]")[1].split("[program:")[0]
    assert "user=mycelium" in proxyd


def test_port_taken_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as held:
        held.bind(("::", 0))
        port = held.getsockname()[1]
        (tmp_path / "c.toml").write_text(f"dns_port = {port}\n")
        tcp, api, rpc = (free_tcp_port() for _ in range(3))
        rc = main(
            ["--no-tun", "--enable-dns", "-c", str(tmp_path / "c.toml"), "--run-dir", str(tmp_path / "r"),
             "-k", str(tmp_path / "k"), "-t", str(tcp), "--api-addr", f"127.0.0.1:{api}",
             "--jsonrpc-addr", f"127.0.0.1:{rpc}"]
        )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and f"UDP port {port} is not available" in err[0], err
