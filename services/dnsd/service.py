"""dnsd: the shell around resolver.py. UDP and TCP on ``[::]:53`` (both
families), forwarding over the overlay with plain sockets (the kernel's
TUN path), so it never sees a mycelium packet.

Started as root only to bind port 53: then it keeps CAP_NET_BIND_SERVICE
alone and becomes the service user (``--user``), as tund keeps
CAP_NET_ADMIN. Every 30 s (every second while no resolver node has a
route) it asks the router for the selected routes to choose the upstream
and requests routes to the resolver nodes it has none for.

Bounded: ``MAX_INFLIGHT`` forwards at once (past that SERVFAIL, counted),
``MAX_TCP_CLIENTS`` TCP connections, each closed after ``TCP_IDLE`` s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import sys
import time
from collections import Counter
from typing import Any, cast

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import zmq
import zmq.asyncio

from common import bus
from common.dnsnames import parse_names
from common.lifecycle import start_service
from common.nodeconfig import NodeConfig
from common.privs import CAP_NET_BIND_SERVICE, drop_to_capability

from .resolver import FORWARD_TIMEOUT, METRIC_CHECK_INTERVAL, PUBLIC_DNS_NODES, DnsCore, Forward, Reply

log = logging.getLogger("dnsd")

MAX_INFLIGHT = 256
MAX_TCP_CLIENTS = 64
TCP_IDLE = 10.0
TCP_MAX_SIZE = 65_535
RETRY_NO_ROUTE = 1.0  # seconds between upstream choices while no resolver node is reachable


class PortTaken(Exception):
    """Port 53 (or the configured one) cannot be bound; one line for the log."""


def bind_sockets(port: int) -> tuple[socket.socket, socket.socket]:
    """UDP and TCP sockets on [::]:port, IPv4 too (dual stack)."""
    out: list[socket.socket] = []
    for kind, proto in ((socket.SOCK_DGRAM, "UDP"), (socket.SOCK_STREAM, "TCP")):
        s = socket.socket(socket.AF_INET6, kind)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("::", port))
        except OSError as exc:
            s.close()
            for other in out:
                other.close()
            raise PortTaken(f"cannot bind DNS {proto} port [::]:{port}: {exc.strerror}") from exc
        if kind == socket.SOCK_STREAM:
            s.listen(128)
        s.setblocking(False)
        out.append(s)
    return out[0], out[1]


class Resolver:
    def __init__(self, cfg: NodeConfig, sync_ctx: zmq.Context) -> None:
        self.cfg = cfg
        self.sync_ctx = sync_ctx
        resolvers = cfg.dns_resolvers if cfg.dns_resolvers is not None else list(PUBLIC_DNS_NODES)
        self.core = DnsCore(
            names=parse_names(cfg.dns_names),
            resolvers=[ipaddress.IPv6Address(r) for r in resolvers],
            fallback=cfg.dns_fallback,
        )
        self.inflight = 0
        self.tcp_clients = 0
        self.router_in: bus.Sender | None = None

    def counters(self) -> dict[str, int]:
        return {**self.core.counters, "inflight": self.inflight}

    def gauges(self) -> dict[str, Any]:
        return {
            "upstream": self.core.upstream,
            "upstream_is_fallback": self.core.best is None,
            "cache_entries": self.core.cache_len(),
            "inflight": self.inflight,
            "tcp_clients": self.tcp_clients,
        }

    # --- answering ----------------------------------------------------------------

    async def answer(self, wire: bytes, max_size: int | None) -> bytes | None:
        action = self.core.handle(wire, time.monotonic(), max_size)
        if action is None or isinstance(action, Reply):
            return None if action is None else action.wire
        if self.inflight >= MAX_INFLIGHT:
            self.core.counters["forward_busy"] = self.core.counters.get("forward_busy", 0) + 1
            return self.core.complete(action, None, time.monotonic(), max_size).wire
        self.inflight += 1
        try:
            response = await self.forward(action)
        finally:
            self.inflight -= 1
        return self.core.complete(action, response, time.monotonic(), max_size).wire

    async def forward(self, fwd: Forward) -> dns.message.Message | None:
        """UDP to the upstream, TCP if the answer was truncated; None on failure."""
        deadline = time.monotonic() + FORWARD_TIMEOUT
        try:
            response = await dns.asyncquery.udp(fwd.query, fwd.upstream, timeout=FORWARD_TIMEOUT, port=53)
            if response.flags & dns.flags.TC:
                left = deadline - time.monotonic()
                if left > 0:
                    response = await dns.asyncquery.tcp(fwd.query, fwd.upstream, timeout=left, port=53)
            return response
        except (dns.exception.DNSException, OSError, ValueError, EOFError) as exc:
            log.debug("forward to %s failed: %s", fwd.upstream, exc)
            return None

    # --- upstream choice -------------------------------------------------------------

    def refresh(self) -> bool:
        """One upstream choice (blocking bus calls; run in a thread). True if a node was chosen."""
        try:
            routes = bus.rpc_call(self.sync_ctx, self.cfg.run_dir, "router", "routes_selected")
        except bus.BusError as exc:
            log.debug("no routes from the router: %s", exc)
            return self.core.best is not None
        before = self.core.upstream
        unknown = self.core.choose_upstream(routes if isinstance(routes, list) else [])
        if self.core.upstream != before:
            log.info("forwarding DNS to %s", self.core.upstream)
        if unknown:
            if self.router_in is None:
                sock = bus.connect(self.sync_ctx, zmq.PUSH, self.cfg.run_dir, "router.in")
                self.router_in = bus.Sender(sock, self.core.counters, "router")  # type: ignore[arg-type]
            for node in unknown:
                self.router_in.control("need_route", {"addr": str(node)})
        return self.core.best is not None

    async def refresh_loop(self) -> None:
        while True:
            found = await asyncio.to_thread(self.refresh)
            await asyncio.sleep(METRIC_CHECK_INTERVAL if found or not self.core.resolvers else RETRY_NO_ROUTE)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        task = asyncio.create_task(self._answer(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, data: bytes, addr: Any) -> None:
        reply = await self.resolver.answer(data, None)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error: %s", exc)


async def _tcp_client(resolver: Resolver, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    if resolver.tcp_clients >= MAX_TCP_CLIENTS:
        resolver.core.counters["tcp_refused"] = resolver.core.counters.get("tcp_refused", 0) + 1
        writer.close()
        return
    resolver.tcp_clients += 1
    try:
        while True:
            head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE)
            query = await asyncio.wait_for(reader.readexactly(int.from_bytes(head, "big")), TCP_IDLE)
            reply = await resolver.answer(query, TCP_MAX_SIZE)
            if reply is None:
                break
            writer.write(len(reply).to_bytes(2, "big") + reply)
            await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, OSError):
        pass
    finally:
        resolver.tcp_clients -= 1
        writer.close()


async def serve(cfg: NodeConfig, udp_sock: socket.socket, tcp_sock: socket.socket) -> None:
    sync_ctx = zmq.Context()
    ctx = zmq.asyncio.Context.shadow(sync_ctx)
    resolver = Resolver(cfg, sync_ctx)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(resolver), sock=udp_sock)
    server = await asyncio.start_server(lambda r, w: _tcp_client(resolver, r, w), sock=tcp_sock)
    rpc = cast(zmq.asyncio.Socket, bus.bind(ctx, zmq.ROUTER, cfg.run_dir, "dnsd.rpc"))
    stats = bus.StatsPublisher(sync_ctx, cfg.run_dir, "dnsd")
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def rpc_loop() -> None:
        drops: Counter[str] = Counter()
        while True:
            request = bus.parse_request(await rpc.recv_multipart(), drops)
            if request is None:
                continue
            envelope, msg = request
            if msg.kind == "stats":
                frames = bus.pack("ok", {"result": {"counters": resolver.counters(), "gauges": resolver.gauges()}})
            else:
                frames = bus.pack("error", {"message": f"unknown method {msg.kind!r}"})
            await rpc.send_multipart([*envelope, b"", *frames])

    async def stats_loop() -> None:
        while True:
            now = time.time()
            stats.maybe_publish(now, resolver.counters(), resolver.gauges())
            await asyncio.sleep(max(0.05, stats.seconds_until_due(now)))

    tasks = [asyncio.create_task(c) for c in (rpc_loop(), stats_loop(), resolver.refresh_loop())]
    log.info("DNS resolver on [::]:%d (UDP and TCP), upstream %s", cfg.dns_port, resolver.core.upstream)
    await stop.wait()
    for t in tasks:
        t.cancel()
    transport.close()
    server.close()
    rpc.close(linger=0)
    stats.close()


def main(argv: list[str] | None = None) -> int:
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--user", help="become this user after binding port 53")

    cfg, args = start_service("dnsd", argv, add_args)
    try:
        udp_sock, tcp_sock = bind_sockets(cfg.dns_port)
    except PortTaken as exc:
        log.error("%s", exc)
        return 1
    try:
        log.info("privileges dropped: %s", drop_to_capability(CAP_NET_BIND_SERVICE, args.user or None))
    except (OSError, KeyError) as exc:
        log.error("cannot drop privileges: %s", exc)
        return 1
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(cfg, udp_sock, tcp_sock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
