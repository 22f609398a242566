"""Private networks on loopback (TRANSPORTS.md section 2): nodes with the
same name and key peer over TLS 1.3 PSK and carry messages; the wrong key,
or a public node, is refused and the logs say why; and a test peer built
only on Python's ssl with the reference's OpenSSL settings (2.2)
handshakes with a node in both directions."""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from common.identity import Identity
from common.privnet import psk_support_problem
from common.wire.packet import ControlPacket, StreamDecoder
from common.wire.tlv import Update

from .nodes import Node, free_port, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(psk_support_problem() is not None, reason="needs Python 3.13+ ssl PSK callbacks"),
]
NAME = "testnet"


def private(node: Node, key: Path, name: str = NAME, peers: list[str] | None = None) -> Node:
    node.extra_args = ["--network-name", name, "--network-key-file", str(key)]
    node.peers = peers or []
    return node


def tls_endpoint(node: Node) -> str:
    return f"tls://127.0.0.1:{node.tcp_port}"


def peers_of(node: Node) -> list[dict[str, Any]]:
    return list(node.api("/api/v1/admin/peers"))


def test_same_name_and_key_peer_and_carry_a_message_others_are_refused(
    make_nodes: Callable[..., list[Node]], tmp_path: Path
) -> None:
    key, other_key = tmp_path / "net.key", tmp_path / "other.key"
    key.write_bytes(bytes(range(32)) + b"extra bytes are ignored")
    other_key.write_bytes(bytes(range(1, 33)))
    a, b, wrong, public = make_nodes(4)
    private(a, key)
    private(b, key, peers=[tls_endpoint(a)])
    private(wrong, other_key, peers=[tls_endpoint(a)])
    public.peers = [a.endpoint]  # plain tcp:// to a TLS listener
    for node in (a, b, wrong, public):
        node.start()
    for node in (a, b, wrong, public):
        node.wait_ready()
    wait_for("b's TLS link to a", lambda: b.alive_peers() == 1 and a.alive_peers() == 1, 30)

    # the API shows the link as tls:// of the type it was made as
    (entry,) = peers_of(b)
    assert entry["endpoint"] == {"proto": "tls", "addr": {"socket": f"127.0.0.1:{a.tcp_port}"}}
    assert entry["type"] == "static" and entry["connectionState"] == "alive"
    (inbound,) = peers_of(a)
    assert inbound["endpoint"]["proto"] == "tls" and inbound["type"] == "inbound"

    # a message over the TLS link, both ways routed
    wait_for("a's route to b", lambda: b.subnet in a.selected(), 20)
    body = {"dst": {"ip": b.address}, "payload": base64.b64encode(b"over TLS-PSK").decode()}
    assert a.api_status("/api/v1/messages", "POST", body, timeout=10)[0] in (200, 201, 202)

    def received() -> bytes | None:
        status, raw = b.api_status("/api/v1/messages?timeout=2", timeout=10)
        return raw if status == 200 else None

    msg = json.loads(wait_for("the message at b", received, 20))
    assert base64.b64decode(msg["payload"]) == b"over TLS-PSK"

    # the wrong key and the public node never get a link, and the logs say why, once
    wait_for(
        "a to refuse both",
        lambda: (
            (c := a.counters("peerd-tcp")).get("tls_refused_wrong_key", 0) >= 1 and c.get("tls_refused_not_tls", 0) >= 1
        ),
        30,
    )
    assert a.alive_peers() == 1 and wrong.alive_peers() == 0 and public.alive_peers() == 0
    assert b.subnet not in wrong.selected() and a.subnet not in public.selected()
    log_a = a.log_path.read_text(errors="replace")
    assert log_a.count("same network name, different network key") == 1, log_a[-3000:]
    assert log_a.count("does not speak TLS 1.3") == 1
    assert "same network name, different network key" in wrong.log_path.read_text(errors="replace")


# --- a peer on Python's ssl with the reference's OpenSSL settings (TRANSPORTS.md 2.2) ---------


def reference_server_context(name: str, key: bytes) -> ssl.SSLContext:
    """mozilla_modern_v5 + set_psk_server_callback, no certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_ALL | ssl.OP_NO_COMPRESSION | ssl.OP_SINGLE_DH_USE | ssl.OP_SINGLE_ECDH_USE
    ctx.set_psk_server_callback(lambda identity: key if identity == name else b"")
    return ctx


def reference_client_context(name: str, key: bytes) -> ssl.SSLContext:
    """SslConnector::builder + the PSK-less cipher list + VERIFY_PEER + set_psk_client_callback, no SNI."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.options |= ssl.OP_ALL | ssl.OP_NO_COMPRESSION | ssl.OP_SINGLE_DH_USE | ssl.OP_SINGLE_ECDH_USE
    ctx.set_ciphers("DEFAULT:!aNULL:!eNULL:!MD5:!3DES:!DES:!RC4:!IDEA:!SEED:!aDSS:!SRP:!PSK")
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_default_certs()
    ctx.set_psk_client_callback(lambda _hint: (name, key))
    return ctx


def own_update(tls: ssl.SSLSocket, subnet: str, timeout: float = 15) -> Update:
    decoder = StreamDecoder()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tls.settimeout(max(0.05, deadline - time.monotonic()))
        data = tls.recv(65536)
        assert data, "the node closed the link"
        for pkt in decoder.feed(data):
            if isinstance(pkt, ControlPacket) and isinstance(pkt.tlv, Update) and str(pkt.tlv.subnet) == subnet:
                return pkt.tlv
    raise AssertionError("no own-subnet Update within the timeout")


def test_reference_settings_peer_both_directions(make_nodes: Callable[..., list[Node]], tmp_path: Path) -> None:
    key_bytes = bytes(range(100, 132))
    key = tmp_path / "net.key"
    key.write_bytes(key_bytes)
    port = free_port()
    (node,) = make_nodes(1)
    private(node, key, peers=[f"tcp://127.0.0.1:{port}"])  # tcp:// is upgraded to TLS
    node.key_file.write_bytes(os.urandom(32))
    subnet = str(Identity.from_secret(node.key_file.read_bytes()).subnet)
    accepted: list[tuple[str, Update]] = []

    def serve(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with reference_server_context(NAME, key_bytes).wrap_socket(conn, server_side=True) as tls:
            accepted.append((str((tls.cipher() or ("",))[0]), own_update(tls, subnet)))

    with socket.create_server(("127.0.0.1", port)) as listener:
        listener.settimeout(40)
        server = threading.Thread(target=serve, args=(listener,), daemon=True)
        server.start()
        node.start().wait_ready()
        # we dial the node, as a reference node would
        raw = socket.create_connection(("127.0.0.1", node.tcp_port), timeout=10)
        with reference_client_context(NAME, key_bytes).wrap_socket(raw) as tls:
            assert tls.version() == "TLSv1.3" and tls.getpeercert(binary_form=True) is None
            assert (tls.cipher() or ("",))[0].endswith("SHA256")  # the PSK's hash
            update = own_update(tls, subnet)
            assert update.metric == 0
        # and the node dials us (its static peer)
        server.join(40)
    assert accepted, node.log_tail()
    cipher, update = accepted[0]
    assert cipher.endswith("SHA256") and update.metric == 0
