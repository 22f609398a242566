"""proxyd: the shell around socks.py. It probes port 1080 of every node
with a selected route (started and stopped on request, a round every 60 s),
and, once connected to a remote, relays every connection to the local
``[::]:1080`` byte for byte to it (the local node does not speak SOCKS).

All of it is plain TCP through the kernel and the TUN: proxyd needs no
privilege and never sees a mycelium packet. apid drives it over
``proxyd.rpc``: ``list``, ``connect {remote}``, ``disconnect``,
``probe_start``, ``probe_stop``, ``stats``.

Its state (probing, the remote) is kept in the run directory, so a
proxyd restarted by supervisord (kill -9, a crash) resumes both.

Bounded: at most ``PROBE_CONCURRENCY`` probes at once, ``MAX_RELAYED``
relayed connections (more are accepted and closed, counted), each closed
after ``IDLE_TIMEOUT`` seconds without a byte in either direction.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import zmq
import zmq.asyncio

from common import bus
from common.identity import Identity, load_key_file
from common.lifecycle import start_service
from common.nodeconfig import NodeConfig

from .socks import (
    GREETING,
    PROBE_INTERVAL,
    PROBE_TIMEOUT,
    REPLY_LEN,
    REPLY_VALID,
    SOCKS_PORT,
    ProbeTable,
    RemoteError,
    classify,
    parse_remote,
    probe_targets,
    show_remote,
)

log = logging.getLogger("proxyd")

PROBE_CONCURRENCY = 32
MAX_RELAYED = 256
IDLE_TIMEOUT = 300.0  # seconds without a byte either way
CONNECT_TIMEOUT = 5.0  # to the remote proxy, per relayed connection
RACE_TIMEOUT = 5.0  # connect without a remote: how long the valid proxies may take to answer
CHUNK = 65_536
STATE_FILE = "proxyd.state.json"  # in the run directory: probing and remote survive a restart


async def greet(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> bytes | None:
    """Connect, send the greeting, read the 2-byte choice; None on any failure."""

    async def attempt() -> bytes | None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(GREETING)
            await writer.drain()
            return await reader.readexactly(REPLY_LEN)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    try:
        return await asyncio.wait_for(attempt(), timeout)
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        return None


class Proxy:
    """Probe scheduling, the chosen remote and the relay listener."""

    def __init__(self, cfg: NodeConfig, identity: Identity, ctx: zmq.Context, listen_port: int = SOCKS_PORT) -> None:
        self.cfg = cfg
        self.identity = identity
        self.ctx = ctx
        self.listen_port = listen_port
        self.table = ProbeTable()
        self.counters: Counter[str] = Counter()
        self.probe_task: asyncio.Task[None] | None = None
        self.server: asyncio.Server | None = None
        self.remote: tuple[str, int] | None = None
        self.streams: set[asyncio.Task[None]] = set()
        self.probe_slots = asyncio.Semaphore(PROBE_CONCURRENCY)
        self.rounds = 0
        self._connect_lock = asyncio.Lock()
        self.state_file = Path(cfg.run_dir) / STATE_FILE

    # --- surviving a restart ---------------------------------------------------

    def save_state(self) -> None:
        """What a restarted proxyd resumes: probing on or off, the remote relayed to."""
        state = {"probing": self.probe_task is not None, "remote": show_remote(*self.remote) if self.remote else None}
        tmp = self.state_file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.state_file)
        except OSError as exc:
            log.warning("cannot save %s: %s", self.state_file, exc.strerror)

    async def restore_state(self) -> None:
        try:
            state = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s: %s", self.state_file, exc)
            return
        if not isinstance(state, dict):
            return
        if state.get("probing") is True:
            self.start_probing()
        remote = state.get("remote")
        if isinstance(remote, str):
            result = await self.connect(remote)
            log.info("resumed the proxy after a restart: %s", result.get("remote") or result.get("message"))

    # --- probing -----------------------------------------------------------

    def start_probing(self) -> None:
        """Start the rounds; a start while probing begins a new round now
        (the reference would start a second, never-ending loop)."""
        if self.probe_task is not None:
            self.probe_task.cancel()
        log.info("start SOCKS5 proxy probing")
        self.probe_task = asyncio.create_task(self._probe_loop())
        self.save_state()

    def stop_probing(self) -> None:
        if self.probe_task is not None:
            log.info("stop SOCKS5 proxy probing")
            self.probe_task.cancel()
            self.probe_task = None
            self.save_state()

    async def _probe_loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.probe_round()
            except bus.BusError as exc:
                self.counters["probe_round_no_router"] += 1
                log.debug("probe round skipped: %s", exc)
            await asyncio.sleep(max(0.0, PROBE_INTERVAL - (time.monotonic() - started)))

    async def probe_round(self) -> None:
        snapshot = await asyncio.to_thread(bus.rpc_call, self.ctx, self.cfg.run_dir, "router", "fib_snapshot")
        entries = snapshot.get("entries", []) if isinstance(snapshot, dict) else []
        keys = [e[3] for e in entries if isinstance(e, list | tuple) and len(e) >= 4]
        targets = probe_targets(keys, self.identity.address)
        await asyncio.gather(*(self._probe(addr) for addr in targets))
        self.rounds += 1

    async def _probe(self, address: ipaddress.IPv6Address) -> None:
        async with self.probe_slots:
            reply = await greet(str(address), SOCKS_PORT)
        status = classify(reply)
        self.counters[f"probe_{status.value}"] += 1
        self.table.record(address, status)
        log.debug("probe %s: %s", address, status.value)

    # --- connecting and relaying ---------------------------------------------

    async def connect(self, remote: str | None) -> dict[str, Any]:
        """``{"remote": "[ip]:port"}`` or ``{"error": kind, "message": text}``."""
        async with self._connect_lock:
            if remote is not None:
                try:
                    target = parse_remote(remote)
                except RemoteError as exc:
                    return {"error": "parse", "message": str(exc)}
            else:
                found = await self._race()
                if found is None:
                    return {"error": "none", "message": "no valid SOCKS5 proxy found to connect to"}
                target = found
            await self._close_listener()
            try:
                self.server = await asyncio.start_server(
                    self._accept, host="::", port=self.listen_port, reuse_address=True, family=socket.AF_INET6
                )
            except OSError as exc:
                log.error("cannot bind the proxy port [::]:%d: %s", self.listen_port, exc.strerror)
                self.remote = None
                return {"error": "bind", "message": f"cannot bind [::]:{self.listen_port}: {exc.strerror}"}
            self.remote = target
            self.save_state()
            log.info("relaying [::]:%d to SOCKS5 proxy %s", self.listen_port, show_remote(*target))
            return {"remote": show_remote(*target)}

    async def _race(self) -> tuple[str, int] | None:
        """The first valid proxy to answer a fresh greeting with "no auth"."""
        candidates = self.table.valid()
        if not candidates:
            return None

        async def check(addr: ipaddress.IPv6Address) -> tuple[str, int] | None:
            return (str(addr), SOCKS_PORT) if await greet(str(addr), SOCKS_PORT, RACE_TIMEOUT) == REPLY_VALID else None

        tasks = [asyncio.create_task(check(a)) for a in candidates[:PROBE_CONCURRENCY]]
        try:
            for next_done in asyncio.as_completed(tasks):
                result = await next_done
                if result is not None:
                    return result
            return None
        finally:
            for t in tasks:
                t.cancel()

    async def disconnect(self) -> None:
        async with self._connect_lock:
            if self.remote is not None:
                log.info("disconnected from SOCKS5 proxy %s", show_remote(*self.remote))
            self.remote = None
            self.save_state()
            await self._close_listener()

    async def _close_listener(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for task in list(self.streams):
            task.cancel()
        if self.streams:
            await asyncio.gather(*self.streams, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target = self.remote
        if target is None or len(self.streams) >= MAX_RELAYED:
            self.counters["relay_refused" if target is not None else "relay_no_remote"] += 1
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self.streams.add(task)
        self.counters["relay_accepted"] += 1
        try:
            await self._relay(reader, writer, target)
        except asyncio.CancelledError:
            pass
        finally:
            self.streams.discard(task)
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: tuple[str, int]) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*target), CONNECT_TIMEOUT)
        except (OSError, TimeoutError):
            self.counters["relay_connect_failed"] += 1
            return
        last = [time.monotonic()]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, counter: str) -> None:
            try:
                while data := await src.read(CHUNK):
                    last[0] = time.monotonic()
                    dst.write(data)
                    await dst.drain()
                    self.counters[counter] += len(data)
                if dst.can_write_eof():
                    dst.write_eof()  # half-close, as copy_bidirectional does
            except OSError:
                pass

        pumps = [
            asyncio.create_task(pump(reader, up_writer, "relay_bytes_up")),
            asyncio.create_task(pump(up_reader, writer, "relay_bytes_down")),
        ]
        try:
            while not all(p.done() for p in pumps):
                idle = time.monotonic() - last[0]
                if idle >= IDLE_TIMEOUT:
                    self.counters["relay_idle_closed"] += 1
                    break
                await asyncio.wait(pumps, timeout=IDLE_TIMEOUT - idle, return_when=asyncio.ALL_COMPLETED)
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            up_writer.close()

    # --- the bus ---------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {"counters": dict(self.counters), "gauges": self.gauges()}

    def gauges(self) -> dict[str, Any]:
        return {
            "probing": self.probe_task is not None,
            "probe_rounds": self.rounds,
            "remote": show_remote(*self.remote) if self.remote else None,
            "relayed_connections": len(self.streams),
            **{f"proxies_{k}": v for k, v in self.table.counts().items()},
        }

    async def rpc(self, method: str, params: dict[str, Any]) -> Any:
        if method == "list":
            return [str(a) for a in self.table.valid()]
        if method == "connect":
            remote = params.get("remote")
            return await self.connect(remote if remote is not None else None)
        if method == "disconnect":
            await self.disconnect()
            return True
        if method == "probe_start":
            self.start_probing()
            return True
        if method == "probe_stop":
            self.stop_probing()
            return True
        if method == "status":
            return {"remote": self.gauges()["remote"], "table": self.table.results()}
        if method == "stats":
            return self.stats()
        raise ValueError(f"unknown method {method!r}")


async def serve(cfg: NodeConfig) -> None:
    identity = Identity.from_secret(load_key_file(cfg.key_file))
    sync_ctx = zmq.Context()
    ctx = zmq.asyncio.Context.shadow(sync_ctx)
    proxy = Proxy(cfg, identity, sync_ctx)
    sock = cast(zmq.asyncio.Socket, bus.bind(ctx, zmq.ROUTER, cfg.run_dir, "proxyd.rpc"))
    stats = bus.StatsPublisher(sync_ctx, cfg.run_dir, "proxyd")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def answer(envelope: list[bytes], msg: bus.Message) -> None:
        try:
            result = await proxy.rpc(msg.kind, msg.fields)
        except Exception as exc:  # a bad request must not take proxyd down
            log.debug("rpc %s failed: %s", msg.kind, exc)
            await sock.send_multipart([*envelope, b"", *bus.pack("error", {"message": str(exc)})])
            return
        await sock.send_multipart([*envelope, b"", *bus.pack("ok", {"result": result})])

    async def rpc_loop() -> None:
        pending: set[asyncio.Task[None]] = set()
        while True:
            frames = await sock.recv_multipart()
            request = bus.parse_request(frames, proxy.counters)
            if request is None:
                continue
            if len(pending) >= 64:
                proxy.counters["rpc_busy"] += 1
                continue
            task = asyncio.create_task(answer(*request))
            pending.add(task)
            task.add_done_callback(pending.discard)

    async def stats_loop() -> None:
        while True:
            now = time.time()
            stats.maybe_publish(now, proxy.counters, proxy.gauges())
            await asyncio.sleep(max(0.05, stats.seconds_until_due(now)))

    tasks = [asyncio.create_task(rpc_loop()), asyncio.create_task(stats_loop())]
    await proxy.restore_state()
    log.info("proxyd ready (SOCKS5 probing on request, relay port %d)", SOCKS_PORT)
    await stop.wait()
    if proxy.probe_task is not None:
        proxy.probe_task.cancel()
    await proxy._close_listener()  # the state file stays: a restart resumes
    for t in tasks:
        t.cancel()
    sock.close(linger=0)
    stats.close()


def main(argv: list[str] | None = None) -> int:
    cfg, _ = start_service("proxyd", argv)
    try:
        asyncio.run(serve(cfg))
    except Exception:
        log.exception("proxyd failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
