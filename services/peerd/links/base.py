"""The link interface: what every link type (TCP, TLS, vsock, QUIC, ...)
implements, and what a link may call back into peerd.

One file per link type under ``services/peerd/links/``, each behind this
interface, so the forwarder and the service never know which transport a
packet travels on (the layout of yggdrasil-go's ``src/core/link*.go``).

Three pieces:

* ``Link``: one live connection to a neighbour. peerd calls
  ``send_control`` / ``send_data`` / ``close`` / ``stats``; the link calls
  its ``LinkHost`` back with what it receives.
* ``LinkFactory``: one per link type in a peerd process; listens (inbound
  links are handed to ``LinkHost.accepted``) and dials (``dial`` returns an
  outbound ``Link``).
* ``LinkHost``: implemented by peerd; the callbacks a link uses. Callbacks
  run on the event loop thread and must not block.

Life of a link: the factory makes it (``dial`` or an accept); peerd gives
it a ``link_id``, registers it and calls ``start()``; from then on the link
delivers packets through its host; it ends exactly once with
``LinkHost.on_closed`` (whether peerd closed it or the peer/transport did),
after which peerd forgets it.

Packets are whole wire packets (PROTOCOL.md 2.2: the outer header
included); a link only frames and unframes them, it never looks inside.

Stable after its first commit: additions only (new optional methods with a
default, new fields), never a changed signature.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from common.endpoint import Endpoint
from common.nodeconfig import NodeConfig

# Static link costs added to the smoothed RTT (PROTOCOL.md 2.9, TRANSPORTS.md 1.5):
# (over IPv4 or v4-mapped, over native IPv6); vsock has no IP
COST_TCP = (15, 10)
COST_TLS = (15, 10)
COST_QUIC = (12, 7)
COST_VSOCK = 5

Buffer = bytes | bytearray | memoryview


def ip_cost(host: str, costs: tuple[int, int]) -> int:
    """The static cost for a link to ``host`` (IP text, maybe with %scope):
    ``costs[0]`` over IPv4 or an IPv4-mapped address, ``costs[1]`` over
    native IPv6 (the reference decides by the socket address family)."""
    bare = host.split("%", 1)[0].lower()
    return costs[0] if ":" not in bare or bare.startswith("::ffff:") else costs[1]


class LinkError(Exception):
    """A dial or listen that cannot succeed (bad endpoint for this link type,
    transport unavailable); the message is user-facing."""


@dataclass
class LinkStats:
    """A link's counters since it came up (the API's txBytes/rxBytes are
    wire bytes, framing included) and what waits in its send queue."""

    tx_bytes: int = 0
    rx_bytes: int = 0
    queued_control: int = 0  # control packets waiting
    queued_data_bytes: int = 0  # data bytes waiting (copied or borrowed-and-copied)


class LinkHost(Protocol):
    """What peerd offers its links (implemented by the peerd service)."""

    counters: Counter[str]  # the process's counters: links count their drops here

    def on_control(self, link: Link, packets: list[bytes]) -> None:
        """Whole control packets received on ``link``, in order; the host
        forwards them to the router."""

    def on_data(self, link: Link, buf: bytearray, offsets: list[int]) -> None:
        """Whole data packets received on ``link``: each starts at one of
        ``offsets`` in ``buf`` (its length is in its header; the link has
        already checked that it is complete). The host may change ``buf``
        in place (the hop limit) and must copy anything it keeps: ``buf``
        is the link's to reuse once the call returns. One call per read
        (or per batch of datagrams) keeps the data path batched."""

    def on_local(self, link: Link, runs: list[tuple[bytes, int, int]]) -> None:
        """A stream link's read handed packets for this node to tund itself
        (``local_rx``: this node's /64, tund's DataOut, the largest record;
        hosts without it leave the attribute out): their runs of one flow
        (source + destination, packets, body bytes), for the counters."""

    def on_closed(self, link: Link, reason: str) -> None:
        """``link`` is down (closed by peerd, by the peer, or by an error);
        called exactly once per started link, after which the link sends
        and delivers nothing."""

    def accepted(self, link: Link) -> None:
        """A listener made an inbound ``link``; the host registers it and
        calls ``link.start()`` (or ``link.close()`` to refuse it)."""

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run ``coro`` as a task of the process's task group: if it raises,
        peerd logs the traceback and exits non-zero (supervisord restarts
        it). Links start their loops with this, never with bare
        ``asyncio.create_task``. A link closing ends its tasks normally."""
        ...


class Link(ABC):
    """One live connection to a neighbour, of one link type."""

    link_type: ClassVar[str]  # the endpoint protocol as the API shows it: "tcp", "tls", "quic", "vsock"

    def __init__(self, host: LinkHost, endpoint: Endpoint, name: str, static_cost: int, inbound: bool) -> None:
        self.host = host
        self.endpoint = endpoint  # the remote end (for an inbound link: where it came from)
        self.name = name  # the API's link text (API.md 1), e.g. "TCP <local> <-> <remote>"
        self.static_cost = static_cost
        self.inbound = inbound
        self.link_id = ""  # given by peerd before start(): "<family>-<epoch>-<n>"
        self.closed = False
        self.ifindex = 0  # interface the link leaves by (peerd's linkwatch), 0: unknown or none

    @abstractmethod
    def start(self) -> None:
        """Begin reading and writing (peerd has registered the link). Until
        then the link delivers nothing to its host."""

    @abstractmethod
    def send_control(self, packets: Sequence[bytes]) -> None:
        """Queue whole control packets; they go before any queued data. A
        full control queue drops the newest and counts
        ``control_queue_full``. Never blocks."""

    @abstractmethod
    def send_data(self, frame: Buffer, packets: int = 1, borrowed: bool = False) -> bool:
        """Send ``packets`` whole data packets laid back to back in
        ``frame``; False (and ``data_queue_full`` += packets) when dropped
        because the queue is full. Never blocks. If ``borrowed``, ``frame``
        lives in a shared-memory ring slot that is reused as soon as this
        call returns: the link copies whatever it cannot write at once."""

    @abstractmethod
    def close(self, reason: str) -> None:
        """Take the link down (idempotent); the host hears ``on_closed``
        once, possibly later (after the loops have ended)."""

    @abstractmethod
    def stats(self) -> LinkStats:
        """Counters and queue sizes for the API and the stats stream."""

    def remote_ip(self) -> str | None:
        """The peer's IP (text), for peerd's interface watch (which closes
        links whose interface goes down); None when not an IP link."""
        return None


class LinkFactory(ABC):
    """The listener and dialler of one link type in one peerd process.

    A link module exposes ``make_factory(cfg, host) -> LinkFactory | None``
    (None: this link type is off by configuration)."""

    link_type: ClassVar[str]  # the endpoint protocol it serves

    def __init__(self, cfg: NodeConfig, host: LinkHost) -> None:
        self.cfg = cfg
        self.host = host

    @abstractmethod
    async def listen(self) -> None:
        """Start accepting (if the configuration asks for a listener);
        inbound links go to ``host.accepted``. Raises OSError if the
        listener cannot be made (peerd exits and is restarted)."""

    @abstractmethod
    async def dial(self, endpoint: Endpoint) -> Link:
        """Connect to ``endpoint`` (of this link type) and return the
        outbound link, not yet started. Raises OSError or TimeoutError when
        the peer cannot be reached, LinkError when it never can."""

    @abstractmethod
    async def close(self) -> None:
        """Stop listening (live links are closed by peerd, one by one)."""

    def describe(self) -> str:
        """One line for the start-up log: what this factory listens on."""
        return self.link_type
