"""Programs that start on first use: the datagram that asks supervisord to
start one, shared by the client (apid) and the listener (the preforking
supervisord, services/cli/prefork.py).

Why: a node that never uses the SOCKS proxy paid 7.7 MiB of private
memory (6 % of the node, docs/PERFORMANCE.md) for a proxyd that waited on
its RPC socket. An on-demand program is configured ``autostart=false``;
the first request that needs it sends its name to ``wake.sock`` in the run
directory, and supervisord starts it. From then on it is an ordinary
supervised program (restarted when it dies, stopped with the node).

The listener only ever starts a program named in its on-demand list that
is not running; anything else in a datagram is refused and counted. The
socket is writable by the services' group only (the run directory's).
"""

from __future__ import annotations

import contextlib
import os
import socket

WAKE_FILE = "wake.sock"
MAX_DATAGRAM = 64  # a program name; longer datagrams are refused


def wake_path(run_dir: str) -> str:
    return os.path.join(run_dir, WAKE_FILE)


def encode(program: str) -> bytes:
    return program.encode("ascii")


def decode(datagram: bytes, allowed: frozenset[str] | tuple[str, ...]) -> str | None:
    """The program a datagram asks for, or None when it is not one of ``allowed``."""
    if not 0 < len(datagram) <= MAX_DATAGRAM:
        return None
    try:
        name = datagram.decode("ascii")
    except UnicodeDecodeError:
        return None
    return name if name in allowed else None


def wake(run_dir: str, program: str) -> bool:
    """Ask for ``program`` to be started if it is not running (never blocks).
    False when nobody listens (a node without the preforking supervisord
    starts every program at once, so there is nothing to wake)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.sendto(encode(program), wake_path(run_dir))
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            sock.close()
