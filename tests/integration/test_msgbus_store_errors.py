"""msgbus under a real sqlite failure (its store locked by another
process): a push is answered 500 with a JSON body, as the reference
answers an internal error, nothing accepted before is lost, and the node
keeps serving once the store works again."""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Callable

import pytest

from .nodes import Node

pytestmark = pytest.mark.integration


def push(node: Node, dst: str, text: bytes) -> tuple[int, bytes]:
    body = {"dst": {"ip": dst}, "topic": base64.b64encode(b"t").decode(), "payload": base64.b64encode(text).decode()}
    return node.api_status("/api/v1/messages", "POST", body)


def test_push_on_a_failing_store_is_500_and_nothing_is_lost(make_nodes: Callable[..., list[Node]]) -> None:
    (node,) = make_nodes(1)
    node.start().wait_ready()
    dst = "5ff:1234::1"  # nobody: the messages stay queued in the outbox
    status, body = push(node, dst, b"before")
    assert status == 201
    kept = json.loads(body)["id"]
    other = sqlite3.connect(str(node.run_dir / "msgbus.sqlite"), isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        status, body = push(node, dst, b"during")
        assert status == 500, body
        assert "message store failed" in json.loads(body)["error"]
        assert node.api_status(f"/api/v1/messages/status/{kept}")[0] == 200  # reads still served
        other.execute("ROLLBACK")
    finally:
        other.close()
    status, body = push(node, dst, b"after")
    assert status == 201
    after = json.loads(body)["id"]
    for msg_id in (kept, after):
        assert node.api_status(f"/api/v1/messages/status/{msg_id}")[0] == 200
    assert node.counters("msgbus").get("store_error", 0) >= 1
    assert node.all_running()
