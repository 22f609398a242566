"""A zmq.Poller for plain descriptors and ZeroMQ sockets with one
``epoll_wait`` per wake-up.

Why: tund's loop waits on the TUN, its data-path sockets and four ZeroMQ
sockets. zmq.Poller's ``poll`` rebuilds its item list in Python and
``zmq_poll`` asks every ZeroMQ socket for its events (a ``getpid`` and a
``poll`` each) before and after it blocks: 14 system calls per wake-up,
a quarter of tund's CPU for an idle ping. Here the ZeroMQ sockets wait
through their notification descriptor (``ZMQ_FD``) in the same epoll set,
so a ping's wake-up is one system call.

``ZMQ_FD`` only says "look at ZMQ_EVENTS": it is readable when commands
are waiting, not while messages are. A socket's messages can be pending
with the descriptor quiet (its reader stopped before EAGAIN, or a send on
it took the notification). So every ZeroMQ socket reported ready, and
every one just registered, has ZMQ_EVENTS checked before the next wait:
if it still has input, the wait does not block and reports it again.
"""

from __future__ import annotations

import select
from typing import Any

import zmq

Waitable = int | zmq.Socket[Any]


class Epoller:
    """``register``/``unregister`` descriptors (ints) and ZeroMQ sockets;
    ``poll(timeout)`` returns the set of those ready to read."""

    def __init__(self) -> None:
        self.ep = select.epoll()
        self.sockets: dict[int, zmq.Socket[Any]] = {}  # ZMQ_FD -> socket
        self.recheck: set[zmq.Socket[Any]] = set()  # ZeroMQ sockets to ask ZMQ_EVENTS before blocking

    def register(self, item: Waitable) -> None:
        if isinstance(item, zmq.Socket):
            fd = int(item.getsockopt(zmq.FD))
            self.sockets[fd] = item
            self.recheck.add(item)  # messages may be queued already
        else:
            fd = item
        self.ep.register(fd, select.EPOLLIN)

    def unregister(self, item: Waitable) -> None:
        if isinstance(item, zmq.Socket):
            fd = int(item.getsockopt(zmq.FD))
            self.sockets.pop(fd, None)
            self.recheck.discard(item)
        else:
            fd = item
        self.ep.unregister(fd)

    def _still_ready(self) -> set[Waitable]:
        ready: set[Waitable] = set()
        for sock in self.recheck:
            if int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                ready.add(sock)
        self.recheck = set()
        return ready

    def poll(self, timeout: float) -> set[Waitable]:
        """Wait up to ``timeout`` seconds (0: do not block)."""
        ready = self._still_ready() if self.recheck else set()
        events = self.ep.poll(0 if ready else timeout)
        return self.ready_from([fd for fd, _mask in events], ready)

    def ready_from(self, fds: list[int], ready: set[Waitable] | None = None) -> set[Waitable]:
        """What descriptors an ``epoll_wait`` on ``ep`` returned mean, as
        ``poll`` returns it (a caller may wait on ``ep`` itself: tund's C
        loop, when nothing needs a re-check first)."""
        if ready is None:
            ready = set()
        if fds:
            sockets = self.sockets
            for fd in fds:
                sock = sockets.get(fd)
                if sock is None:
                    ready.add(fd)
                elif int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:  # ZMQ_FD also fires for commands only
                    ready.add(sock)
        for item in ready:
            if isinstance(item, zmq.Socket):
                self.recheck.add(item)
        return ready

    def close(self) -> None:
        self.ep.close()
