"""Message and topic operations (API.md 2.3, 2.4 and the message methods of
section 3), one implementation for HTTP and JSON-RPC.

Waits (a pop with a timeout, a push waiting for its reply) are carried out
as a series of bus calls of at most ``SLICE`` seconds each, so a client's
one-year ``--wait`` never holds a bus socket for long and a msgbus restart
costs one slice, not the whole wait.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from typing import Any

from flask import Response, request

from common import bus
from common.identity import IdentityError, address_of, parse_public_key
from common.wire.rules import is_overlay_address

from . import rpc
from .app import json_body, json_response
from .context import ApiContext
from .core import ApiError, Unavailable, parse_ip

SLICE = 50.0  # seconds per bus call while waiting (msgbus answers parked calls at least this often)
MAX_TOPIC_LEN = 255

RPC_BAD_TOPIC_B64 = -32013
RPC_TOPIC_TOO_LONG = -32015
RPC_PUSH_INTERNAL = -32016
RPC_BAD_REPLY_ID = -32018
RPC_MESSAGE_NOT_FOUND = -32019
RPC_BAD_MESSAGE_ID = -32020
RPC_BAD_TOPIC = -32021
RPC_BAD_SUBNET = -32023
RPC_TOPIC_NOT_CONFIGURED = -32030


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: Any, code: int, what: str) -> bytes:
    if not isinstance(text, str):
        raise ApiError(400, code, f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, code, f"{what} is not valid base64: {exc}") from exc


def message_id(text: Any, code: int) -> bytes:
    if not isinstance(text, str) or len(text) != 16:
        raise ApiError(400, code, "message id must be 16 hex characters")
    try:
        return bytes.fromhex(text)
    except ValueError as exc:
        raise ApiError(400, code, "message id must be 16 hex characters") from exc


def send_info_shape(value: Any) -> str | None:
    """serde's view of MessageSendInfo: dst {ip|pk}, topic optional, payload required."""
    if not isinstance(value, dict):
        return "invalid type: expected struct MessageSendInfo"
    dst = value.get("dst")
    if not isinstance(dst, dict) or len([k for k in ("ip", "pk") if k in dst]) != 1:
        return "dst: expected exactly one of `ip` or `pk`"
    if not all(isinstance(v, str) for v in dst.values()):
        return "dst: invalid type, expected a string"
    if "payload" not in value:
        return "missing field `payload`"
    if not isinstance(value["payload"], str):
        return "payload: invalid type, expected a string"
    if value.get("topic") is not None and not isinstance(value["topic"], str):
        return "topic: invalid type, expected a string"
    return None


class Messages:
    def __init__(self, call: Callable[..., Any]) -> None:
        self.call = call

    def _call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 2.0) -> Any:
        try:
            result = self.call("msgbus", method, params, timeout_ms=int(timeout * 1000))
        except bus.BusError as exc:
            raise Unavailable(str(exc)) from exc
        if isinstance(result, dict) and "error" in result:
            # a store failure is the reference's 500 (internal); a full outbox or too many waits 503
            status = {"full": 503, "busy": 503, "storage": 500}.get(result["error"], 400)
            raise ApiError(status, RPC_PUSH_INTERNAL, str(result.get("message", result["error"])))
        return result

    # --- sending -----------------------------------------------------------

    def _destination(self, dst: dict[str, str]) -> bytes:
        if "pk" in dst:
            try:
                return address_of(parse_public_key(dst["pk"])).packed
            except IdentityError as exc:
                raise ApiError(400, RPC_PUSH_INTERNAL, str(exc)) from exc
        try:
            ip = parse_ip(dst["ip"])
        except ValueError as exc:
            raise ApiError(400, RPC_PUSH_INTERNAL, f"invalid destination address {dst['ip']!r}") from exc
        if not is_overlay_address(ip):
            raise ApiError(400, RPC_PUSH_INTERNAL, f"destination {ip} is not an overlay address (400::/7)")
        return ip.packed

    def _outgoing(self, message: dict[str, Any], with_topic: bool) -> dict[str, Any]:
        reason = send_info_shape(message)
        if reason is not None:
            raise ApiError(422, rpc.RPC_INVALID_PARAMS, reason)
        topic = b""
        if with_topic and message.get("topic") is not None:
            topic = unb64(message["topic"], RPC_TOPIC_TOO_LONG, "topic")
            if len(topic) > MAX_TOPIC_LEN:
                raise ApiError(400, RPC_TOPIC_TOO_LONG, f"topic of {len(topic)} bytes is longer than 255")
        payload = unb64(message["payload"], RPC_PUSH_INTERNAL, "payload")
        return {"dst": self._destination(message["dst"]), "topic": topic, "payload": payload}

    def push(self, message: dict[str, Any], reply_timeout: int | None) -> tuple[str, dict[str, Any]]:
        """("sent", {"id"}) | ("reply", MessageReceiveInfo) | ("timeout", {"id"})."""
        params = self._outgoing(message, with_topic=True)
        if reply_timeout is None:
            return "sent", {"id": self._call("push", params)["id"]}
        params["reply_timeout"] = reply_timeout
        result = self._call("push", params, timeout=SLICE + 10)
        while result.get("pending"):
            result = self._call("wait_reply", {"id": bytes.fromhex(result["id"])}, timeout=SLICE + 10)
        if "reply" in result:
            return "reply", result["reply"]
        return "timeout", {"id": result["id"]}

    def reply(self, id_text: Any, message: dict[str, Any]) -> None:
        msg_id = message_id(id_text, RPC_BAD_REPLY_ID)
        params = self._outgoing(message, with_topic=False)
        self._call("reply", {**params, "id": msg_id})

    # --- receiving ---------------------------------------------------------

    def pop(self, peek: bool, timeout: int, topic: bytes | None) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.0, deadline - time.monotonic())
            wait = min(left, SLICE)
            result = self._call("pop", {"peek": peek, "timeout": wait, "topic": topic}, timeout=wait + 10)
            if result["message"] is not None or left <= SLICE:
                return result["message"]

    def lease(self, topic: bytes | None, wait: float, hold: float) -> tuple[dict[str, Any], int, int] | None:
        """The next message for a push subscriber, held (not removed) for ``hold`` seconds:
        (message, seq, lease) to ``ack`` once delivered or ``release``; None after ``wait``."""
        result = self._call("pop", {"lease": hold, "timeout": wait, "topic": topic}, timeout=wait + 3)
        if result["message"] is None:
            return None
        return result["message"], int(result["seq"]), int(result["lease"])

    def ack(self, seq: int, lease: int) -> bool:
        return bool(self._call("ack", {"seq": seq, "lease": lease})["ok"])

    def release(self, seq: int, lease: int) -> bool:
        return bool(self._call("release", {"seq": seq, "lease": lease})["ok"])

    def release_all(self) -> int:
        """Leases of an earlier apid (it died holding them) lapse now."""
        return int(self._call("release_all")["released"])

    def status(self, id_text: Any) -> dict[str, Any]:
        msg_id = message_id(id_text, RPC_BAD_MESSAGE_ID)
        info = self._call("status", {"id": msg_id})["status"]
        if info is None:
            raise ApiError(404, RPC_MESSAGE_NOT_FOUND, "no message with that id (unknown or forgotten)", "empty")
        return info

    # --- topics ------------------------------------------------------------

    def default_action(self) -> bool:
        return bool(self._call("topics_default")["accept"])

    def set_default_action(self, accept: bool) -> None:
        self._call("topics_default", {"accept": accept})

    def topics(self) -> list[str]:
        return list(self._call("topics_list")["topics"])

    def add_topic(self, topic: bytes) -> None:
        self._topic_call("topic_add", topic)

    def remove_topic(self, topic: bytes) -> None:
        self._topic_call("topic_remove", topic)

    def sources(self, topic: bytes) -> list[str]:
        sources = self._call("sources_list", {"topic": topic})["sources"]
        if sources is None:
            raise ApiError(404, RPC_TOPIC_NOT_CONFIGURED, "topic is not configured", "empty")
        return list(sources)

    def add_source(self, topic: bytes, subnet: str) -> None:
        self._subnet_call("source_add", topic, subnet)

    def remove_source(self, topic: bytes, subnet: str) -> None:
        self._subnet_call("source_remove", topic, subnet)

    def forward_socket(self, topic: bytes) -> str | None:
        return self._call("forward_get", {"topic": topic})["path"]

    def set_forward_socket(self, topic: bytes, path: str) -> None:
        self._call("forward_set", {"topic": topic, "path": path})

    def remove_forward_socket(self, topic: bytes) -> None:
        self._call("forward_remove", {"topic": topic})

    def _topic_call(self, method: str, topic: bytes) -> None:
        if len(topic) > MAX_TOPIC_LEN:
            raise ApiError(400, RPC_BAD_TOPIC, "topic longer than 255 bytes")
        self._call(method, {"topic": topic})

    def _subnet_call(self, method: str, topic: bytes, subnet: str) -> None:
        try:
            self._call(method, {"topic": topic, "subnet": subnet})
        except ApiError as exc:
            if exc.http_status == 400:
                raise ApiError(400, RPC_BAD_SUBNET, exc.message) from exc
            raise


def _query_bool(name: str, default: bool) -> bool:
    value = request.args.get(name)
    if value is None:
        return default
    if value not in ("true", "false"):
        raise ApiError(400, 0, f"query parameter {name} must be true or false", "text")
    return value == "true"


def _query_u64(name: str) -> int | None:
    value = request.args.get(name)
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or int(value) >= 1 << 64:
        raise ApiError(400, 0, f"query parameter {name} must be a non-negative integer", "text")
    return int(value)


def _path_topic(text: str) -> bytes:
    return unb64(text, RPC_BAD_TOPIC, "topic")


def register(ctx: ApiContext) -> None:
    impl = Messages(ctx.call)
    http = ctx.http

    @http.get("/api/v1/messages")
    def pop_message() -> Response:
        topic = request.args.get("topic")
        result = impl.pop(
            _query_bool("peek", False),
            _query_u64("timeout") or 0,
            None if topic is None else unb64(topic, RPC_BAD_TOPIC_B64, "topic"),
        )
        return Response(status=204) if result is None else json_response(result)

    @http.post("/api/v1/messages")
    def push_message() -> Response:
        body = json_body(send_info_shape)
        outcome, value = impl.push(body, _query_u64("reply_timeout"))
        return json_response(value, {"sent": 201, "reply": 200, "timeout": 408}[outcome])

    @http.post("/api/v1/messages/reply/<msg_id>")
    def reply_message(msg_id: str) -> Response:
        impl.reply(msg_id, json_body(send_info_shape))
        return Response(status=204)

    @http.get("/api/v1/messages/status/<msg_id>")
    def message_status(msg_id: str) -> Response:
        return json_response(impl.status(msg_id))

    @http.get("/api/v1/messages/topics/default")
    def get_default() -> Response:
        return json_response({"accept": impl.default_action()})

    @http.put("/api/v1/messages/topics/default")
    def set_default() -> Response:
        body = json_body(lambda v: None if isinstance(v, dict) and isinstance(v.get("accept"), bool) else "accept")
        impl.set_default_action(body["accept"])
        return Response(status=204)

    @http.get("/api/v1/messages/topics")
    def list_topics() -> Response:
        return json_response(impl.topics())

    def _byte_list(value: Any) -> str | None:
        ok = isinstance(value, list) and all(
            isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in value
        )
        return None if ok else "invalid type: expected a sequence of bytes"

    @http.post("/api/v1/messages/topics")
    def add_topic() -> Response:
        impl.add_topic(bytes(json_body(_byte_list)))
        return Response(status=201)

    @http.delete("/api/v1/messages/topics/<path:topic>")
    def remove_topic(topic: str) -> Response:
        if "/" in topic:  # a deeper path with DELETE: sources/<subnet> or forward
            return _delete_nested(topic)
        impl.remove_topic(_path_topic(topic))
        return Response(status=204)

    def _delete_nested(path: str) -> Response:
        topic, _, rest = path.partition("/")
        if rest == "forward":
            impl.remove_forward_socket(_path_topic(topic))
            return Response(status=204)
        if rest.startswith("sources/"):
            impl.remove_source(_path_topic(topic), rest[len("sources/") :])
            return Response(status=204)
        raise ApiError(404, 0, "not found", "empty")

    @http.get("/api/v1/messages/topics/<topic>/sources")
    def get_sources(topic: str) -> Response:
        return json_response(impl.sources(_path_topic(topic)))

    @http.post("/api/v1/messages/topics/<topic>/sources")
    def add_source(topic: str) -> Response:
        t = _path_topic(topic)
        body = json_body(lambda v: None if isinstance(v, dict) and isinstance(v.get("subnet"), str) else "subnet")
        impl.add_source(t, body["subnet"])
        return Response(status=201)

    @http.get("/api/v1/messages/topics/<topic>/forward")
    def get_forward(topic: str) -> Response:
        return json_response(impl.forward_socket(_path_topic(topic)))

    @http.put("/api/v1/messages/topics/<topic>/forward")
    def set_forward(topic: str) -> Response:
        t = _path_topic(topic)
        body = json_body(
            lambda v: None if isinstance(v, dict) and isinstance(v.get("socketPath"), str) else "socketPath"
        )
        impl.set_forward_socket(t, body["socketPath"])
        return Response(status=204)

    # --- JSON-RPC (same implementation) ------------------------------------------

    def rpc_pop(peek: bool | None = None, timeout: int | None = None, topic: str | None = None) -> Any:
        return impl.pop(bool(peek), timeout or 0, None if topic is None else unb64(topic, RPC_BAD_TOPIC_B64, "topic"))

    def rpc_push(message: dict[str, Any], reply_timeout: int | None = None) -> Any:
        return impl.push(message, reply_timeout)[1]

    def rpc_reply(id: str, message: dict[str, Any]) -> bool:
        impl.reply(id, message)
        return True

    def topic_op(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(topic: str, *args: Any) -> Any:
            result = fn(unb64(topic, RPC_BAD_TOPIC, "topic"), *args)
            return True if result is None else result

        return call

    def set_default_rpc(accept: bool) -> bool:
        impl.set_default_action(accept)
        return True

    reg = ctx.rpc
    reg.add(
        "popMessage",
        rpc_pop,
        rpc.Param("peek", rpc.boolean, required=False),
        rpc.Param("timeout", rpc.u64, required=False),
        rpc.Param("topic", rpc.string, required=False),
    )
    reg.add("pushMessage", rpc_push, rpc.Param("message", rpc.obj), rpc.Param("reply_timeout", rpc.u64, required=False))
    reg.add("pushMessageReply", rpc_reply, rpc.Param("id", rpc.string), rpc.Param("message", rpc.obj))
    reg.add("getMessageInfo", impl.status, rpc.Param("id", rpc.string))
    reg.add("getDefaultTopicAction", impl.default_action)
    reg.add("setDefaultTopicAction", set_default_rpc, rpc.Param("accept", rpc.boolean))
    reg.add("getTopics", impl.topics)
    reg.add("addTopic", topic_op(impl.add_topic), rpc.Param("topic", rpc.string))
    reg.add("removeTopic", topic_op(impl.remove_topic), rpc.Param("topic", rpc.string))
    reg.add("getTopicSources", topic_op(impl.sources), rpc.Param("topic", rpc.string))
    reg.add(
        "addTopicSource", topic_op(impl.add_source), rpc.Param("topic", rpc.string), rpc.Param("subnet", rpc.string)
    )
    reg.add(
        "removeTopicSource",
        topic_op(impl.remove_source),
        rpc.Param("topic", rpc.string),
        rpc.Param("subnet", rpc.string),
    )
    reg.add("getTopicForwardSocket", topic_op(impl.forward_socket), rpc.Param("topic", rpc.string))
    reg.add(
        "setTopicForwardSocket",
        topic_op(impl.set_forward_socket),
        rpc.Param("topic", rpc.string),
        rpc.Param("socket_path", rpc.string),
    )
    reg.add("removeTopicForwardSocket", topic_op(impl.remove_forward_socket), rpc.Param("topic", rpc.string))
