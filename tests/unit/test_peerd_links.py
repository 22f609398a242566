"""Link types behind services/peerd/links/base.py, without root: a fake
LinkHost records what links hand over; streams run over socketpairs and
loopback TCP; vsock over the kernel's loopback transport (CID 1) where it
exists."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import Counter
from collections.abc import Coroutine
from typing import Any

import pytest

from common.datapath import DataIn, DataOut
from common.endpoint import Endpoint
from common.nodeconfig import NodeConfig
from common.wire.packet import ControlPacket, decode_packet
from common.wire.tlv import Hello
from services.peerd.links.base import COST_QUIC, COST_TCP, COST_VSOCK, Link, LinkError, ip_cost
from services.peerd.links.stream import StreamLink
from services.peerd.links.tcp import TcpFactory
from services.peerd.links.vsock import VsockFactory, vsock_problem
from tests.integration.nodes import free_port as free_closed_port


class FakeHost:
    """Records every callback; tasks go to a list the test awaits."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.control: list[tuple[Link, bytes]] = []
        self.data: list[tuple[Link, bytes]] = []
        self.closed: list[tuple[Link, str]] = []
        self.accepted_links: list[Link] = []
        self.tasks: list[asyncio.Task[None]] = []

    def on_control(self, link: Link, packets: list[bytes]) -> None:
        self.control += [(link, p) for p in packets]

    def on_data(self, link: Link, buf: bytearray, offsets: list[int]) -> None:
        for off in offsets:
            end = off + 40 + (buf[off + 5] << 8 | buf[off + 6])
            self.data.append((link, bytes(buf[off:end])))
        buf[offsets[0] + 7] = 0  # hosts may write into the buffer (the hop limit)

    def on_closed(self, link: Link, reason: str) -> None:
        self.closed.append((link, reason))

    def accepted(self, link: Link) -> None:
        self.accepted_links.append(link)
        link.link_id = f"in-{len(self.accepted_links)}"
        link.start()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.append(task)
        return task


def data_packet(n: int, body_len: int = 100) -> bytes:
    body = bytes([n % 256]) * body_len
    return struct.pack("!BBxxxHB", 1, 0, len(body), 64) + bytes(16) + bytes(15) + bytes([n % 256]) + body


def hello(seq: int) -> bytes:
    return ControlPacket(Hello(flags=0, seqno=seq, interval=400)).encode()


async def until(cond: Any, what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def pair_links(host: FakeHost) -> tuple[StreamLink, socket.socket]:
    a, b = socket.socketpair()
    link = StreamLink(host, a, Endpoint("tcp", "127.0.0.1", 1), "TEST", 10, inbound=False)
    link.link_id = "tcp-x-1"
    b.setblocking(False)
    return link, b


def test_stream_link_delivers_control_and_data_split_across_reads() -> None:
    async def scenario() -> FakeHost:
        host = FakeHost()
        link, peer = pair_links(host)
        link.start()
        stream = hello(1) + data_packet(1) + data_packet(2) + hello(2) + data_packet(3, 1300)
        for i in range(0, len(stream), 97):  # packets cut at odd places
            peer.send(stream[i : i + 97])
            await asyncio.sleep(0)
        await until(lambda: len(host.data) == 3 and len(host.control) == 2, "packets")
        link.close("test")
        await asyncio.gather(*host.tasks)
        peer.close()
        return host

    host = asyncio.run(scenario())
    assert [p for _, p in host.data] == [data_packet(1), data_packet(2), data_packet(3, 1300)]
    assert [decode_packet(p) for _, p in host.control] == [decode_packet(hello(1)), decode_packet(hello(2))]
    assert [r for _, r in host.closed] == ["test"]


class RingHost(FakeHost):
    """A host that offers local_rx: this node is the /64 of data_packet's
    destination, tund's ring is real (common/datapath.py)."""

    def __init__(self, run: str) -> None:
        super().__init__()
        self.tund_fds: set[int] = set()
        self.din = DataIn(
            run, "tund", "-to-tund", lambda fd, add: (self.tund_fds.add if add else self.tund_fds.discard)(fd)
        )
        self.out = DataOut(run, "peerd-tcp-to-tund", "tund")
        assert self.out.send(b"hello", b"") is None
        self.local: list[tuple[bytes, int, int]] = []
        self.local_rx = (bytes(8), self.out, self.out.ring.max_record)
        self.ring: list[bytes] = []
        self.drain()

    def on_local(self, link: Link, runs: list[tuple[bytes, int, int]]) -> None:
        self.local += runs

    def drain(self) -> None:
        for fd in sorted(self.tund_fds):
            self.din.drain(fd, lambda tag, view: self.ring.append(bytes(view)))


@pytest.mark.parametrize("native", [False, True])
def test_stream_link_hands_packets_for_this_node_to_tund_first(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    from common import native as native_mod
    from services.peerd import local_batch
    from services.peerd.links import stream as stream_mod

    if native and native_mod.kernel is None:
        pytest.skip(f"native kernel not in use: {native_mod.REASON}")
    monkeypatch.setattr(stream_mod, "link_rx", native_mod.kernel.link_rx if native else local_batch._link_rx_python)
    transit = bytearray(data_packet(9))
    transit[24] = 5  # another node's /64

    async def scenario() -> RingHost:
        host = RingHost(str(tmp_path))
        link, peer = pair_links(host)
        assert link.local_rx is not None
        link.start()
        peer.send(
            data_packet(1) + data_packet(2) + hello(1) + data_packet(3, 1300) + bytes(transit) + data_packet(4)[:50]
        )
        await until(lambda: len(host.data) == 2 and len(host.control) == 1, "packets")
        peer.send(data_packet(4)[50:])  # the rest of the partial packet: a read that starts with it
        await until(lambda: sum(n for _, n, _ in host.local) == 3, "the second hand-over")
        host.drain()
        link.close("test")
        await asyncio.gather(*host.tasks)
        peer.close()
        host.din.close()
        host.out.close()
        return host

    host = asyncio.run(scenario())

    def hop_less(p: bytes) -> bytes:
        return p[:7] + bytes([p[7] - 1]) + p[8:]

    # the packets at the start of each read went to tund, hop limits one lower; the rest as from any read
    assert host.ring == [b"hello", hop_less(data_packet(1)) + hop_less(data_packet(2)), hop_less(data_packet(4))]
    assert [p for _, p in host.data] == [data_packet(3, 1300), bytes(transit)]
    assert [decode_packet(p) for _, p in host.control] == [decode_packet(hello(1))]
    assert [(a[-1], n, b) for a, n, b in host.local] == [(1, 1, 100), (2, 1, 100), (4, 1, 100)]  # runs of one flow


def test_stream_link_sends_control_and_borrowed_data() -> None:
    async def scenario() -> bytes:
        host = FakeHost()
        link, peer = pair_links(host)
        link.start()
        link.send_control([hello(7)])
        slot = bytearray(data_packet(1) + data_packet(2))
        assert link.send_data(memoryview(slot), packets=2, borrowed=True)
        slot[:] = bytes(len(slot))  # the ring slot is reused at once
        got = bytearray()
        want = len(hello(7)) + len(data_packet(1)) * 2
        while len(got) < want:
            await asyncio.sleep(0.01)
            try:
                got += peer.recv(65536)
            except BlockingIOError:
                pass
        assert link.stats().tx_bytes == want
        link.close("done")
        await asyncio.gather(*host.tasks)
        peer.close()
        return bytes(got)

    got = asyncio.run(scenario())
    assert got == hello(7) + data_packet(1) + data_packet(2)


def test_stream_link_closes_on_a_bad_stream_and_on_eof_mid_packet() -> None:
    async def scenario() -> list[str]:
        reasons = []
        for junk in (b"\x09\x00garbage-version" * 4, data_packet(1)[:30]):
            host = FakeHost()
            link, peer = pair_links(host)
            link.start()
            peer.send(junk)
            if len(junk) < 40:
                peer.close()
            await until(lambda: host.closed, "close")  # noqa: B023 - awaited in the same turn
            await asyncio.gather(*host.tasks)
            reasons.append(host.closed[0][1])
            if len(junk) >= 40:
                peer.close()
        return reasons

    bad, eof = asyncio.run(scenario())
    assert bad.startswith("malformed stream")
    assert eof.startswith("eof inside a packet")


def test_stream_link_peer_reset_is_one_close() -> None:
    async def scenario() -> FakeHost:
        host = FakeHost()
        link, peer = pair_links(host)
        link.start()
        peer.close()
        await until(lambda: host.closed, "close")
        link.close("again")  # idempotent
        await asyncio.gather(*host.tasks)
        return host

    host = asyncio.run(scenario())
    assert len(host.closed) == 1 and host.closed[0][1] == "eof"


def test_tcp_factory_listens_dials_and_names_links(tmp_path: Any) -> None:
    async def scenario() -> tuple[FakeHost, FakeHost, Link, list[bytes]]:
        server_host, client_host = FakeHost(), FakeHost()
        cfg = NodeConfig(run_dir=str(tmp_path), key_file="", tcp_listen_port=0)
        server = TcpFactory(cfg, server_host)
        await server.listen()
        assert server.listener is not None
        port = server.listener.getsockname()[1]
        client = TcpFactory(cfg, client_host)
        link = await client.dial(Endpoint.parse(f"tcp://127.0.0.1:{port}"))
        link.link_id = "out-1"
        link.start()
        await until(lambda: server_host.accepted_links, "accept")
        inbound = server_host.accepted_links[0]
        link.send_control([hello(3)])
        link.send_data(data_packet(9))
        inbound.send_data(data_packet(10))
        await until(lambda: server_host.data and server_host.control and client_host.data, "both ways")
        with pytest.raises(LinkError):
            await client.dial(Endpoint.parse("vsock://1:5"))
        with pytest.raises(OSError):
            await client.dial(Endpoint.parse(f"tcp://127.0.0.1:{free_closed_port()}"))
        link.close("bye")
        await until(lambda: server_host.closed, "remote close")
        await server.close()
        await asyncio.gather(*server_host.tasks, *client_host.tasks)
        return server_host, client_host, inbound, [p for _, p in server_host.data]

    server_host, client_host, inbound, data = asyncio.run(scenario())
    assert data == [data_packet(9)]
    assert [p for _, p in client_host.data] == [data_packet(10)]
    assert inbound.inbound and inbound.link_type == "tcp"
    assert inbound.name.startswith("TCP 127.0.0.1:") and " <-> 127.0.0.1:" in inbound.name
    assert inbound.static_cost == 15 and inbound.remote_ip() == "127.0.0.1"
    assert inbound.endpoint.proto == "tcp" and inbound.endpoint.host == "127.0.0.1"
    assert server_host.closed[0][1] == "eof"


def test_static_costs_are_the_references() -> None:
    assert ip_cost("192.0.2.1", COST_TCP) == 15 and ip_cost("::ffff:192.0.2.1", COST_TCP) == 15
    assert ip_cost("2001:db8::1", COST_TCP) == 10 and ip_cost("fe80::1%eth0", COST_TCP) == 10
    assert ip_cost("192.0.2.1", COST_QUIC) == 12 and ip_cost("2001:db8::1", COST_QUIC) == 7
    assert COST_VSOCK == 5


VSOCK_PROBLEM = vsock_problem()


def vsock_loopback_problem() -> str | None:
    """vsock over CID 1 (the local loopback transport) only; never the host CID 2."""
    if VSOCK_PROBLEM:
        return VSOCK_PROBLEM
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as s:
        try:
            s.bind((1, socket.VMADDR_PORT_ANY))
        except OSError as exc:
            return f"no vsock loopback transport (CID 1): {exc.strerror}; modprobe vsock_loopback"
    return None


LOOPBACK_PROBLEM = vsock_loopback_problem()


@pytest.mark.skipif(LOOPBACK_PROBLEM is not None, reason=str(LOOPBACK_PROBLEM))
def test_vsock_link_over_loopback(tmp_path: Any) -> None:
    async def scenario() -> tuple[FakeHost, Link, Link]:
        server_host, client_host = FakeHost(), FakeHost()
        cfg = NodeConfig(run_dir=str(tmp_path), key_file="")
        probe = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        probe.bind((1, socket.VMADDR_PORT_ANY))
        port = probe.getsockname()[1]
        probe.close()
        server = VsockFactory(cfg, server_host, port)
        await server.listen()
        client = VsockFactory(cfg, client_host)
        link = await client.dial(Endpoint.parse(f"vsock://1:{port}"))
        link.link_id = "out-1"
        link.start()
        await until(lambda: server_host.accepted_links, "accept")
        link.send_control([hello(5)])
        link.send_data(data_packet(4))
        await until(lambda: server_host.data and server_host.control, "packets")
        inbound = server_host.accepted_links[0]
        link.close("bye")
        await until(lambda: server_host.closed, "remote close")
        await server.close()
        await asyncio.gather(*server_host.tasks, *client_host.tasks)
        assert [p for _, p in server_host.data] == [data_packet(4)]
        return server_host, link, inbound

    _, out, inbound = asyncio.run(scenario())
    assert out.link_type == "vsock" and out.static_cost == 5
    assert out.name.startswith("VSOCK ") and out.name.endswith(f"<-> 1:{out.endpoint.port}")
    assert str(out.endpoint).startswith("vsock://1:") and inbound.inbound


@pytest.mark.skipif(VSOCK_PROBLEM is not None, reason=str(VSOCK_PROBLEM))
def test_vsock_dial_failure_is_an_oserror(tmp_path: Any) -> None:
    """Without a listener (or without the loopback transport) a dial to CID 1
    fails as a dial does: OSError or TimeoutError, retried by peerd."""

    async def scenario() -> None:
        factory = VsockFactory(NodeConfig(run_dir=str(tmp_path), key_file=""), FakeHost())
        with pytest.raises((OSError, TimeoutError)):
            await factory.dial(Endpoint.parse("vsock://1:4294967294"))
        with pytest.raises(LinkError):
            await factory.dial(Endpoint.parse("tcp://127.0.0.1:1"))
        assert factory.describe() == "vsock (dial only)"
        await factory.listen()  # no port configured: no listener
        assert factory.listener is None

    asyncio.run(scenario())
