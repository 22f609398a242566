"""SOCKS5 probing and relay (services/proxyd): the sans-IO classification,
table and remote parsing, then the relay itself on loopback with real
sockets (a SOCKS-speaking peer is not needed: the relay is byte for byte)."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.identity import Identity
from common.nodeconfig import NodeConfig
from services.proxyd import service
from services.proxyd.socks import (
    ProbeStatus,
    ProbeTable,
    RemoteError,
    classify,
    parse_remote,
    probe_targets,
    show_remote,
)
from tests.integration.nodes import free_port


def test_classify_as_the_reference() -> None:
    assert classify(b"\x05\x00") is ProbeStatus.VALID
    assert classify(b"\x05\x00trailing") is ProbeStatus.VALID
    assert classify(b"\x05\xff") is ProbeStatus.AUTH_REQUIRED
    assert classify(b"\x05\x02") is ProbeStatus.NOT_A_PROXY  # chose a method we did not offer
    assert classify(b"HT") is ProbeStatus.NOT_A_PROXY
    assert classify(b"\x04\x00") is ProbeStatus.NOT_A_PROXY
    for nothing in (None, b"", b"\x05"):
        assert classify(nothing) is ProbeStatus.NOT_LISTENING


@given(st.one_of(st.none(), st.binary(max_size=8)))
def test_classify_never_fails(reply: bytes | None) -> None:
    assert isinstance(classify(reply), ProbeStatus)


def test_table_keeps_latest_result_lists_valid_only_and_is_bounded() -> None:
    table = ProbeTable(limit=3)
    a, b, c, d = (ipaddress.IPv6Address(f"400::{i}") for i in range(1, 5))
    table.record(b, ProbeStatus.VALID)
    table.record(a, ProbeStatus.VALID)
    table.record(c, ProbeStatus.AUTH_REQUIRED)
    assert table.valid() == [a, b]
    table.record(a, ProbeStatus.NOT_LISTENING)  # a later round overwrites
    assert table.valid() == [b]
    table.record(d, ProbeStatus.NOT_A_PROXY)  # past the limit the oldest result goes
    assert len(table) == 3 and table.status(b) is None and table.status(a) is ProbeStatus.NOT_LISTENING
    assert table.counts() == {"notListening": 1, "valid": 0, "authenticationRequired": 1, "notAProxy": 1}
    assert table.results()[str(d)] == "notAProxy"


def test_probe_targets_are_node_addresses_once_without_our_own() -> None:
    me, other = Identity.from_secret(bytes(32)), Identity.from_secret(bytes(range(32)))
    keys: list[Any] = [other.public_key, me.public_key, other.public_key, b"short", "text", None]
    assert probe_targets(keys, me.address) == [other.address]


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [("[407::1]:1080", "407::1", 1080), ("192.0.2.1:9", "192.0.2.1", 9), ("[0407:0::1]:65535", "407::1", 65535)],
)
def test_parse_remote(text: str, host: str, port: int) -> None:
    assert parse_remote(text) == (host, port)
    assert show_remote(host, port) == (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


@pytest.mark.parametrize(
    "bad",
    ["", "407::1:1080", "[407::1]", "[407::1]:0", "[407::1]:70000", "host:1080", " [407::1]:1", "tcp://1.2.3.4:5",
     "1.2.3.4", None, 1080, ["[407::1]:1080"], "[407::1]:-1", "x" * 100],
)  # fmt: skip
def test_parse_remote_rejects(bad: Any) -> None:
    with pytest.raises(RemoteError):
        parse_remote(bad)


@given(st.text(max_size=80))
def test_parse_remote_fails_only_with_remote_error(text: str) -> None:
    try:
        host, port = parse_remote(text)
    except RemoteError:
        return
    assert 0 < port < 65536 and ipaddress.ip_address(host)


# --- the relay, on loopback -----------------------------------------------------


async def echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def make_proxy(tmp_path: Any) -> service.Proxy:
    cfg = NodeConfig(run_dir=str(tmp_path), key_file=str(tmp_path / "key"))
    return service.Proxy(cfg, Identity.from_secret(bytes(32)), None, listen_port=free_port())  # type: ignore[arg-type]


async def roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("::1", port)
    writer.write(payload)
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


def test_relay_is_byte_for_byte_bounded_and_stops_on_disconnect(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(service, "MAX_RELAYED", 2)

    async def body() -> None:
        server, port = await echo_server()
        proxy = make_proxy(tmp_path)
        assert await proxy.connect("bad") == {"error": "parse", "message": proxy_error("bad")}
        assert (await proxy.connect(None))["error"] == "none"  # nothing probed valid
        assert await proxy.connect(f"127.0.0.1:{port}") == {"remote": f"127.0.0.1:{port}"}
        payload = bytes(range(256)) * 4096
        assert await roundtrip(proxy.listen_port, payload) == payload
        # two held connections fill the relay; a third is closed at once
        held = [await asyncio.open_connection("::1", proxy.listen_port) for _ in range(2)]
        for _r, w in held:
            w.write(b"x")
        await asyncio.wait_for(asyncio.gather(*(r.readexactly(1) for r, _w in held)), 10)
        r3, _w3 = await asyncio.open_connection("::1", proxy.listen_port)
        assert await asyncio.wait_for(r3.read(), 10) == b""
        assert proxy.counters["relay_refused"] == 1 and len(proxy.streams) == 2
        await proxy.disconnect()  # ends the listener and every stream
        for r, _w in held:
            assert await asyncio.wait_for(r.read(), 10) == b""
        with pytest.raises(OSError):
            await asyncio.open_connection("::1", proxy.listen_port)
        assert proxy.counters["relay_bytes_up"] >= len(payload) and proxy.stats()["gauges"]["remote"] is None
        server.close()

    asyncio.run(body())


def proxy_error(text: str) -> str:
    try:
        parse_remote(text)
    except RemoteError as exc:
        return str(exc)
    raise AssertionError


def test_idle_relayed_connection_is_closed(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(service, "IDLE_TIMEOUT", 0.3)

    async def body() -> None:
        server, port = await echo_server()
        proxy = make_proxy(tmp_path)
        await proxy.connect(f"127.0.0.1:{port}")
        reader, writer = await asyncio.open_connection("::1", proxy.listen_port)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the relay, not by us
        assert proxy.counters["relay_idle_closed"] == 1
        await proxy.disconnect()
        server.close()

    asyncio.run(body())


def test_probe_and_race_classify_real_listeners(tmp_path: Any) -> None:
    """greet() against a valid, an auth-only and a closed port; the race picks the valid one."""

    async def body() -> None:
        async def answer(reply: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(3)
            writer.write(reply)
            await writer.drain()
            writer.close()

        valid = await asyncio.start_server(lambda r, w: answer(b"\x05\x00", r, w), "127.0.0.1", 0)
        auth = await asyncio.start_server(lambda r, w: answer(b"\x05\xff", r, w), "127.0.0.1", 0)
        assert classify(await service.greet("127.0.0.1", valid.sockets[0].getsockname()[1])) is ProbeStatus.VALID
        auth_port = auth.sockets[0].getsockname()[1]
        assert classify(await service.greet("127.0.0.1", auth_port)) is ProbeStatus.AUTH_REQUIRED
        closed = free_port()
        assert classify(await service.greet("::1", closed)) is ProbeStatus.NOT_LISTENING
        valid.close()
        auth.close()

    asyncio.run(body())
