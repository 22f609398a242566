"""Process lifetime helpers shared by the launcher and every service."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import TracebackType

from .logs import setup as setup_logs
from .nodeconfig import NodeConfig

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to signal us when our parent dies: a killed supervisord (or
    launcher) must not leave orphaned services holding the node's sockets."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        pass


class StopSignal:
    """SIGTERM/SIGINT as something a zmq.Poller can wait on: the handler
    writes to a socketpair, so a blocking poll returns at once instead of at
    its next timeout."""

    def __init__(self) -> None:
        import socket

        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self.stopped = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, _signum: int, _frame: object) -> None:
        self.stopped = True
        try:
            self._w.send(b"\0")
        except OSError:
            pass

    def fileno(self) -> int:
        return self._r.fileno()


EXIT_BUG = 70  # EX_SOFTWARE: a task, thread or loop of a service died of an exception


def exit_on_crash(name: str) -> None:
    """Make a dying thread or main loop loud: log its traceback and exit
    non-zero so supervisord restarts the whole service, instead of a
    process that lives on without the thread that did its work."""
    log = logging.getLogger(name)

    def main_died(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, exc, tb)
            return
        log.critical("%s died", name, exc_info=(kind, exc, tb))
        logging.shutdown()
        os._exit(EXIT_BUG)

    def thread_died(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        thread = args.thread.name if args.thread is not None else "?"
        exc = args.exc_value if args.exc_value is not None else args.exc_type()
        log.critical("%s: thread %s died; exiting", name, thread, exc_info=(args.exc_type, exc, args.exc_traceback))
        logging.shutdown()
        os._exit(EXIT_BUG)

    sys.excepthook = main_died
    threading.excepthook = thread_died


def start_service(
    name: str, argv: list[str] | None, add_args: Callable[[argparse.ArgumentParser], None] | None = None
) -> tuple[NodeConfig, argparse.Namespace]:
    """What every service does first: parse ``--run-dir`` (and its own
    flags), die with supervisord, read node.json, set up logging."""
    parser = argparse.ArgumentParser(prog=f"python -m services.{name.split('-')[0]}")
    parser.add_argument("--run-dir", required=True)
    if add_args is not None:
        add_args(parser)
    args = parser.parse_args(argv)
    die_with_parent()
    cfg = NodeConfig.load_or_exit(args.run_dir)
    setup_logs(name, cfg.log_level)
    exit_on_crash(name)
    return cfg, args
