"""Fuzz targets: every decoder of common/wire, the message engine's
receive path, the router engine's TLV input and apid's JSON handlers.

``run_one(data)`` takes one input; its first byte picks the target. An
input that makes a target raise anything but the error that target
documents for bad input (``CodecError`` for decoders) is a finding.
Shared by ``fuzz/run.py`` (atheris, coverage-guided) and the short run
in the test suite; seeds come from tests/data/vectors.json (``seeds()``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import random
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from common import bus
from common.identity import Identity, make_router_id
from common.nodeconfig import NodeConfig
from common.wire.beacon import Beacon
from common.wire.errors import CodecError
from common.wire.icmp import parse_oob_icmp
from common.wire.inner import split_inner
from common.wire.message import decode_message, encode_message
from common.wire.packet import ControlPacket, DataPacket, StreamDecoder, decode_packet
from common.wire.tlv import decode_tlv
from services.apid.app import create_app
from services.apid.context import ApiContext
from services.apid.core import NodeApi
from services.apid.extensions import register_all
from services.apid.messages import Messages
from services.apid.rpc import RpcRegistry, register_node_methods
from services.apid.websocket import MAX_IN_FLIGHT, RpcServer, WsSession
from services.msgbus.engine import MessageEngine
from services.router.engine import PeerInfo, RouterEngine

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "tests" / "data" / "vectors.json"


class Finding(Exception):
    """A target handled an input in a way it must not (a swallowed bug)."""


class _RaiseOnLoggedBug(logging.Handler):
    """apid turns a handler's unexpected exception into a logged 500 / internal
    error; under fuzzing that is a finding, so make it raise."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []  # kept too: a raise inside an asyncio task or callback is swallowed

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.levelno >= logging.ERROR:
            self.seen.append(f"{record.getMessage()}: {record.exc_info[1]!r}")
            raise Finding(self.seen[-1])


# --- decoders ---------------------------------------------------------------------


def t_packet(data: bytes) -> None:
    try:
        pkt = decode_packet(data)
    except CodecError:
        return
    again = pkt.encode()
    if isinstance(pkt, DataPacket) and again != data[:2] + bytes(3) + data[5:]:  # reserved bytes: zero on encode
        raise Finding("a data packet does not re-encode to its bytes")


def t_stream(data: bytes) -> None:
    """StreamDecoder fed the same bytes in arbitrary chunks must give what one feed gives."""
    if len(data) < 2:
        return
    cuts = sorted({b * len(data) // 256 for b in data[:8]})
    body = data[8:]
    whole = StreamDecoder()
    try:
        expected = [p.encode() for p in whole.feed(body)]
    except CodecError:
        expected = None
    split = StreamDecoder()
    got: list[bytes] = []
    try:
        last = 0
        for cut in [*(c for c in cuts if c <= len(body)), len(body)]:
            got += [p.encode() for p in split.feed(body[last:cut])]
            last = cut
    except CodecError:
        if expected is not None:
            raise Finding("chunked feed failed where one feed did not") from None
        return
    if expected is not None and got != expected:
        raise Finding("chunked feed gave other packets than one feed")
    if split.buffered > 65_535 + 40 + len(body):
        raise Finding("stream decoder buffer grew beyond one packet")
    buf = bytearray(body)
    try:
        StreamDecoder().cut(buf, len(buf))
    except CodecError:
        pass


def t_tlv(data: bytes) -> None:
    if not data:
        return
    try:
        tlv = decode_tlv(data[0], data[1:])
    except CodecError:
        return
    try:
        ControlPacket(tlv).encode()
    except CodecError:
        pass  # e.g. a decoded TLV longer than one control packet carries


def t_message(data: bytes) -> None:
    try:
        pkt = decode_message(data)
    except CodecError:
        return
    encode_message(pkt)


def t_beacon(data: bytes) -> None:
    try:
        b = Beacon.decode(data)
    except CodecError:
        return
    if b.encode() != data:
        raise Finding("a beacon does not re-encode to its bytes")


def t_inner(data: bytes) -> None:
    try:
        split_inner(data)
    except CodecError:
        pass
    try:
        parse_oob_icmp(data)
    except CodecError:
        pass


# --- engines (persistent: state builds up across inputs, limits keep it bounded) ----


class Engines:
    def __init__(self) -> None:
        self.rng = random.Random(1)
        self.now = 1000.0
        self.count = 0
        self.own = bytes.fromhex("04" + "11" * 15)
        self.msg = MessageEngine(self.own, self.now, wall_now=1_700_000_000.0, rng=random.Random(2))
        identity = Identity.from_secret(bytes(range(32)))
        self.router = RouterEngine(identity.public_key, make_router_id(identity.public_key), self.now)
        self.peers = ["tcp-a-1", "tcp-b-2", "quic-c-3"]
        for i, p in enumerate(self.peers):
            self.router.peer_up(PeerInfo(p, 10 + i, p), self.now)

    def tick(self) -> None:
        self.now += 0.05
        self.count += 1
        if self.count % 64 == 0:  # let timers run now and then
            self.now += 5.0
        for engine in (self.msg, self.router):
            timer = engine.get_timer()
            if timer is not None and timer <= self.now:
                engine.handle_timer(self.now)
        self.msg.packets_to_send()
        list(self.msg.events())
        self.router.tlvs_to_send()
        self.router.fib_changes()
        self.router.peers_to_close()


_engines: Engines | None = None


def engines() -> Engines:
    global _engines
    if _engines is None or _engines.count > 20_000:  # a fresh state now and then
        _engines = Engines()
    return _engines


def t_message_engine(data: bytes) -> None:
    e = engines()
    src = bytes((4, data[0] if data else 0)) + bytes(14)
    try:
        pkt = decode_message(data[1:])
    except CodecError:
        e.msg.receive(src, e.own, bytes(data[1:]), e.now)  # raw bytes: the engine decodes and counts
        e.tick()
        return
    e.msg.receive(src, e.own, pkt, e.now)
    e.tick()


def t_router_engine(data: bytes) -> None:
    if len(data) < 2:
        return
    e = engines()
    try:
        tlv = decode_tlv(data[1], data[2:])
    except CodecError:
        return
    e.router.receive_tlv(e.peers[data[0] % len(e.peers)], tlv, e.now)
    if data[0] & 0x80:
        e.router.request_route(ipaddress.IPv6Address(bytes((4,)) + bytes(data[2:17]).ljust(15, b"\0")), e.now)
    e.tick()


# --- apid JSON handlers -------------------------------------------------------------


def _down(service: str, method: str, params: dict[str, Any] | None = None, timeout_ms: int = 0) -> Any:
    """The bus with every service down: apid must answer 503, never fail."""
    raise bus.BusError(f"{service} is not running")


class Api:
    def __init__(self) -> None:
        cfg = NodeConfig(run_dir="/nonexistent", key_file="/nonexistent/key")
        identity = Identity.from_secret(bytes(range(32)))
        api = NodeApi(cfg, identity, _down)
        self.http = create_app(api, None, None, dashboard=False)
        self.registry = RpcRegistry()
        register_node_methods(self.registry, api)
        register_all(ApiContext(cfg, identity, api, _down, self.http, self.registry))
        self.client = self.http.test_client()
        self.routes = sorted(
            (str(r.rule), sorted(m for m in (r.methods or ()) if m in ("GET", "POST", "PUT", "DELETE")))
            for r in self.http.url_map.iter_rules()
            if not str(r.rule).startswith(("/static", "/dashboard"))
        )
        self.ws = RpcServer(self.registry, self.http, Messages(_down), http_threads=1)
        self.bug_handler = _RaiseOnLoggedBug()
        logging.getLogger("apid").addHandler(self.bug_handler)  # apid's loggers are apid.*

    def close(self) -> None:
        """Detach the handler (for in-process use, e.g. the test suite)."""
        logging.getLogger("apid").removeHandler(self.bug_handler)
        self.ws.calls.shutdown(wait=False, cancel_futures=True)
        self.ws.waits.shutdown(wait=False, cancel_futures=True)


_api: Api | None = None


def api() -> Api:
    global _api
    if _api is None:
        _api = Api()
    return _api


def reset() -> None:
    """Drop the persistent engines and the API (and its log handler)."""
    global _api, _engines
    if _api is not None:
        _api.close()
    _api = _engines = None


def t_rpc(data: bytes) -> None:
    api().registry.dispatch(data)


def t_http(data: bytes) -> None:
    a = api()
    if len(data) < 3:
        return
    rule, methods = a.routes[data[0] % len(a.routes)]
    method = methods[data[1] % len(methods)] if methods else "GET"
    body = data[3:]
    # fill the path's variables with bytes of the input
    path, i = [], 0
    for part in rule.split("/"):
        if part.startswith("<"):
            seg = body[i : i + 1 + data[2] % 40].decode("latin-1")
            i += len(seg)
            path.append("".join(c if c.isalnum() or c in ":.-_=+" else f"%{ord(c):02X}" for c in seg) or "x")
        else:
            path.append(part)
    response = a.client.open("/".join(path), method=method, data=body[i:], content_type="application/json")
    if response.status_code >= 500 and response.status_code != 503:
        raise Finding(f"{method} {rule} answered {response.status_code}")


async def _ws_session(server: RpcServer, frames: list[bytes]) -> list[str]:
    """One WebSocket connection sending ``frames`` (text or binary by their
    first byte), waiting for every answer, then leaving; what apid sent."""
    events: list[dict[str, Any]] = [{"type": "websocket.connect"}]
    for frame in frames:
        if frame[:1] == b"\x00":
            events.append({"type": "websocket.receive", "bytes": frame[1:]})
        else:
            events.append({"type": "websocket.receive", "text": frame.decode("utf-8", "replace")})
    sent: list[str] = []
    problems: list[str] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: problems.append(str(ctx.get("message"))))
    session: WsSession

    async def receive() -> dict[str, Any]:
        if events:
            return events.pop(0)
        for _ in range(MAX_IN_FLIGHT):  # every request answered before the client goes
            await asyncio.wait_for(session.in_flight.acquire(), 10)
        return {"type": "websocket.disconnect"}

    async def send(event: dict[str, Any]) -> None:
        if event["type"] == "websocket.send":
            sent.append(event["text"])

    session = WsSession(server, receive, send)
    await session.run()
    await asyncio.sleep(0)  # the cancelled subscription tasks finish
    if problems or session.subs or server.connections:
        raise Finding(f"WebSocket session left {problems} {session.subs} {server.connections} connections")
    return sent


def t_ws(data: bytes) -> None:
    """Frames on apid's WebSocket port, msgbus down: every frame gets a JSON-RPC
    answer or nothing (a notification), no task fails, nothing is left behind."""
    a = api()
    frames = [f for f in data.split(b"\n")[:12] if f]
    a.bug_handler.seen.clear()
    sent = asyncio.run(_ws_session(a.ws, frames))
    if a.bug_handler.seen:
        raise Finding(f"apid logged {a.bug_handler.seen[0]}")
    for text in sent:
        doc = json.loads(text)
        for item in doc if isinstance(doc, list) else [doc]:
            if item.get("jsonrpc") != "2.0" or ("error" in item) == ("result" in item):
                raise Finding(f"not a JSON-RPC answer: {text[:200]}")
            error = item.get("error") or {}
            if error.get("code") == -32603 and "is not running" not in str(error.get("data")):
                raise Finding(f"internal error: {text[:200]}")  # only msgbus being down may give one


TARGETS: list[tuple[str, Callable[[bytes], None]]] = [
    ("packet", t_packet),
    ("stream", t_stream),
    ("tlv", t_tlv),
    ("message", t_message),
    ("beacon", t_beacon),
    ("inner", t_inner),
    ("message_engine", t_message_engine),
    ("router_engine", t_router_engine),
    ("rpc", t_rpc),
    ("http", t_http),
    ("ws", t_ws),
]


def run_one(data: bytes) -> None:
    if not data:
        return
    TARGETS[data[0] % len(TARGETS)][1](data[1:])


def target_index(name: str) -> int:
    return next(i for i, (n, _) in enumerate(TARGETS) if n == name)


def seeds() -> Iterator[bytes]:
    """Valid inputs for every target, from the spec vectors and a few hand-made ones."""
    vectors = json.loads(VECTORS.read_text())["vectors"]
    sel = {name: bytes((i,)) for i, (name, _) in enumerate(TARGETS)}
    for v in vectors:
        raw = bytes.fromhex(v["hex"]) if isinstance(v.get("hex"), str) else b""
        group = v["group"]
        if group in ("control_packet_frame", "data_packet_frame"):
            yield sel["packet"] + raw
            yield sel["stream"] + bytes(range(0, 256, 37)) + raw + raw
        elif group == "babel_tlv_body" and isinstance(v.get("tlv_type"), int):
            body = bytes((v["tlv_type"],)) + raw
            yield sel["tlv"] + body
            yield sel["router_engine"] + b"\x01" + body
        elif group in ("message_header", "message_body_field", "message_plaintext"):
            yield sel["message"] + raw
            yield sel["message_engine"] + b"\x07" + raw
        elif group == "discovery_beacon":
            yield sel["beacon"] + raw
        elif group == "oob_icmp":
            yield sel["inner"] + raw
    yield sel["rpc"] + b'{"jsonrpc":"2.0","id":1,"method":"getInfo","params":[]}'
    push = b'{"message":{"dst":{"ip":"400::1"},"payload":"aGk="}}'
    yield sel["rpc"] + b'[{"jsonrpc":"2.0","id":2,"method":"pushMessage","params":' + push + b"}]"
    yield sel["http"] + b"\x00\x01\x05" + b'{"dst":{"pk":"' + b"ab" * 32 + b'"},"payload":"aGk="}'
    yield sel["inner"] + struct.pack("!BBxx", 1, 2) + bytes(60)
    sub = b'{"jsonrpc":"2.0","id":3,"method":"subscribeMessages","params":["dA=="]}'
    yield sel["ws"] + sub + b'\n{"jsonrpc":"2.0","id":4,"method":"unsubscribeMessages","params":[1]}'
    yield sel["ws"] + b'{"jsonrpc":"2.0","id":7,"method":["subscribeMessages"]}'  # once a TypeError in apid
    yield sel["ws"] + b'[{"jsonrpc":"2.0","id":5,"method":"subscribeMessageStatus","params":["0011223344556677"]}]'
    yield sel["ws"] + b'\x00{"jsonrpc":"2.0","id":6,"method":"getInfo","params":[]}\n{"jsonrpc":"2.0","method":"x"}'
