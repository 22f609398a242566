"""The data plane's plumbing: the stream cutter peerd's data path uses,
the supervisord programs of a TUN node (privilege separation, crypto
workers), TUN names."""

from __future__ import annotations

import os
import pwd
import random
from pathlib import Path

import pytest

from common.nodeconfig import NodeConfig
from common.wire.packet import ControlPacket, DataPacket, StreamDecoder
from common.wire.tlv import Hello
from services.cli import launcher
from services.tund.tun import valid_name


def _stream() -> tuple[bytes, list[DataPacket], int]:
    rng = random.Random(5)
    parts, data = [], []
    for i in range(40):
        if i % 7 == 3:
            parts.append(ControlPacket(Hello(0, i, 2000)).encode())
        else:
            pkt = DataPacket(os.urandom(16), os.urandom(16), rng.randrange(256), os.urandom(rng.randrange(0, 1500)))
            data.append(pkt)
            parts.append(pkt.encode())
    return b"".join(parts), data, sum(1 for i in range(40) if i % 7 == 3)


def test_cut_finds_the_same_packets_as_feed_whatever_the_chunking() -> None:
    """peerd's read loop: its own buffer, ``cut`` at each read, the rest kept."""
    stream, data, n_control = _stream()
    for chunk in (1, 7, 100, 1500, 4096, len(stream)):
        dec = StreamDecoder()
        control: list[ControlPacket] = []
        frames: list[bytes] = []
        buf = bytearray(len(stream) + 10)
        have = 0
        for i in range(0, len(stream), chunk):
            piece = stream[i : i + chunk]
            buf[have : have + len(piece)] = piece
            have += len(piece)
            ctl, offsets, used = dec.cut(buf, have)
            control += ctl
            for off in offsets:
                n = buf[off + 5] << 8 | buf[off + 6]
                frames.append(bytes(buf[off : off + 40 + n]))
            buf[: have - used] = buf[used:have]
            have -= used
        assert have == 0
        assert len(control) == n_control
        assert frames == [p.encode() for p in data]


def _cfg(tmp_path: Path, key: Path | None = None, no_tun: bool = False) -> NodeConfig:
    return NodeConfig(run_dir=str(tmp_path), key_file=str(key or tmp_path / "k"), no_tun=no_tun)


def _programs(conf: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    name = None
    for line in conf.splitlines():
        if line.startswith("[program:"):
            name = line[len("[program:") : -1]
            out[name] = []
        elif name and line:
            out[name].append(line)
    return out


def test_privilege_separation_with_a_service_user(tmp_path: Path) -> None:
    conf = launcher.supervisord_conf(_cfg(tmp_path), False, 3, launcher.Privsep(user="mycelium"))
    programs = _programs(conf)
    for name, lines in programs.items():
        command = next(line for line in lines if line.startswith("command="))
        if name == "tund":
            assert "user=mycelium" not in lines  # starts as root to create the TUN ...
            assert command.endswith("--workers 3 --user mycelium")  # ... then becomes the user
        else:
            assert "user=mycelium" in lines
    assert "--tund-workers 3" in next(line for line in programs["peerd-tcp"] if line.startswith("command="))


def test_privilege_separation_by_dropping_capabilities(tmp_path: Path) -> None:
    conf = launcher.supervisord_conf(_cfg(tmp_path), False, 1, launcher.Privsep(drop_caps=True))
    for name, lines in _programs(conf).items():
        command = next(line for line in lines if line.startswith("command="))
        assert command.startswith("command=setpriv --bounding-set=-all") == (name != "tund"), command
        assert "--workers" not in command and "--tund-workers" not in command


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege separation is set up only when started as root")
def test_a_run_dir_the_service_user_cannot_reach_stays_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second start of a node whose user cannot run the installation: the
    message store an earlier start gave that user must be root's again, else the
    capability-less root services find it read-only (msgbus died at restart)."""
    user = pwd.getpwnam("nobody")
    run = tmp_path / "run"  # pytest's tmp_path is 0700 root: nobody cannot reach it
    run.mkdir()
    store = run / "msgbus.sqlite"
    store.write_bytes(b"")
    os.chown(store, user.pw_uid, user.pw_gid)
    (tmp_path / "k").write_bytes(os.urandom(32))
    monkeypatch.setenv(launcher.SERVICE_USER_ENV, "nobody")
    privsep = launcher.setup_privsep(_cfg(tmp_path / "run", tmp_path / "k"), run)
    assert privsep.user is None
    assert (store.stat().st_uid, run.stat().st_uid, run.stat().st_gid) == (0, 0, 0)


def test_no_tun_node_keeps_no_privileged_program(tmp_path: Path) -> None:
    conf = launcher.supervisord_conf(_cfg(tmp_path, no_tun=True), False, 1, launcher.Privsep(user="mycelium"))
    assert all("user=mycelium" in lines for lines in _programs(conf).values())


def test_tun_names() -> None:
    assert valid_name("mycelium") and valid_name("ovl0") and valid_name("a" * 15)
    assert not valid_name("") and not valid_name("a" * 16) and not valid_name("a/b") and not valid_name("a b")
