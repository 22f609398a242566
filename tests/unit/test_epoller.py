"""common/epoller.py with real ZeroMQ sockets and socket pairs: nothing
that is readable is ever slept on."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import zmq

from common.epoller import Epoller


@pytest.fixture
def pair(tmp_path: object) -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    yield push, pull
    ctx.destroy(linger=0)


def wait_ready(poller: Epoller, item: object, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if item in poller.poll(0.05):
            return True
    return False


def test_plain_descriptor_and_timeout() -> None:
    a, b = socket.socketpair()
    poller = Epoller()
    try:
        poller.register(a.fileno())
        assert poller.poll(0) == set()
        b.send(b"x")
        assert poller.poll(1.0) == {a.fileno()}
        a.recv(1)
        assert poller.poll(0) == set()
        poller.unregister(a.fileno())
        b.send(b"y")
        assert poller.poll(0) == set()
    finally:
        poller.close()
        a.close()
        b.close()


def test_messages_queued_before_registration_are_seen(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    push, pull = pair
    push.send(b"early")
    assert pull.poll(5000)  # delivered to pull's queue, and its notification consumed by zmq_poll
    poller = Epoller()
    try:
        poller.register(pull)
        assert poller.poll(1.0) == {pull}  # ZMQ_FD may be quiet; ZMQ_EVENTS is not
        assert pull.recv(zmq.NOBLOCK) == b"early"
    finally:
        poller.close()


def test_a_reader_that_stops_early_is_woken_again(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    push, pull = pair
    poller = Epoller()
    try:
        poller.register(pull)
        poller.poll(0)
        for i in range(5):
            push.send(b"%d" % i)
        assert wait_ready(poller, pull)
        got = []
        while len(got) < 5:
            got.append(pull.recv(zmq.NOBLOCK))  # one at a time, as a loop with a batch limit of 1
            if len(got) < 5:
                assert poller.poll(0) == {pull}, f"slept with {5 - len(got)} messages queued"
        assert got == [b"0", b"1", b"2", b"3", b"4"]
        assert pull not in poller.poll(0.05)
    finally:
        poller.close()


def test_reply_on_a_router_does_not_hide_the_next_request() -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    poller = Epoller()
    try:
        poller.register(router)
        dealer.send(b"one")
        assert wait_ready(poller, router)
        envelope, body = router.recv_multipart(zmq.NOBLOCK)
        dealer.send(b"two")
        assert dealer.poll(0) == 0
        time.sleep(0.2)  # "two" is in router's queue before the reply goes
        router.send_multipart([envelope, body])  # a send processes commands: may take the notification
        assert wait_ready(poller, router)
        assert router.recv_multipart(zmq.NOBLOCK)[1] == b"two"
    finally:
        poller.close()
        ctx.destroy(linger=0)
