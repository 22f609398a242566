"""`mycelium message send|receive` (API.md 4.2), clients of a running node's
message API."""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import sys
import time
import urllib.parse
from typing import Any

from common.identity import IdentityError, parse_public_key
from common.wire.rules import is_overlay_address

from .client import Client, ClientError

ONE_YEAR = 365 * 24 * 3600
MAX_TOPIC = 255


def _destination(text: str) -> dict[str, str]:
    if len(text) == 64:
        try:
            parse_public_key(text)
            return {"pk": text.lower()}
        except IdentityError:
            pass
    try:
        ip = ipaddress.ip_address(text)
    except ValueError as exc:
        raise ClientError(f"destination {text!r} is neither a 64-hex public key nor an IPv6 address") from exc
    if not is_overlay_address(ip):
        raise ClientError(f"destination {text} is not an overlay address (400::/7)")
    return {"ip": str(ip)}


def _topic(text: str | None) -> bytes | None:
    if text is None:
        return None
    topic = text.encode()
    if len(topic) > MAX_TOPIC:
        raise ClientError(f"topic is {len(topic)} bytes; at most {MAX_TOPIC} are allowed")
    return topic


def _payload(args: argparse.Namespace) -> bytes:
    if args.msg_path:
        try:
            with open(args.msg_path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise ClientError(f"cannot read {args.msg_path}: {exc.strerror}") from exc
    if args.message is not None:
        return str(args.message).encode()
    if sys.stdin is None or sys.stdin.isatty():
        raise ClientError("no message given: pass MESSAGE, --msg-path FILE, or pipe it on stdin")
    return sys.stdin.buffer.read()


def _readable(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(data).decode()


def _show(message: dict[str, Any]) -> dict[str, Any]:
    """The received message with payload and topic as text where they are UTF-8."""
    out = dict(message)
    out["payload"] = _readable(base64.b64decode(message.get("payload", "")))
    if "topic" in message:
        out["topic"] = _readable(base64.b64decode(message["topic"]))
    return out


def send(client: Client, args: argparse.Namespace) -> int:
    if args.reply_to and args.wait:
        raise ClientError("--reply-to cannot be combined with --wait")
    body: dict[str, Any] = {"dst": _destination(args.destination), "payload": base64.b64encode(_payload(args)).decode()}
    topic = _topic(args.topic)
    if topic is not None:
        body["topic"] = base64.b64encode(topic).decode()
    if args.reply_to:
        client.request("POST", f"/api/v1/messages/reply/{urllib.parse.quote(args.reply_to, safe='')}", body)
        return 0
    path = "/api/v1/messages"
    if args.wait:
        wait = args.timeout if args.timeout is not None else ONE_YEAR
        path += f"?reply_timeout={wait}"
        client.timeout = wait + 30
    try:
        status, raw = client.request("POST", path, body)
    except ClientError as exc:
        if " 408 " in f" {exc} ":
            print("no reply within the timeout", file=sys.stderr)
            return 1
        raise
    doc = json.loads(raw)
    print(json.dumps(_show(doc) if status == 200 else doc))
    return 0


def _deliver(message: dict[str, Any], args: argparse.Namespace) -> None:
    payload = base64.b64decode(message.get("payload", ""))
    if args.msg_path:
        try:
            with open(args.msg_path, "wb") as f:
                f.write(payload)
        except OSError as exc:
            raise ClientError(f"cannot write {args.msg_path}: {exc.strerror}") from exc
    if args.raw:
        sys.stdout.buffer.write(payload)
        sys.stdout.flush()
    else:
        print(json.dumps(_show(message)), flush=True)


def follow(args: argparse.Namespace) -> int:
    """Messages pushed over the JSON-RPC port's WebSocket (``subscribeMessages``) until
    ``--count`` arrived or ``--timeout`` passed; reconnects when the node's API restarts."""
    from websockets.exceptions import ConnectionClosed, InvalidHandshake
    from websockets.sync.client import connect

    url = f"ws://{args.jsonrpc_addr}/"
    topic = _topic(args.topic)
    params = [] if topic is None else [base64.b64encode(topic).decode()]
    deadline = time.monotonic() + (args.timeout if args.timeout is not None else ONE_YEAR)
    received = 0
    while time.monotonic() < deadline:
        try:
            with connect(url, open_timeout=5, close_timeout=1) as ws:
                ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "subscribeMessages", "params": params}))
                while args.count is None or received < args.count:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return 0
                    try:
                        doc = json.loads(ws.recv(timeout=left))
                    except TimeoutError:
                        return 0
                    if doc.get("id") == 1 and "error" in doc:
                        raise ClientError(f"the node refused the subscription: {doc['error'].get('message')}")
                    if doc.get("method") == "messageReceived":
                        _deliver(doc["params"]["result"], args)
                        received += 1
                return 0
        except (OSError, ConnectionClosed, InvalidHandshake) as exc:
            print(f"lost the node's JSON-RPC API at {url} ({exc}); reconnecting", file=sys.stderr)
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    return 0


def receive(client: Client, args: argparse.Namespace) -> int:
    if args.follow:
        return follow(args)
    timeout = args.timeout if args.timeout is not None else ONE_YEAR
    query: dict[str, str] = {"timeout": str(timeout)}
    topic = _topic(args.topic)
    if topic is not None:
        query["topic"] = base64.b64encode(topic).decode()
    client.timeout = timeout + 30
    status, raw = client.request("GET", "/api/v1/messages?" + urllib.parse.urlencode(query))
    if status == 204 or not raw:
        return 0
    _deliver(json.loads(raw), args)
    return 0


def _count(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _seconds(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds")
    return int(text)


def add_message_commands(sub: Any, parent: argparse.ArgumentParser, kw: dict[str, Any]) -> None:
    p_msg = sub.add_parser("message", help="send or receive messages through the node", parents=[parent])
    msg_sub = p_msg.add_subparsers(dest="message_command", required=True, metavar="{send,receive}", **kw)

    p = msg_sub.add_parser("send", help="send a message", parents=[parent])
    p.add_argument("destination", help="the receiver's public key (64 hex) or overlay IPv6 address")
    p.add_argument("message", nargs="?", help="the message text (else --msg-path, else stdin)")
    p.add_argument("-w", "--wait", action="store_true", help="wait for a reply and print it")
    p.add_argument("--timeout", type=_seconds, help="seconds to wait for the reply (default: one year)")
    p.add_argument("-t", "--topic", help="topic (at most 255 bytes)")
    p.add_argument("--msg-path", help="read the message from this file")
    p.add_argument("--reply-to", metavar="ID", help="send as the reply to message ID")
    p.set_defaults(client_handler=send)

    p = msg_sub.add_parser("receive", help="wait for a message and print it", parents=[parent])
    p.add_argument("--timeout", type=_seconds, help="seconds to wait (default: one year)")
    p.add_argument("-t", "--topic", help="only a message with exactly this topic")
    p.add_argument("--msg-path", help="also write the payload to this file")
    p.add_argument("--raw", action="store_true", help="print only the payload bytes")
    p.add_argument(
        "-f", "--follow", action="store_true", help="keep receiving: messages are pushed over the JSON-RPC WebSocket"
    )
    p.add_argument("--count", type=_count, help="with --follow: stop after this many messages")
    p.add_argument(
        "--jsonrpc-addr",
        default="127.0.0.1:8990",
        metavar="ADDR:PORT",
        help="with --follow: the node's JSON-RPC address (default 127.0.0.1:8990)",
    )
    p.set_defaults(client_handler=receive)
