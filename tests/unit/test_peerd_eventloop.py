"""peerd's data-first event loop (services/peerd/eventloop.py) on a real
asyncio loop and real sockets."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from common.spinpoll import SpinPolicy
from services.peerd.eventloop import DataFirstSelector, add_data_reader, loop_factory, remove_data_reader


def run(main: Any, window: float = 0.0) -> Any:
    return asyncio.run(main(), loop_factory=loop_factory(SpinPolicy(window)))


def selector_of(loop: asyncio.AbstractEventLoop) -> DataFirstSelector:
    sel = getattr(loop, "_selector", None)
    assert isinstance(sel, DataFirstSelector)
    return sel


@pytest.mark.parametrize("window", [0.0, 0.001])
def test_data_reader_runs_from_the_wait_before_queued_callbacks(window: float) -> None:
    order: list[str] = []

    async def main() -> int:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        got = asyncio.Event()

        def readable(tag: str) -> None:
            order.append(f"data {tag} {a.recv(100)!r}")
            got.set()

        add_data_reader(a.fileno(), readable, "x")
        b.send(b"ping")
        await asyncio.wait_for(got.wait(), 5)
        got.clear()  # the next byte arrives with a callback already queued
        b.send(b"two")
        loop.call_soon(order.append, "queued")
        await asyncio.wait_for(got.wait(), 5)
        remove_data_reader(a.fileno())
        a.close()
        b.close()
        return selector_of(loop).ran_first

    ran = run(main, window)
    assert ran == 2  # both reads came straight from select, none through asyncio's handles
    assert order == ["data x b'ping'", "data x b'two'", "queued"]


def test_removed_and_plain_readers_go_through_asyncio() -> None:
    async def main() -> tuple[int, list[str]]:
        loop = asyncio.get_running_loop()
        seen: list[str] = []
        a, b = socket.socketpair()
        a.setblocking(False)
        add_data_reader(a.fileno(), lambda: seen.append("first"))
        remove_data_reader(a.fileno())
        done = asyncio.Event()

        def plain() -> None:
            seen.append("plain " + a.recv(10).decode())
            done.set()

        loop.add_reader(a.fileno(), plain)  # same descriptor, a plain reader now: the old entry must not run
        b.send(b"hi")
        await asyncio.wait_for(done.wait(), 5)
        loop.remove_reader(a.fileno())
        a.close()
        b.close()
        return selector_of(loop).ran_first, seen

    ran, seen = run(main)
    assert ran == 0
    assert seen == ["plain hi"]


def test_a_writer_on_the_same_descriptor_still_fires() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        seen: list[str] = []
        a, b = socket.socketpair()
        a.setblocking(False)
        both = asyncio.Event()

        def reader() -> None:
            seen.append("read " + a.recv(10).decode())
            if len(seen) >= 2:
                both.set()

        def writer() -> None:
            loop.remove_writer(a.fileno())
            seen.append("write")
            if len(seen) >= 2:
                both.set()

        add_data_reader(a.fileno(), reader)
        loop.add_writer(a.fileno(), writer)
        b.send(b"z")
        await asyncio.wait_for(both.wait(), 5)
        remove_data_reader(a.fileno())
        a.close()
        b.close()
        return sorted(seen)

    assert run(main) == ["read z", "write"]


def test_an_exception_in_a_data_reader_reaches_the_exception_handler() -> None:
    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        caught: list[Any] = []
        failed = asyncio.Event()

        def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            caught.append(context.get("exception"))
            failed.set()

        loop.set_exception_handler(handler)
        a, b = socket.socketpair()
        a.setblocking(False)

        def broken() -> None:
            a.recv(10)
            raise RuntimeError("bug in a reader")

        add_data_reader(a.fileno(), broken)
        b.send(b"x")
        await asyncio.wait_for(failed.wait(), 5)
        remove_data_reader(a.fileno())
        a.close()
        b.close()
        return caught

    caught = run(main)
    assert len(caught) == 1 and isinstance(caught[0], RuntimeError)


def test_without_the_factory_add_data_reader_is_a_plain_reader() -> None:
    async def main() -> str:
        a, b = socket.socketpair()
        a.setblocking(False)
        got: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        add_data_reader(a.fileno(), lambda: got.done() or got.set_result(a.recv(10).decode()))
        b.send(b"ok")
        text = await asyncio.wait_for(got, 5)
        remove_data_reader(a.fileno())
        a.close()
        b.close()
        return text

    assert asyncio.run(main()) == "ok"
