"""What the byte-stream link types share (TCP, vsock; PROTOCOL.md 2.2):
a connected non-blocking socket, the packet stream framing, a bounded
send queue (sendqueue.py) and a listener.

The data path bypasses asyncio's streams: the loop calls ``on_readable``
while the socket is readable and the packets of each read go to the host
right there (no task switch per read); the read buffer is the link's own
(always room for one largest packet more), so data packets are handed
over in place. Writes go straight to ``writev`` (see SendQueue).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

from common.endpoint import Endpoint
from common.wire.errors import CodecError
from common.wire.packet import MAX_PACKET_SIZE, StreamDecoder

from ..eventloop import add_data_reader, remove_data_reader
from ..local_batch import link_rx
from ..sendqueue import Buffer, SendQueue
from .base import Link, LinkFactory, LinkHost, LinkStats

log = logging.getLogger("peerd")

READ_BUFFER = 512 * 1024  # a link's own read buffer (always room for one largest packet more)
ACCEPT_BURST = 16
LISTEN_BACKLOG = 128


class StreamLink(Link):
    """One connected stream socket carrying the packet stream."""

    def __init__(
        self, host: LinkHost, sock: socket.socket, endpoint: Endpoint, name: str, static_cost: int, inbound: bool
    ) -> None:
        super().__init__(host, endpoint, name, static_cost, inbound)
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        # a plain socket: tund's batches may be written to it straight from the ring while the queue is idle
        direct = self.fd if type(self)._writev is StreamLink._writev else -1
        self.queue = SendQueue(self._writev, host.counters, direct_fd=direct)
        self.buf = bytearray(READ_BUFFER + MAX_PACKET_SIZE)
        self.view = memoryview(self.buf)
        self.have = 0
        self.rx_bytes = 0
        self.decoder = StreamDecoder()
        # reads that hand this node's packets to tund themselves (local_batch.link_rx) where the
        # host offers it and the socket's bytes are the packet stream itself (not TLS records)
        plain = type(self).read_into is StreamLink.read_into
        self.local_rx: tuple[bytes, Any, int] | None = getattr(host, "local_rx", None) if plain else None
        self.reason = ""
        self.started = False
        self.reading = False
        self.write_waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None

    def _writev(self, bufs: Sequence[Buffer]) -> int:
        """Write to the socket (a TLS link overrides this to encrypt first);
        raises BlockingIOError when it is full."""
        return os.writev(self.fd, bufs)

    def read_into(self, view: memoryview) -> int:
        """Read what the socket has into ``view`` (0: EOF; a TLS link
        overrides this to decrypt); raises BlockingIOError when empty."""
        return os.readv(self.fd, [view])

    # --- Link -------------------------------------------------------------

    def start(self) -> None:
        """Register the reader with the loop and start the write loop."""
        self.started = True
        add_data_reader(self.fd, self.on_readable)  # called straight from the wait (peerd/eventloop.py)
        self.reading = True
        self.task = self.host.spawn(self._write_loop(), f"link {self.link_id} writer")

    def send_control(self, packets: Sequence[bytes]) -> None:
        """Queue control packets (written before data)."""
        if not self.closed:
            self.queue.push_control(packets)

    def send_data(self, frame: Buffer, packets: int = 1, borrowed: bool = False) -> bool:
        """Write at once when nothing waits, else queue (see SendQueue)."""
        if self.closed:
            return True
        ok = self.queue.push_data(frame, packets, borrowed)
        if self.queue.error is not None:
            self.close(self.queue.error)
        return ok

    def close(self, reason: str) -> None:
        """Stop reading and writing; the host hears on_closed when the write
        loop has ended."""
        if self.closed:
            return
        self.closed = True
        self.reason = self.reason or reason
        self.queue.close()
        if self.reading:
            remove_data_reader(self.fd)
            self.reading = False
        if self.write_waiter is not None and not self.write_waiter.done():
            self.write_waiter.set_result(None)
        if not self.started:  # refused or never registered: nobody to tell
            with contextlib.suppress(OSError):
                self.sock.close()

    def stats(self) -> LinkStats:
        """Bytes both ways and what waits in the send queue."""
        q = self.queue
        return LinkStats(self.queue.tx_bytes, self.rx_bytes, len(q.control), q.data_bytes + sum(map(len, q.pending)))

    # --- internals --------------------------------------------------------

    async def _write_loop(self) -> None:
        try:
            await self.queue.run(self._wait_writable)
        finally:
            if not self.closed:
                self.close(self.queue.error or "write loop ended")
            self._finish()

    def _finish(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        self.host.on_closed(self, self.reason or "closed")

    async def _wait_writable(self) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self.write_waiter = fut

        def done() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_writer(self.fd, done)
        try:
            await fut
        finally:
            self.write_waiter = None
            loop.remove_writer(self.fd)

    def on_readable(self) -> None:
        """Called by the loop while the socket is readable: one read and
        every packet in it, delivered to the host in place."""
        if self.closed:
            return
        if self.local_rx is not None:
            self._read_local_first(self.local_rx)
            return
        try:
            n = self.read_into(self.view[self.have :])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"read error: {exc}")
            return
        if n == 0:
            self._eof()
            return
        self.rx_bytes += n
        self.have += n
        why = self.process()
        if why is not None:
            self.close(why)

    def _read_local_first(self, rx: tuple[bytes, Any, int]) -> None:
        """on_readable with the read and the hand-over of the packets for
        this node at the start of the buffer in one call (local_batch.link_rx);
        the bookkeeping and whatever is left (transit, control, a partial
        packet) follow as from any read."""
        n, end, runs = link_rx(self.fd, self.buf, self.have, *rx)
        if n <= 0:
            if n == 0:
                self._eof()
            elif -n not in (errno.EAGAIN, errno.EINTR):
                self.close(f"read error: {OSError(-n, os.strerror(-n))}")
            return
        self.rx_bytes += n
        have = self.have + n
        if end:
            self.host.on_local(self, runs)
            have -= end
            if have:
                self.buf[:have] = self.view[end : end + have]
        self.have = have
        if have:
            why = self.process()
            if why is not None:
                self.close(why)

    def _eof(self) -> None:
        if self.have:
            self.host.counters["stream_truncated"] += 1
            self.close(f"eof inside a packet ({self.have} bytes buffered)")
        else:
            self.close("eof")

    def process(self) -> str | None:
        """Cut the buffer into packets and hand them over; why the link must
        end, or None."""
        decoder = self.decoder
        buf = self.buf
        counters = self.host.counters
        try:
            control, offsets, used = decoder.cut(buf, self.have)
        except CodecError as exc:
            counters["stream_malformed"] += 1
            return f"malformed stream: {exc}"
        if decoder.drops:
            for key, count in decoder.drops.items():
                counters[f"control_dropped_{key}"] += count
            decoder.drops.clear()
        if offsets:
            self.host.on_data(self, buf, offsets)
        if used:
            have = self.have
            buf[: have - used] = self.view[used:have]
            self.have = have - used
        if control and not self.closed:
            counters["control_rx"] += len(control)
            self.host.on_control(self, [pkt.encode() for pkt in control])
        return None


class StreamFactory(LinkFactory):
    """A listener on a stream socket plus non-blocking dials; subclasses
    say how to bind, connect and name a link."""

    def __init__(self, cfg: Any, host: LinkHost) -> None:
        super().__init__(cfg, host)
        self.listener: socket.socket | None = None

    def make_listener(self) -> socket.socket | None:
        """The bound, listening socket, or None for no listener."""
        return None

    def wrap(self, sock: socket.socket, inbound: bool) -> StreamLink:
        """The link for a connected socket (raises OSError if it is already gone)."""
        raise NotImplementedError

    def inbound(self, sock: socket.socket, addr: Any) -> StreamLink | None:
        """The link for an accepted connection, or None (reset before we looked at it)."""
        try:
            return self.wrap(sock, inbound=True)
        except OSError:
            return None

    async def listen(self) -> None:
        """Bind (make_listener) and accept on the loop."""
        sock = self.make_listener()
        if sock is None:
            return
        sock.setblocking(False)
        self.listener = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self.listener is not None
        for _ in range(ACCEPT_BURST):
            try:
                conn, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: count, try again on the next event
                self.host.counters["accept_error"] += 1
                log.debug("accept failed: %s", exc)
                return
            self.on_accepted(conn, addr)

    def on_accepted(self, conn: socket.socket, addr: Any) -> None:
        """An accepted connection becomes an inbound link at once (the TLS
        factories override this: a handshake first)."""
        link = self.inbound(conn, addr)
        if link is None:
            conn.close()
            return
        self.host.accepted(link)

    async def connect(self, sock: socket.socket, addr: Any, timeout: float) -> None:
        """Connect a non-blocking socket (closed on failure)."""
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, addr), timeout)
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        """Stop accepting."""
        if self.listener is not None:
            asyncio.get_running_loop().remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None


def bound_listener(family: int, addr: Any, options: tuple[tuple[int, int, int], ...] = ()) -> socket.socket:
    """A stream socket bound to ``addr`` and listening (closed on failure)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        for level, opt, value in options:
            sock.setsockopt(level, opt, value)
        sock.bind(addr)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock
