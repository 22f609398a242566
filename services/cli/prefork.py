"""supervisord as a fork server: one interpreter imports the node's services
once, and supervisord starts each program by forking it, not by exec.

Every service is its own Python process (restartable alone, as the design
asks), and a fresh interpreter per process costs ~12-15 MiB of private
memory, most of it the same imported modules (zmq, msgpack, cryptography,
asyncio, our common/). Imported before the fork, those pages stay shared
copy-on-write between supervisord and every service: a node's PSS falls by
a fifth (docs/PERFORMANCE.md, "Memory"). supervisord still forks, waits
for, restarts and signals each program exactly as before; only the
``execve`` of a program whose command is ``<this python> -m services.X``
(optionally behind the launcher's ``setpriv`` capability drop) is replaced
by running that module in the forked child. Any other command is exec'ed
as supervisord always does.

Before forking anything, every object the preloaded modules made is marked
immortal (PEP 683, ``immortalize``): otherwise each reference a child takes
to a shared function, class or constant writes its count and copies the
4 KiB page it sits on, and a child that had only run a little shared code
had copied a third of what it shared (docs/PERFORMANCE.md).
``MYCELIUM_IMMORTAL=0`` leaves them mortal.

What a forked service does not get afresh, and why that is fine: the hash
seed (shared by the services of one node, still random per start), the
imported code (a node runs one installed version; restart the node after
an upgrade, as with any preforking server), supervisord's objects (frozen
out of the GC's way; their descriptors are closed by supervisord before
the exec point, and nothing in the child refers to them).

Run: ``python -m services.cli.prefork --preload asyncio,zmq,... -- <supervisord arguments>``;
``MYCELIUM_PREFORK=0`` makes the launcher run plain supervisord instead.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import importlib
import os
import runpy
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Any

from common import wake

PREFORK_ENV = "MYCELIUM_PREFORK"  # "0": supervisord execs every program (no shared imports)
IMMORTAL_ENV = "MYCELIUM_IMMORTAL"  # "0": the preloaded objects stay mortal (the baseline of immortalize())
# uid 0 without any capability, for when the service user cannot reach the
# interpreter or the run directory (e.g. a Python installed under /root);
# the launcher puts it in front of a program's command, and a forked program
# does the same drop itself (common.privs.drop_all_capabilities)
DROP_CAPS = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all", "--no-new-privs", "--"]
# the signals supervisord handles; a forked program starts with the defaults an exec'ed one gets
_SUPERVISORD_SIGNALS = (signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2)
_PR_SET_DUMPABLE = 4
SERVICES = "services."  # the modules a program command may name to be forked
# What two or more services import (a module only one process uses would be
# held twice once that process writes to its pages: the parent's copy and
# its own), so each service imports only what is its alone. Lazily imported
# modules count: router, msgbus, apid and proxyd derive the node's public
# key (x25519) after start.
SHARED_MODULES = (
    "asyncio",
    "concurrent.futures",
    "json",
    "tomllib",
    "zmq",
    "msgpack",
    "blake3",
    "cryptography.hazmat.primitives.asymmetric.x25519",
    "common.bus",
    "common.datapath",
    "common.endpoint",
    "common.fib",
    "common.identity",
    "common.lifecycle",
    "common.native",
    "common.nodeconfig",
    "common.pending",
    "common.shmring",
    "common.spinpoll",
    "common.wire",
)


def enabled() -> bool:
    return os.environ.get(PREFORK_ENV, "1") != "0"


def command(
    program_modules: Sequence[str],
    supervisord_args: Sequence[str],
    wake_path: str = "",
    on_demand: Sequence[str] = (),
) -> list[str]:
    """The command line that starts supervisord, preforking where enabled:
    it preloads SHARED_MODULES and any service that runs as two or more
    programs (peerd, one per transport family), and starts the
    ``on_demand`` programs when asked on ``wake_path``."""
    if not enabled():
        return [sys.executable, "-m", "supervisor.supervisord", *supervisord_args]
    repeated = [m for m in dict.fromkeys(program_modules) if list(program_modules).count(m) > 1]
    preloaded = ",".join([*SHARED_MODULES, *(f"{m}.service" for m in repeated)])
    wakes = ["--wake", wake_path, "--on-demand", ",".join(on_demand)] if wake_path and on_demand else []
    return [sys.executable, "-m", "services.cli.prefork", "--preload", preloaded, *wakes, "--", *supervisord_args]


def forkable(argv: Sequence[str]) -> tuple[str, list[str], bool] | None:
    """(module, its arguments, drop capabilities first) when ``argv`` runs
    one of our services with this interpreter, else None (exec it)."""
    drop = list(argv[: len(DROP_CAPS)]) == DROP_CAPS
    rest = list(argv[len(DROP_CAPS) :] if drop else argv)
    if len(rest) < 3 or rest[0] != sys.executable or rest[1] != "-m" or not rest[2].startswith(SERVICES):
        return None
    return rest[2], rest[3:], drop


def preload(modules: Sequence[str]) -> None:
    """Import ``modules``; one that fails to import is left to fail loudly
    in the service that needs it, where supervisord logs and retries it."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # any import error: the service imports it itself
            print(f"mycelium prefork: {module} not preloaded ({type(exc).__name__}: {exc})", file=sys.stderr)


# CPython 3.12 and 3.13 on 64-bit: an object is immortal when the low 32 bits of
# its reference count, read as signed, are negative; Py_INCREF/Py_DECREF then
# leave the count alone (PEP 683, Include/object.h)
_IMMORTAL_LOW_WORD = 0xFFFF_FFFF


def immortalizable() -> bool:
    """Whether this interpreter marks immortal objects the way
    ``immortalize`` writes them (else it does nothing)."""
    import sysconfig

    return (
        sys.implementation.name == "cpython"
        and (3, 12) <= sys.version_info[:2] <= (3, 13)
        and sys.maxsize > 2**32
        and sys.byteorder == "little"
        and not sysconfig.get_config_var("Py_GIL_DISABLED")
    )


def immortalize() -> int:
    """Make every object alive now immortal, so that running the shared code
    in a forked child does not write reference counts into the parent's
    pages (each write copies a 4 KiB page: PEP 683's motivating case).

    What is alive here is what the preloaded modules hold for the life of
    the process anyway (module dicts, functions, code, classes, constants);
    immortal, it is never freed, which for those is no change. Returns how
    many objects it marked."""
    if not immortalizable():
        return 0
    import ctypes

    seen: dict[int, object] = {}
    for obj in gc.get_objects():
        seen[id(obj)] = obj
        for ref in gc.get_referents(obj):  # the untracked ones: str, bytes, int, code, ...
            seen[id(ref)] = ref
    marked = 0
    for address in seen:
        word = ctypes.c_uint32.from_address(address)
        if word.value < 0x8000_0000:  # not immortal yet (static objects already are)
            word.value = _IMMORTAL_LOW_WORD
            marked += 1
    return marked


def prepare_to_fork() -> int:
    """After the preloads, before supervisord: what the services will share
    is made immortal (unless MYCELIUM_IMMORTAL=0) and frozen out of every
    later collection's reach. Returns the objects made immortal."""
    gc.collect()
    marked = immortalize() if os.environ.get(IMMORTAL_ENV, "1") != "0" else 0
    gc.freeze()
    return marked


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def run_forked(module: str, args: list[str], env: dict[str, str], drop_caps: bool) -> None:
    """In the child supervisord forked: become what ``python -m module args``
    would have been, run it, and exit with its status. Never returns."""
    code = 1
    try:
        os.environ.clear()
        os.environ.update(env)
        for sig in _SUPERVISORD_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        signal.set_wakeup_fd(-1)
        if os.getuid() != 0:
            _set_dumpable()  # an exec after supervisord's setuid would have reset it
        gc.freeze()  # supervisord's objects: never scanned, so their pages stay shared
        if drop_caps:
            from common.privs import drop_all_capabilities

            drop_all_capabilities()
        _set_title(module, args)
        if env.get("PYTHONUNBUFFERED"):
            for stream in (sys.stdout, sys.stderr):
                stream.reconfigure(write_through=True)  # type: ignore[union-attr]
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException:  # what an exec'ed interpreter does with an uncaught exception
        sys.excepthook(*sys.exc_info())
        code = 1
    finally:
        try:
            threading._shutdown()  # type: ignore[attr-defined]  # join non-daemon threads, as at interpreter exit
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _set_dumpable() -> None:
    """Linux makes a process that changed its uid non-dumpable, which makes
    its /proc files root's; an exec resets that, so a forked service resets
    it itself. What it carries of supervisord's memory that its user could
    now read holds no secret but the control socket's password, and that
    socket is root's, mode 0700; the node's key is read after this."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)


def _set_title(module: str, args: list[str]) -> None:
    """``ps`` and /proc/<pid>/cmdline show the command supervisord would have
    exec'ed (tools and tests find a service by it), ``top`` the service."""
    try:
        import setproctitle
    except ImportError:  # an installation from before it was a dependency: untitled, still working
        return
    setproctitle.setproctitle(" ".join([sys.executable, "-m", module, *args]))
    setproctitle.setthreadtitle(module.rsplit(".", 1)[-1][:15])


def install() -> None:
    """Make supervisord fork our services instead of exec'ing them."""
    from supervisor.options import ServerOptions

    exec_program = ServerOptions.execve

    def execve(self: ServerOptions, filename: str, argv: list[str], env: dict[str, str]) -> None:
        found = forkable(argv)
        if found is None:
            return exec_program(self, filename, argv, env)
        run_forked(*found[:2], env, found[2])

    ServerOptions.execve = execve
    # what supervisord's own streams hold must not be written again by each child
    os.register_at_fork(before=lambda: (sys.stdout.flush(), sys.stderr.flush()))


class WakeListener:
    """The wake socket (common/wake.py) as one more of supervisord's
    dispatchers: its loop polls it with the others, and a datagram naming
    an on-demand program that is not running starts it, as
    ``supervisorctl start`` would. Everything else is refused and counted."""

    BURST = 64  # datagrams read per readable event

    def __init__(self, supervisor: Any, sock: socket.socket, programs: frozenset[str]) -> None:
        self.supervisor = supervisor
        self.sock = sock
        self.programs = programs
        self.started = 0  # programs started by a wake-up
        self.refused = 0  # datagrams naming nothing we may start

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def handle_read_event(self) -> None:
        for _ in range(self.BURST):
            try:
                datagram = self.sock.recv(wake.MAX_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                return
            name = wake.decode(datagram, self.programs)
            if name is None:
                self.refused += 1
                if str(self.refused).strip("0") == "1":  # the 1st, 10th, 100th ...: seen, never a flood of lines
                    self.supervisor.options.logger.warn(
                        f"{wake.WAKE_FILE}: refused {self.refused} datagram(s) naming no on-demand program"
                    )
                continue
            self.start(name)

    def start(self, name: str) -> bool:
        from supervisor.states import ProcessStates, SupervisorStates

        if self.supervisor.options.mood < SupervisorStates.RUNNING:  # the node is stopping
            return False
        group = self.supervisor.process_groups.get(name)
        process = group.processes.get(name) if group is not None else None
        if process is None or process.get_state() not in (
            ProcessStates.STOPPED,
            ProcessStates.EXITED,
            ProcessStates.FATAL,
        ):
            return False  # unknown here, or already starting or running
        self.supervisor.options.logger.info(f"starting on-demand program {name} (asked for on {wake.WAKE_FILE})")
        process.spawn()
        self.started += 1
        return True

    def handle_error(self) -> None:  # what supervisord calls when a handler raised
        import traceback

        self.supervisor.options.logger.critical(f"wake listener: {traceback.format_exc()}")


def bind_wake_socket(path: str) -> socket.socket:
    """The wake socket, writable by the owner and the run directory's group
    (the services' group when the node separates privileges)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a killed predecessor's
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        group = os.stat(os.path.dirname(path) or ".").st_gid
        if os.geteuid() == 0:
            os.chown(path, 0, group)
        os.chmod(path, 0o660)
    except OSError:
        sock.close()
        raise
    return sock


def install_wake(path: str, programs: Sequence[str]) -> None:
    """Listen on ``path`` for the on-demand ``programs`` once supervisord's loop starts."""
    from supervisor import supervisord

    run = supervisord.Supervisor.runforever

    def runforever(self: supervisord.Supervisor) -> None:
        try:
            sock = bind_wake_socket(path)
        except OSError as exc:  # loud, and the programs it would have woken are started at once instead
            self.options.logger.critical(f"cannot listen on {path} ({exc}); starting {', '.join(programs)} now")
            for name in programs:
                group = self.process_groups.get(name)
                if group is not None:
                    for process in group.processes.values():
                        process.config.autostart = True
        else:
            self.options.get_socket_map()[sock.fileno()] = WakeListener(self, sock, frozenset(programs))
        try:
            run(self)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    supervisord.Supervisor.runforever = runforever


STOPPING_POLL_S = 0.05  # supervisord's loop while the node stops (1 s otherwise)


def install_quick_stop() -> None:
    """Stop a node in about a second instead of one second per program.

    supervisord stops one program group per turn of its loop and then waits
    for its 1 s poll timeout (an exited child's pipe closes before it can be
    reaped, so nothing wakes the poll). Here every group of the highest
    priority left stops at once (the order by priority stays: peerd first,
    router last), and while stopping the loop turns every 50 ms."""
    from supervisor import poller, supervisord

    base = poller.Poller

    class QuickStopPoller(base):  # type: ignore[valid-type,misc]
        stopping = False

        def poll(self, timeout: float) -> tuple[list[int], list[int]]:
            return super().poll(min(timeout, STOPPING_POLL_S) if self.stopping else timeout)

    def stop_highest_priority(self: supervisord.Supervisor) -> None:
        self.options.poller.stopping = True
        if self.stop_groups:
            last = self.stop_groups[-1].config.priority
            for group in self.stop_groups:
                if group.config.priority == last:
                    group.stop_all()

    poller.Poller = QuickStopPoller
    supervisord.Supervisor.ordered_stop_groups_phase_1 = stop_highest_priority


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.cli.prefork")
    parser.add_argument("--preload", default="", help="comma-separated modules to import once and fork")
    parser.add_argument("--wake", default="", help="the wake socket's path (common/wake.py)")
    parser.add_argument("--on-demand", default="", help="comma-separated programs the wake socket may start")
    parser.add_argument("supervisord_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        import setproctitle

        setproctitle.getproctitle()  # finds the argv and environ area while the environment is still the original
    except ImportError:
        print("mycelium prefork: setproctitle missing; the services keep supervisord's title", file=sys.stderr)
    rest = args.supervisord_args[1:] if args.supervisord_args[:1] == ["--"] else args.supervisord_args
    preload([m for m in args.preload.split(",") if m])
    install()
    install_quick_stop()
    on_demand = [p for p in args.on_demand.split(",") if p]
    if args.wake and on_demand:
        install_wake(args.wake, on_demand)
    prepare_to_fork()
    from supervisor import supervisord

    sys.argv = ["supervisord", *rest]
    supervisord.main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
