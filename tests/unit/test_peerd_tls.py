"""The TLS link and its factory on loopback, without nodes: bulk data both
ways through partial writes, and refusals (wrong key, plain TCP, a stalled
handshake) counted and logged once."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from common import privnet
from common.endpoint import Endpoint
from common.nodeconfig import NodeConfig
from common.wire.packet import ControlPacket
from common.wire.tlv import Hello
from services.peerd.links.base import Link
from services.peerd.links.tls import TlsFactory, TlsLink, make_factory, network_of
from tests.integration.nodes import free_port


class Host:
    """The LinkHost callbacks, recorded."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.control: list[bytes] = []
        self.data: list[bytes] = []
        self.closed: list[str] = []
        self.links: list[Link] = []
        self.tasks: list[asyncio.Task[None]] = []

    def on_control(self, link: Link, packets: list[bytes]) -> None:
        self.control += packets

    def on_data(self, link: Link, buf: bytearray, offsets: list[int]) -> None:
        for off in offsets:
            self.data.append(bytes(buf[off : off + 40 + (buf[off + 5] << 8 | buf[off + 6])]))

    def on_closed(self, link: Link, reason: str) -> None:
        self.closed.append(reason)

    def accepted(self, link: Link) -> None:
        link.link_id = f"in-{len(self.links)}"
        self.links.append(link)
        link.start()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.append(task)
        return task


def cfg_for(tmp: Path, key: bytes, name: str = "unitnet") -> NodeConfig:
    path = tmp / f"key-{key.hex()[:8]}"
    path.write_bytes(key)
    return NodeConfig(
        run_dir=str(tmp), key_file=str(tmp / "k"), tcp_listen_port=free_port(), network_name=name,
        network_key_file=str(path),
    )  # fmt: skip


def packet(n: int, size: int = 1400) -> bytes:
    body = n.to_bytes(4, "big") * (size // 4)
    return struct.pack("!BBxxxHB", 1, 0, len(body), 64) + bytes(32) + body


def privnet_endpoint(port: int) -> Endpoint:
    return Endpoint("tls", "127.0.0.1", port)


async def until(cond: Any, what: str, timeout: float = 10.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_only_in_private_mode(tmp_path: Path) -> None:
    plain = NodeConfig(run_dir=str(tmp_path), key_file="k")
    assert network_of(plain) is None and make_factory(plain, Host()) is None


def test_bulk_both_ways_through_partial_writes(tmp_path: Path) -> None:
    key = bytes(range(32))
    server_cfg = cfg_for(tmp_path, key)

    async def run() -> None:
        server_host, client_host = Host(), Host()
        server = TlsFactory(server_cfg, server_host, network_of(server_cfg))  # type: ignore[arg-type]
        await server.listen()
        client = TlsFactory(cfg_for(tmp_path, key), client_host, network_of(server_cfg))  # type: ignore[arg-type]
        link = await client.dial(privnet_endpoint(server_cfg.tcp_listen_port))
        assert isinstance(link, TlsLink) and link.endpoint.proto == "tls" and link.static_cost == 15
        link.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # partial writes, many
        link.link_id = "out-1"
        link.start()
        await until(lambda: server_host.links, "the accepted link")
        inbound = server_host.links[0]
        assert inbound.inbound and inbound.name.startswith("TLS ")
        n = 3000  # ~4 MB
        for i in range(n):
            if i % 500 == 0:
                link.send_control([ControlPacket(Hello(0, i, 400)).encode()])
            while not link.send_data(packet(i)):  # the queue is bounded: wait for room
                await asyncio.sleep(0.005)
        inbound.send_data(packet(7, 100))
        await until(lambda: len(server_host.data) == n, "all data at the server", 60)
        assert server_host.data == [packet(i) for i in range(n)]
        assert len(server_host.control) == 6
        await until(lambda: client_host.data == [packet(7, 100)], "the answer")
        assert link.stats().tx_bytes >= n * 1440 and inbound.stats().rx_bytes > n * 1440  # TLS adds its overhead
        link.close("done")
        await until(lambda: server_host.closed and client_host.closed, "both ends closed")
        await server.close()
        for task in server_host.tasks + client_host.tasks:
            task.cancel()

    asyncio.run(run())


def test_refusals_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(privnet, "HANDSHAKE_TIMEOUT", 0.5)
    server_cfg = cfg_for(tmp_path, bytes(32))

    async def run() -> None:
        host = Host()
        server = TlsFactory(server_cfg, host, network_of(server_cfg))  # type: ignore[arg-type]
        await server.listen()
        wrong_cfg = cfg_for(tmp_path, b"\x01" * 32)
        wrong = TlsFactory(wrong_cfg, Host(), network_of(wrong_cfg))  # type: ignore[arg-type]
        ep = privnet_endpoint(server_cfg.tcp_listen_port)
        for _ in range(3):
            with pytest.raises(ConnectionRefusedError, match="different network key"):
                await wrong.dial(ep)
        loop = asyncio.get_running_loop()
        plain = socket.create_connection(("127.0.0.1", server_cfg.tcp_listen_port))
        plain.sendall(b"\x01\x01\x00\x00" + bytes(60))  # a public node's packet stream
        stalled = socket.create_connection(("127.0.0.1", server_cfg.tcp_listen_port))
        stalled.setblocking(False)
        assert await asyncio.wait_for(loop.sock_recv(stalled, 100), 5) == b""  # closed by the timeout
        await until(lambda: host.counters["tls_refused_not_tls"] == 1, "the plain connection refused")
        assert host.counters["tls_refused_wrong_key"] == 3 and host.counters["tls_refused_timeout"] == 1
        assert host.links == []
        plain.close()
        stalled.close()
        await server.close()
        for task in host.tasks:
            task.cancel()

    with caplog.at_level(logging.WARNING, logger="peerd.tls"):
        asyncio.run(run())
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    server_side = [m for m in refusals if m.startswith("TLS from")]
    assert sum("different network key" in m for m in server_side) == 1, refusals  # once per remote and reason
    assert sum("does not speak TLS" in m for m in server_side) == 1
    assert sum("did not finish within" in m for m in server_side) == 1
