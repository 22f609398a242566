"""The JSON-RPC port: HTTP POST and WebSocket on one listener, as the
reference's jsonrpsee server, plus push subscriptions no other Mycelium has.

uvicorn (an ASGI server) owns the socket. Plain HTTP requests go to the
existing Flask JSON-RPC app through a2wsgi, so POST behaves exactly as it
did under waitress; WebSocket connections get a ``WsSession``: every frame
is a JSON-RPC request (or batch) answered by the same ``RpcRegistry``, and
the subscription methods are served here, jsonrpsee style:

- ``subscribeMessages([topic])`` -> subscription id; each received message
  is pushed as ``{"jsonrpc":"2.0","method":"messageReceived","params":
  {"subscription": id, "result": <what popMessage returns>}}``.
- ``subscribeMessageStatus(id)`` -> subscription id; ``messageStatus``
  notifications carry the message's ``getMessageInfo`` object each time it
  changes, until it is read, aborted or forgotten.
- ``unsubscribeMessages(id)`` / ``unsubscribeMessageStatus(id)`` -> bool.

Delivery is exactly once while nothing crashes and never lossy when
something does: a subscriber *leases* the next message from msgbus (held,
not removed), writes the notification, and only then acks it (removed, READ
sent to its sender). A write that fails or stalls for ``SEND_TIMEOUT``
releases the message and closes that connection; a lease of a killed apid
lapses (and a restarted apid releases them all at once); a killed msgbus
forgets leases, so its messages are delivered again (at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from a2wsgi import WSGIMiddleware

from . import rpc
from .core import ApiError
from .messages import RPC_BAD_TOPIC_B64, Messages, unb64

log = logging.getLogger("apid.ws")

LEASE_HOLD = 30.0  # seconds msgbus holds a message for a subscriber before others may have it
WAIT = 5.0  # seconds one lease call waits for a message (a worker thread is held meanwhile)
SEND_TIMEOUT = 10.0  # a notification not written by then: the subscriber is too slow, it is closed
RETRY = 0.5  # seconds between lease calls while msgbus does not answer
STATUS_POLL = 0.25  # seconds between status checks of a watched message
FINAL_STATES = ("read", "aborted")
MAX_CONNECTIONS = 64
MAX_SUBSCRIPTIONS = 64  # message subscriptions in all (each waits in a worker thread)
MAX_PER_CONNECTION = 8  # subscriptions of either kind per connection
MAX_IN_FLIGHT = 8  # requests of one connection being answered at once
WS_PING = 20.0

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class Closed(Exception):
    """The WebSocket went away while writing."""


@dataclass(eq=False)
class Subscription:
    id: int
    kind: str  # "messages" or "status"
    arg: Any  # the topic filter (bytes | None) or the watched message id (str)
    task: asyncio.Task[None] | None = None
    active: bool = True
    ready: asyncio.Event = field(default_factory=asyncio.Event)


def notification(method: str, sub: Subscription, result: Any) -> dict[str, Any]:
    """A subscription's notification, as jsonrpsee frames them."""
    return {"jsonrpc": "2.0", "method": method, "params": {"subscription": sub.id, "result": result}}


class RpcServer:
    """What every WebSocket session shares: the registry, msgbus, limits and worker pools."""

    def __init__(self, registry: rpc.RpcRegistry, http_app: Any, messages: Messages, http_threads: int) -> None:
        self.registry = registry
        self.messages = messages
        self.http = WSGIMiddleware(http_app, workers=http_threads)
        self.calls = ThreadPoolExecutor(MAX_CONNECTIONS // 4, thread_name_prefix="ws-call")
        self.waits = ThreadPoolExecutor(MAX_SUBSCRIPTIONS, thread_name_prefix="ws-wait")
        self.connections = 0
        self.message_subscriptions = 0
        self.counters: dict[str, int] = {
            "ws_connections": 0,
            "ws_refused": 0,
            "ws_pushed": 0,
            "ws_push_failed": 0,
            "ws_ack_stale": 0,
        }

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)  # type: ignore[arg-type]  # plain-dict ASGI types; a2wsgi declares TypedDicts
        elif scope["type"] == "websocket":
            await WsSession(self, receive, send).run()

    def release_stale_leases(self) -> None:
        """A restarted apid frees what its predecessor held (retried while msgbus starts)."""
        for _ in range(20):
            try:
                released = self.messages.release_all()
            except ApiError:
                threading.Event().wait(RETRY)
                continue
            if released:
                log.info("released %d message(s) held by an earlier apid", released)
            return


class WsSession:
    """One WebSocket connection: requests in, answers and notifications out."""

    def __init__(self, server: RpcServer, receive: Receive, send: Send) -> None:
        self.server = server
        self.receive = receive
        self._send = send
        self.send_lock = asyncio.Lock()
        self.in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self.subs: dict[int, Subscription] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False
        self.local = rpc.RpcRegistry()
        self.local.add("subscribeMessages", self.subscribe_messages, rpc.Param("topic", rpc.string, required=False))
        self.local.add("unsubscribeMessages", self.unsubscribe("messages"), rpc.Param("subscription", rpc.u64))
        self.local.add("subscribeMessageStatus", self.subscribe_status, rpc.Param("id", rpc.string))
        self.local.add("unsubscribeMessageStatus", self.unsubscribe("status"), rpc.Param("subscription", rpc.u64))

    # --- connection ----------------------------------------------------------

    async def run(self) -> None:
        first = await self.receive()
        if first["type"] != "websocket.connect":
            return
        server = self.server
        if server.connections >= MAX_CONNECTIONS:
            server.counters["ws_refused"] += 1
            await self._send({"type": "websocket.close", "code": 1013})  # try again later
            return
        server.connections += 1
        server.counters["ws_connections"] += 1
        try:
            await self._send({"type": "websocket.accept"})
            while True:
                event = await self.receive()
                if event["type"] == "websocket.disconnect":
                    break
                text = event.get("text")
                if text is None:
                    text = (event.get("bytes") or b"").decode("utf-8", "replace")
                await self.in_flight.acquire()
                self._spawn(self.answer(text))
        finally:
            self.closed = True
            server.connections -= 1
            for sub in list(self.subs.values()):
                self._drop(sub)
            for task in list(self.tasks):
                task.cancel()

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("WebSocket task failed", exc_info=task.exception())

    async def send_json(self, doc: Any) -> None:
        if self.closed:
            raise Closed()
        text = json.dumps(doc, separators=(",", ":"))
        async with self.send_lock:
            try:
                await self._send({"type": "websocket.send", "text": text})
            except (OSError, RuntimeError) as exc:  # uvicorn: the client went away mid-write
                self.closed = True
                raise Closed() from exc

    async def close(self, code: int) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError, RuntimeError):
                await self._send({"type": "websocket.close", "code": code})

    # --- requests ------------------------------------------------------------

    async def answer(self, text: str) -> None:
        try:
            doc, error = self.server.registry.parse(text.encode("utf-8"))
            if error is not None:
                reply: Any = error
            elif isinstance(doc, list):
                answers = [a for a in await asyncio.gather(*(self.handle(item) for item in doc)) if a is not None]
                reply = answers or None
            else:
                reply = await self.handle(doc)
            if reply is not None:
                with contextlib.suppress(Closed):
                    await self.send_json(reply)
        finally:
            self.in_flight.release()
        for sub in self.subs.values():
            sub.ready.set()  # a subscription's first notification follows its answer

    async def handle(self, req: Any) -> dict[str, Any] | None:
        method = req.get("method") if isinstance(req, dict) else None
        if isinstance(method, str) and method in self.local.methods:
            return self.local.handle(req)  # quick and in the loop: it only starts or stops a task
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.server.calls, self.server.registry.handle, req)

    # --- subscriptions ---------------------------------------------------------

    def _new(self, kind: str, arg: Any) -> Subscription:
        if len(self.subs) >= MAX_PER_CONNECTION:
            raise ApiError(429, rpc.RPC_INTERNAL_ERROR, f"at most {MAX_PER_CONNECTION} subscriptions per connection")
        sub_id = secrets.randbits(53)  # a JSON number every client reads exactly
        sub = Subscription(sub_id, kind, arg)
        self.subs[sub_id] = sub
        return sub

    def subscribe_messages(self, topic: str | None) -> int:
        wanted = None if topic is None else unb64(topic, RPC_BAD_TOPIC_B64, "topic")
        if self.server.message_subscriptions >= MAX_SUBSCRIPTIONS:
            raise ApiError(503, rpc.RPC_INTERNAL_ERROR, f"this node serves at most {MAX_SUBSCRIPTIONS} subscriptions")
        sub = self._new("messages", wanted)
        self.server.message_subscriptions += 1
        sub.task = self._spawn(self.push_messages(sub))
        return sub.id

    def subscribe_status(self, msg_id: str) -> int:
        self.server.messages.status(msg_id)  # unknown id or bad syntax: the error getMessageInfo gives
        sub = self._new("status", msg_id)
        sub.task = self._spawn(self.push_status(sub))
        return sub.id

    def unsubscribe(self, kind: str) -> Callable[[int], bool]:
        def stop(sub_id: int) -> bool:
            sub = self.subs.get(sub_id)
            if sub is None or sub.kind != kind:
                return False
            self._drop(sub)
            return True

        return stop

    def _drop(self, sub: Subscription) -> None:
        if not sub.active:
            return
        sub.active = False
        self.subs.pop(sub.id, None)
        if sub.kind == "messages":
            self.server.message_subscriptions -= 1
        if sub.task is not None:
            sub.task.cancel()

    def _lease(self, sub: Subscription) -> tuple[dict[str, Any], int, int] | None:
        """In a worker thread: the next message, or None; never one that nobody will ack."""
        messages = self.server.messages
        got = messages.lease(sub.arg, WAIT, LEASE_HOLD)
        if got is not None and (self.closed or not sub.active):
            with contextlib.suppress(ApiError):
                messages.release(got[1], got[2])
            return None
        return got

    async def push_messages(self, sub: Subscription) -> None:
        loop = asyncio.get_running_loop()
        server = self.server
        await sub.ready.wait()
        while sub.active and not self.closed:
            try:
                got = await loop.run_in_executor(server.waits, self._lease, sub)
            except ApiError:  # msgbus away (restarting): try again shortly
                await asyncio.sleep(RETRY)
                continue
            if got is None:
                continue
            message, seq, lease = got
            note = {
                "jsonrpc": "2.0",
                "method": "messageReceived",
                "params": {"subscription": sub.id, "result": message},
            }
            try:
                await asyncio.wait_for(self.send_json(note), SEND_TIMEOUT)
            except (Closed, TimeoutError, asyncio.CancelledError) as exc:
                server.counters["ws_push_failed"] += 1
                await loop.run_in_executor(server.calls, self._give_back, seq, lease)
                if isinstance(exc, TimeoutError):
                    log.warning("subscriber too slow (nothing written for %.0f s): closing it", SEND_TIMEOUT)
                    await self.close(1008)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            server.counters["ws_pushed"] += 1
            try:
                acked = await loop.run_in_executor(server.calls, server.messages.ack, seq, lease)
            except ApiError:
                acked = False
            if not acked:  # msgbus restarted or the lease lapsed: it may come again (at least once)
                server.counters["ws_ack_stale"] += 1

    def _give_back(self, seq: int, lease: int) -> None:
        with contextlib.suppress(ApiError):
            self.server.messages.release(seq, lease)

    async def push_status(self, sub: Subscription) -> None:
        loop = asyncio.get_running_loop()
        await sub.ready.wait()
        last: Any = None
        while sub.active and not self.closed:
            try:
                info = await loop.run_in_executor(self.server.calls, self.server.messages.status, sub.arg)
            except ApiError as exc:
                if exc.http_status == 404:  # forgotten: nothing will change any more
                    return
                info = last
            if info != last:
                try:
                    await asyncio.wait_for(self.send_json(notification("messageStatus", sub, info)), SEND_TIMEOUT)
                except (Closed, TimeoutError):
                    return
                last = info
                if isinstance(info, dict) and info.get("state") in FINAL_STATES:
                    return
            await asyncio.sleep(STATUS_POLL)


class RpcUvicorn(uvicorn.Server):
    """uvicorn's server with its housekeeping loop turning once a second,
    not ten times (the Date header still changes every second): that loop
    was most of an idle apid's wake-ups. Its only other job, noticing
    ``should_exit``, does not need speed here: apid exits its process."""

    async def main_loop(self) -> None:
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 10) % 864000  # on_tick's "once a second" is every tenth count
            await asyncio.sleep(1.0)
            should_exit = await self.on_tick(counter)


def serve_rpc(
    name: str, host: str, port: int, registry: rpc.RpcRegistry, http_app: Any, messages: Messages, threads: int
) -> tuple[RpcUvicorn, RpcServer]:
    """Bind now (so a taken port is reported at once, as before) and serve in a thread."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    app = RpcServer(registry, http_app, messages, threads)
    config = uvicorn.Config(
        app,
        http="h11",
        ws="websockets-sansio",
        lifespan="off",
        log_level="error",
        access_log=False,
        server_header=False,
        limit_concurrency=200,
        timeout_keep_alive=30,
        ws_max_size=rpc.MAX_WS_FRAME,
        ws_ping_interval=WS_PING,
        ws_ping_timeout=WS_PING,
    )
    server = RpcUvicorn(config)
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=name, daemon=True).start()
    threading.Thread(target=app.release_stale_leases, name="ws-release", daemon=True).start()
    return server, app
