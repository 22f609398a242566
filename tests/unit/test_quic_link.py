"""QUIC links through the link interface over real loopback UDP sockets
(no root, ephemeral ports): two factories in one event loop, each with a
recording host, as peerd would use them."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from common.endpoint import Endpoint
from common.nodeconfig import NodeConfig
from common.wire.packet import ControlPacket, DataPacket
from common.wire.tlv import Hello
from services.peerd.links.base import Link
from services.peerd.links.quic import QuicFactory, QuicLink, make_factory


class Host:
    """What peerd would do with the callbacks, recorded."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.control: list[bytes] = []
        self.data: list[bytes] = []
        self.batches = 0
        self.closed: list[tuple[Link, str]] = []
        self.links: list[Link] = []
        self.changed = asyncio.Event()

    def on_control(self, link: Link, packets: list[bytes]) -> None:
        self.control.extend(packets)
        self.changed.set()

    def on_data(self, link: Link, buf: bytearray, offsets: list[int]) -> None:
        self.batches += 1
        for off in offsets:
            end = off + 40 + (buf[off + 5] << 8 | buf[off + 6])
            self.data.append(bytes(buf[off:end]))
        self.changed.set()

    def on_closed(self, link: Link, reason: str) -> None:
        self.closed.append((link, reason))
        self.changed.set()

    def accepted(self, link: Link) -> None:
        self.links.append(link)
        link.start()
        self.changed.set()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(coro, name=name)

    async def until(self, cond: Any, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while not cond():
                self.changed.clear()
                await self.changed.wait()


def config(tmp: Path, name: str, **kw: Any) -> NodeConfig:
    key = tmp / f"{name}.key"
    key.write_bytes(os.urandom(32))
    return NodeConfig(run_dir=str(tmp), key_file=str(key), quic_listen_port=0, **kw)


def hello(seq: int) -> bytes:
    return ControlPacket(Hello(0, seq, 2000)).encode()


def data_packet(size: int, tag: int) -> bytes:
    return DataPacket(b"\x04" + bytes(15), b"\x05" + bytes(15), 64, bytes([tag % 256]) * size).encode()


def test_disabled_quic_has_no_factory(tmp_path: Path) -> None:
    assert make_factory(config(tmp_path, "x", disable_quic=True), Host()) is None


@pytest.mark.parametrize("family", ["127.0.0.1", "::1"])
def test_two_factories_link_and_carry_batches(tmp_path: Path, family: str) -> None:
    async def main() -> None:
        ha, hb = Host(), Host()
        fa = QuicFactory(config(tmp_path, "a"), ha)
        fb = QuicFactory(config(tmp_path, "b"), hb)
        await fa.listen()
        await fb.listen()
        try:
            host = f"[{family}]" if ":" in family else family
            link_b = await fb.dial(Endpoint.parse(f"quic://{host}:{fa.local[1]}"))
            assert isinstance(link_b, QuicLink) and not link_b.inbound
            assert link_b.static_cost == (7 if ":" in family else 12)
            link_b.link_id = "quic-x-1"
            link_b.start()
            link_b.send_control([hello(1), hello(2)])
            await ha.until(lambda: len(ha.control) == 2)
            assert ha.control == [hello(1), hello(2)]
            (link_a,) = ha.links
            assert link_a.inbound and link_a.endpoint.port == fb.local[1]
            assert link_a.name.startswith("QUIC ")
            # a batch of full-size data packets one way, small ones back
            sizes = [1382] * 300  # 1422-byte packets: the largest that fit one datagram
            blob = b"".join(data_packet(s, i) for i, s in enumerate(sizes))
            assert link_b.send_data(blob, len(sizes), borrowed=True)
            link_a.send_data(data_packet(60, 1) * 3, 3)
            await ha.until(lambda: len(ha.data) >= 290, 20)  # UDP on loopback: a few may be lost
            await hb.until(lambda: len(hb.data) == 3)
            assert ha.batches < len(ha.data)  # delivered in batches, not one call per packet
            assert set(ha.data) <= {data_packet(s, i) for i, s in enumerate(sizes)}
            assert hb.counters["quic_gso_sends"] + ha.counters["quic_gso_sends"] > 0
            assert link_b.stats().tx_bytes > 300 * 1422 and link_a.stats().rx_bytes > 290 * 1422
            # a data packet too big for a datagram arrives too (on the stream)
            big = data_packet(4000, 7)
            link_b.send_data(big)
            await ha.until(lambda: big in ha.data)
            # closing one end takes the other down
            link_b.close("test over")
            await ha.until(lambda: ha.closed)
            assert ha.closed[0][0] is link_a
            assert hb.closed and hb.closed[0][0] is link_b
        finally:
            await fa.close()
            await fb.close()

    asyncio.run(main())


def test_dial_to_a_silent_port_fails_in_time(tmp_path: Path) -> None:
    async def main() -> None:
        import socket

        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        f = QuicFactory(config(tmp_path, "c"), Host())
        await f.listen()
        try:
            with pytest.raises(TimeoutError):
                await f.dial(Endpoint.parse(f"quic://127.0.0.1:{silent.getsockname()[1]}"))
            assert not [c for c in f.endpoint.conns if not c.closed]
        finally:
            await f.close()
            silent.close()

    asyncio.run(main())
