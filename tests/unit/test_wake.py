"""Programs started on first use (common/wake.py): the datagram, the
launcher's config, the listener's decisions, and apid's "idle" health.
A real node waking its proxyd: tests/integration/test_prefork.py."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from supervisor.states import ProcessStates, SupervisorStates

from common import wake
from common.programs import ON_DEMAND
from services.apid.stats import StatsCollector
from services.cli import launcher, prefork
from services.cli.prefork import WakeListener

from .test_dns_options import cfg_with


def test_a_datagram_names_one_allowed_program_or_nothing() -> None:
    allowed = frozenset({"proxyd"})
    assert wake.decode(wake.encode("proxyd"), allowed) == "proxyd"
    for bad in (b"", b"router", b"proxyd\n", b"\xff\xfeproxyd", b"p" * (wake.MAX_DATAGRAM + 1)):
        assert wake.decode(bad, allowed) is None


def test_wake_says_whether_anyone_listens(tmp_path: Path) -> None:
    assert wake.wake(str(tmp_path), "proxyd") is False  # no listener: the program was started with the node
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(wake.wake_path(str(tmp_path)))
        assert wake.wake(str(tmp_path), "proxyd") is True
        assert listener.recv(100) == b"proxyd"


def test_proxyd_waits_for_a_request_only_under_the_preforking_supervisord(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = cfg_with(tmp_path, "")

    def section(conf: str, name: str) -> str:
        return conf.split(f"[program:{name}]")[1].split("[program:")[0]

    monkeypatch.delenv(prefork.PREFORK_ENV, raising=False)
    conf = launcher.supervisord_conf(cfg)
    assert launcher.on_demand_programs(cfg) == ON_DEMAND == ("proxyd",)
    assert "autostart=false" in section(conf, "proxyd")
    assert all("autostart=true" in section(conf, n) for n in ("router", "tund", "apid", "msgbus", "peerd-tcp"))
    command = prefork.command(["services.proxyd"], ["-n"], wake.wake_path(cfg.run_dir), ("proxyd",))
    assert command[command.index("--wake") + 1] == wake.wake_path(cfg.run_dir)
    assert command[command.index("--on-demand") + 1] == "proxyd"
    assert command[command.index("--") :] == ["--", "-n"]

    monkeypatch.setenv(prefork.PREFORK_ENV, "0")  # plain supervisord cannot be asked: everything starts at once
    assert launcher.on_demand_programs(cfg) == ()
    assert "autostart=true" in section(launcher.supervisord_conf(cfg), "proxyd")


class Process:
    def __init__(self, state: int) -> None:
        self.state = state
        self.spawned = 0

    def get_state(self) -> int:
        return self.state

    def spawn(self) -> None:
        self.spawned += 1
        self.state = ProcessStates.STARTING


class Logger:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, text: str) -> None:
        self.lines.append(text)

    critical = warn = info


class Supervisor:
    """What WakeListener reads of supervisord's Supervisor: its mood and process groups."""

    def __init__(self, **states: int) -> None:
        self.options = type("Options", (), {"mood": SupervisorStates.RUNNING, "logger": Logger()})()
        self.process_groups: dict[str, Any] = {
            name: type("Group", (), {"processes": {name: Process(state)}})() for name, state in states.items()
        }

    def process(self, name: str) -> Process:
        return self.process_groups[name].processes[name]  # type: ignore[no-any-return]


def listener_with(sup: Supervisor) -> tuple[WakeListener, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    return WakeListener(sup, a, frozenset({"proxyd"})), b


@pytest.mark.parametrize("state", [ProcessStates.STOPPED, ProcessStates.EXITED, ProcessStates.FATAL])
def test_the_listener_starts_an_on_demand_program_that_is_not_running(state: int) -> None:
    sup = Supervisor(proxyd=state, router=ProcessStates.STOPPED)
    listener, client = listener_with(sup)
    for datagram in (b"proxyd", b"proxyd", b"router", b"", b"\x00" * 100, b"proxyd"):
        client.send(datagram)
    listener.handle_read_event()
    assert sup.process("proxyd").spawned == 1  # once; then it is starting
    assert sup.process("router").spawned == 0  # not on demand: never started from the socket
    assert (listener.started, listener.refused) == (1, 3)
    listener.handle_read_event()  # nothing left: returns at once


@pytest.mark.parametrize("state", [ProcessStates.STARTING, ProcessStates.RUNNING, ProcessStates.BACKOFF,
                                   ProcessStates.STOPPING])  # fmt: skip
def test_the_listener_leaves_a_program_that_runs_or_stops_alone(state: int) -> None:
    sup = Supervisor(proxyd=state)
    listener, client = listener_with(sup)
    client.send(b"proxyd")
    listener.handle_read_event()
    assert sup.process("proxyd").spawned == 0 and listener.started == 0


def test_the_listener_starts_nothing_while_the_node_stops() -> None:
    sup = Supervisor(proxyd=ProcessStates.STOPPED)
    sup.options.mood = SupervisorStates.SHUTDOWN
    listener, client = listener_with(sup)
    client.send(b"proxyd")
    listener.handle_read_event()
    assert sup.process("proxyd").spawned == 0


def test_the_listener_reads_a_bounded_burst_per_event() -> None:
    sup = Supervisor(proxyd=ProcessStates.RUNNING)
    listener, client = listener_with(sup)
    for _ in range(WakeListener.BURST + 5):
        client.send(b"nonsense")
    listener.handle_read_event()
    assert listener.refused == WakeListener.BURST  # the rest waits for supervisord's next turn
    listener.handle_read_event()
    assert listener.refused == WakeListener.BURST + 5
    assert sup.options.logger.lines == [  # type: ignore[attr-defined]
        f"wake.sock: refused {n} datagram(s) naming no on-demand program" for n in (1, 10)
    ]


def test_apid_reports_an_unstarted_on_demand_program_as_idle(tmp_path: Path) -> None:
    stats = StatsCollector(None, str(tmp_path))
    expected = ("router", "proxyd")
    later = stats.started + 3600  # long past the start-up grace
    health = {s["name"]: s["health"] for s in stats.services(expected, later)}
    assert health == {"router": "down", "proxyd": "down"}  # nobody listens for wake-ups: proxyd should run
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(wake.wake_path(str(tmp_path)))
        health = {s["name"]: s["health"] for s in stats.services(expected, later)}
        assert health == {"router": "down", "proxyd": "idle"}
