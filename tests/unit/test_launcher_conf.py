"""The generated supervisord config holds any run directory a user can
type: supervisord itself parses it back to the same paths and argv."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from supervisor.options import ServerOptions

from services.cli import launcher
from services.cli.main import build_parser
from services.cli.options import resolve

AWKWARD = [
    "plain",
    "run dir 100% 'q' é",
    'dq " and \\ backslash',
    "comment ; semi # hash",
    "%(here)s %(ENV_HOME)s %%",
    "tab\there",
    "ünï cødé ✓ 日本",
]


def parsed(conf: Path) -> ServerOptions:
    options = ServerOptions()
    options.configfile = str(conf)
    options.process_config(do_usage=False)
    options.server_configs = options.configroot.supervisord.server_configs
    return options


@pytest.mark.parametrize("name", AWKWARD)
def test_supervisord_reads_back_every_path(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(launcher.SERVICE_USER_ENV, "root")  # no privilege separation: argv as program_args gives it
    run = tmp_path / name / "run"
    key = tmp_path / name / "key file 100%.bin"
    args = build_parser().parse_args(["--no-tun", "--run-dir", str(run), "-k", str(key)])
    cfg = resolve(args, print, check_ports=False)
    launcher.prepare(cfg, log_to_stdout=False, crypto_workers=2)
    options = parsed(run / launcher.CONF_FILE)
    assert options.logfile == str(run / "logs" / "supervisord.log")
    assert options.pidfile == str(run / launcher.PID_FILE)
    assert options.childlogdir == str(run / "logs")
    assert options.server_configs[0]["file"] == str(run / launcher.SOCK_FILE)
    programs = {g.name: g.process_configs[0] for g in options.process_group_configs}
    assert set(programs) == {name for name, _, _ in launcher.programs(cfg)}
    for prog, module, priority in launcher.programs(cfg):
        pc = programs[prog]
        family = prog.split("-", 1)[1] if module == "services.peerd" else "tcp"
        expected = launcher.program_args(module, cfg.run_dir, 2, None, family)
        assert shlex.split(pc.command) == expected  # what supervisord execs (after its expansion)
        assert pc.directory == str(run)
        assert pc.priority == priority
        assert pc.stdout_logfile == str(run / "logs" / f"{prog}.log")
        assert pc.environment == {"PYTHONUNBUFFERED": "1"}
    assert key.stat().st_size == 32


def test_command_line_escapes_for_shlex_and_expansion() -> None:
    args = ["/usr/bin/python3", "-m", "x", "--run-dir", "/a b/100%/'q'/\"d\"/é ;c #d", ""]
    line = launcher.command_line(args)
    assert " ;" not in line and " #" not in line and "\t" not in line
    assert shlex.split(line % {}) == args  # supervisord: %-expansion, then shlex.split


def test_control_characters_are_refused() -> None:
    with pytest.raises(launcher.LaunchError):
        launcher.command_line(["/tmp/a\nb"])
