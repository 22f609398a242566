"""services/cli/prefork.py without supervisord: which commands are forked,
the command line the launcher runs, and what a forked child becomes (exit
status, environment, signals), each in a fresh interpreter of its own."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from services.cli import prefork
from services.cli.prefork import DROP_CAPS, SHARED_MODULES, forkable


def test_our_services_run_with_this_interpreter_are_forked() -> None:
    args = [sys.executable, "-m", "services.router", "--run-dir", "/r"]
    assert forkable(args) == ("services.router", ["--run-dir", "/r"], False)
    assert forkable([*DROP_CAPS, *args]) == ("services.router", ["--run-dir", "/r"], True)


@pytest.mark.parametrize(
    "argv",
    [
        ["/usr/bin/python3.9", "-m", "services.router", "--run-dir", "/r"],  # another interpreter
        [sys.executable, "-m", "json.tool"],  # not one of ours
        [sys.executable, "services/router/__main__.py"],  # not -m
        [sys.executable, "-m"],
        ["setpriv", "--no-new-privs", "--", sys.executable, "-m", "services.router"],  # another drop: exec it
        ["/bin/true"],
        [],
    ],
)
def test_anything_else_is_execed(argv: list[str]) -> None:
    assert forkable(argv) is None


def test_the_launcher_preloads_shared_modules_and_repeated_services(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(prefork.PREFORK_ENV, raising=False)
    modules = ["services.router", "services.tund", "services.peerd", "services.peerd"]
    cmd = prefork.command(modules, ["-n", "-c", "/r/supervisord.conf"])
    assert cmd[:3] == [sys.executable, "-m", "services.cli.prefork"]
    preloaded = cmd[cmd.index("--preload") + 1].split(",")
    assert preloaded == [*SHARED_MODULES, "services.peerd.service"]
    assert cmd[-4:] == ["--", "-n", "-c", "/r/supervisord.conf"]
    single = prefork.command(["services.router", "services.peerd"], ["-n"])
    assert "services.peerd.service" not in single[single.index("--preload") + 1]
    monkeypatch.setenv(prefork.PREFORK_ENV, "0")
    assert prefork.command(modules, ["-n"]) == [sys.executable, "-m", "supervisor.supervisord", "-n"]


def test_every_shared_module_imports() -> None:
    """A module named there that no longer exists would only print a line at start."""
    code = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]"
    subprocess.run([sys.executable, "-c", code, *SHARED_MODULES], check=True, timeout=60)


TARGET = textwrap.dedent(
    """
    import os, signal, sys
    mode = sys.argv[1]
    out = os.environ["PREFORK_TEST_OUT"]
    with open(out, "w") as f:
        f.write(repr({
            "argv": sys.argv,
            "env": sorted(os.environ),
            "term": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
            "chld": signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL,
            "int": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
            "name": __name__,
        }))
    if mode == "exit3":
        sys.exit(3)
    if mode == "raise":
        raise ValueError("boom from the forked service")
    if mode == "message":
        sys.exit("a one-line reason")
    """
)


DRIVER = textwrap.dedent(
    """
    import signal, sys
    sys.path.insert(0, sys.argv[1])
    from services.cli import prefork
    signal.signal(signal.SIGTERM, lambda *_: None)  # supervisord-like handlers, to be reset
    signal.signal(signal.SIGCHLD, lambda *_: None)
    env = {"PREFORK_TEST_OUT": sys.argv[2], "SUPERVISOR_PROCESS_NAME": "t", "PATH": "/usr/bin"}
    prefork.run_forked("prefork_target", [sys.argv[3]], env, False)  # what supervisord's child does at its exec point
    """
)


def _run_forked(tmp_path: Path, mode: str) -> tuple[int, dict[str, object], str]:
    """``run_forked`` in a fresh single-threaded interpreter (it ends the
    process; pytest's has threads, which a fork must not meet)."""
    (tmp_path / "prefork_target.py").write_text(TARGET)
    out = tmp_path / "out.txt"
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(tmp_path), str(out), mode],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    seen = ast.literal_eval(out.read_text()) if out.exists() else {}
    return proc.returncode, seen, proc.stderr


def test_a_forked_service_sees_its_own_argv_environment_and_default_signals(tmp_path: Path) -> None:
    code, seen, _err = _run_forked(tmp_path, "ok")
    assert code == 0
    assert seen["argv"][1:] == ["ok"] and seen["name"] == "__main__"
    assert seen["env"] == ["PATH", "PREFORK_TEST_OUT", "SUPERVISOR_PROCESS_NAME"]
    assert seen["term"] and seen["chld"] and seen["int"]


@pytest.mark.parametrize(("mode", "status", "stderr"), [
    ("exit3", 3, ""),
    ("raise", 1, "ValueError: boom from the forked service"),
    ("message", 1, "a one-line reason"),
])  # fmt: skip
def test_a_forked_service_exits_as_an_execed_one_would(tmp_path: Path, mode: str, status: int, stderr: str) -> None:
    code, _seen, err = _run_forked(tmp_path, mode)
    assert code == status
    assert stderr in err


IMMORTAL_PROBE = """
import gc, json, sys
from services.cli import prefork
assert prefork.immortalizable(), "this interpreter should support immortal objects"
gc.collect()
before = sys.getrefcount(json.dumps)
marked = prefork.prepare_to_fork()  # what main() runs before supervisord
assert gc.get_freeze_count() > 0
held = [json.dumps] * 100  # references taken after: the count is not written
assert sys.getrefcount(json.dumps) == sys.getrefcount(None), (before, sys.getrefcount(json.dumps))
fresh = object()
count = sys.getrefcount(fresh)
more = [fresh] * 3
assert sys.getrefcount(fresh) == count + 3  # objects made later stay mortal
assert json.loads(json.dumps({"a": [1, 2.5, "x"]})) == {"a": [1, 2.5, "x"]}  # and the code still runs
print(marked)
"""


@pytest.mark.skipif(not prefork.immortalizable(), reason="immortal objects need CPython 3.12 or 3.13 on 64-bit")
def test_preloaded_objects_become_immortal_and_later_ones_do_not() -> None:
    """What keeps a forked child from copying the parent's pages just by
    counting references to shared objects (services/cli/prefork.py)."""
    out = subprocess.run([sys.executable, "-c", IMMORTAL_PROBE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 1000  # the interpreter's and json's objects, at least


def test_immortal_objects_can_be_turned_off() -> None:
    probe = "from services.cli import prefork; print(prefork.prepare_to_fork())"
    env = {**os.environ, prefork.IMMORTAL_ENV: "0"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "0", out.stderr


def test_immortal_objects_are_only_written_where_the_layout_is_known(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "version_info", (3, 11, 9, "final", 0))
    assert not prefork.immortalizable()
    assert prefork.immortalize() == 0
