"""msgbus request parking (services/msgbus/service.py): a pop that waits
for a message and a push that waits for its reply are parked, not
answered, and answered when the message arrives or their wait ends; the
number parked is bounded. A real MsgbusService on real sockets in a
temporary run directory; requests come from a REQ socket as apid sends them."""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from common import bus
from common.identity import load_or_create_key
from common.nodeconfig import NodeConfig
from services.msgbus import service as msgbus_service
from services.msgbus.engine import MessageEngine
from services.msgbus.service import MsgbusService

from .test_msgbus_helpers import ip


@pytest.fixture
def svc() -> Iterator[MsgbusService]:
    with tempfile.TemporaryDirectory(prefix="mb", dir="/tmp") as run:
        key = Path(run) / "key.bin"
        load_or_create_key(key)
        service = MsgbusService(NodeConfig(run_dir=run, key_file=str(key)))
        yield service
        service.store.close()
        service.pool.shutdown(wait=False)
        service.ctx.destroy(linger=0)


class Client:
    """One REQ socket per request, as bus.rpc_call uses."""

    def __init__(self, svc: MsgbusService) -> None:
        self.svc = svc
        self.sock = bus.connect(svc.ctx, zmq.REQ, svc.cfg.run_dir, "msgbus.rpc")

    def send(self, method: str, params: dict[str, Any], now: float) -> None:
        self.sock.send_multipart(bus.pack(method, params))
        self.svc.rpc.setsockopt(zmq.RCVTIMEO, 2000)
        self.svc.handle_rpc(self.svc.rpc.recv_multipart(), now)

    def answer(self) -> Any | None:
        """The reply if one was sent (never waits: parking means no reply yet)."""
        if not self.sock.poll(50):
            return None
        reply = bus.unpack(self.sock.recv_multipart())
        assert reply.kind == "ok", reply
        return reply.fields["result"]


def deliver(svc: MsgbusService, payload: bytes, *, reply_to: bytes | None = None) -> MessageEngine:
    """A message from another node into ``svc``'s engine, over the message protocol."""
    now = time.monotonic()
    sender = MessageEngine(ip(9), now, wall_now=time.time(), rng=random.Random(1))
    if reply_to is None:
        sender.push(svc.own_ip, b"", payload, now)
    else:
        sender.push(svc.own_ip, b"", payload, now, reply_to=reply_to)
    for _ in range(50):  # a lossless exchange; svc's events stay for its own flush
        for src, dst, pkt in sender.packets_to_send():
            svc.engine.receive(src, dst, pkt, now)
        for src, dst, pkt in svc.engine.packets_to_send():
            sender.receive(src, dst, pkt, now)
    return sender


def test_a_waiting_pop_is_parked_and_answered_when_a_message_arrives(svc: MsgbusService) -> None:
    client = Client(svc)
    now = time.monotonic()
    client.send("pop", {"timeout": 30, "peek": False}, now)
    assert len(svc.parked) == 1 and client.answer() is None
    deliver(svc, b"hello parked pop")
    svc.flush(time.monotonic())
    result = client.answer()
    assert result is not None and result["message"]["payload"] == "aGVsbG8gcGFya2VkIHBvcA=="
    assert svc.parked == [] and svc.engine.inbox_size() == 0


def test_a_parked_pop_ends_with_no_message_at_its_deadline(svc: MsgbusService) -> None:
    client = Client(svc)
    now = time.monotonic()
    client.send("pop", {"timeout": 0.5}, now)
    svc.serve_parked(now + 0.1)
    assert client.answer() is None  # still waiting
    svc.serve_parked(now + 1.0)
    assert client.answer() == {"message": None} and svc.parked == []


def test_a_long_wait_is_answered_every_slice(svc: MsgbusService) -> None:
    """No bus call waits longer than WAIT_SLICE: apid asks again."""
    client = Client(svc)
    now = time.monotonic()
    client.send("pop", {"timeout": 3600}, now)
    assert svc.parked[0].deadline == pytest.approx(now + msgbus_service.WAIT_SLICE)
    svc.serve_parked(now + msgbus_service.WAIT_SLICE)
    assert client.answer() == {"message": None}


def test_a_push_waiting_for_its_reply_is_parked_until_it_times_out(svc: MsgbusService) -> None:
    client = Client(svc)
    now = time.monotonic()
    client.send("push", {"dst": ip(9), "payload": b"question", "reply_timeout": 1}, now)
    assert len(svc.parked) == 1 and client.answer() is None
    msg_id = svc.parked[0].msg_id
    svc.serve_parked(now + 2)
    assert client.answer() == {"id": msg_id.hex(), "timeout": True}
    assert svc.parked == [] and msg_id not in svc.reply_deadlines


def test_a_push_waiting_for_its_reply_gets_it(svc: MsgbusService) -> None:
    client = Client(svc)
    now = time.monotonic()
    client.send("push", {"dst": ip(9), "payload": b"question", "reply_timeout": 30}, now)
    msg_id = svc.parked[0].msg_id
    deliver(svc, b"answer", reply_to=msg_id)
    svc.flush(time.monotonic())
    result = client.answer()
    assert result is not None and result["id"] == msg_id.hex() and result["reply"]["payload"] == "YW5zd2Vy"
    assert svc.parked == [] and svc.engine.inbox_size() == 0  # a reply goes to its waiter, not the inbox


def test_parking_is_bounded(svc: MsgbusService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(msgbus_service, "MAX_PARKED", 2)
    now = time.monotonic()
    clients = [Client(svc) for _ in range(3)]
    for c in clients:
        c.send("pop", {"timeout": 30}, now)
    assert len(svc.parked) == 2
    assert clients[0].answer() is None and clients[1].answer() is None
    assert clients[2].answer() == {"error": "busy", "message": "too many waiting requests"}
