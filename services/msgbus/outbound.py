"""Sender side of the message protocol: one ``Outbound`` per pushed message
(PROTOCOL.md 7.4), plus the chunk planner.

Chunk boundaries (reference quirk 7, PROTOCOL.md 7.5 and 11.7)
---------------------------------------------------------------
A reference receiver allocates ``ceil(L/1300)`` slots, requires the DONE
chunk count to equal the slot count, rejects chunks smaller than 250 bytes
unless their index is ``ceil(L/250) - 1``, and so never accepts the last
chunk of a plain 1300-byte split when ``L > 1300`` and ``1 <= L % 1300 <=
249``. ``plan_chunks`` therefore cuts ``n = ceil(L/1300)`` chunks, chunk
``i`` at index ``i`` with its true offset, all 1300 bytes except the last;
when the last would be shorter than 250 bytes and ``n > 1``, the last two
chunks share their ``1300 + r`` bytes evenly (first one gets the odd byte),
so both are 625-650 bytes. Every chunk is then >= 250 bytes except the only
chunk of a message shorter than 250 bytes (index 0, which is that
receiver's ``max_idx``), no chunk exceeds 1300 bytes (so packets stay
within the reference's size), and the chunk count is exactly
``ceil(L/1300)``. An empty message has no chunks (DONE count 0).

Transmission (invisible on the wire except as timing)
-----------------------------------------------------
The reference resends every unacknowledged packet every 100 ms and sends
all chunks at once. This sender keeps the 100 ms tick and minimum
retransmission timeout, but:

- estimates the round-trip time per message (RFC 6298 smoothing, Karn's
  rule: only packets sent once give samples) and waits
  ``clamp(srtt + 4*rttvar, 0.1 s, max_rto)`` before resending, doubling per
  resend of the same packet (capped at ``max_rto``), so multi-hop paths
  with RTT > 100 ms are not flooded with duplicate chunks;
- keeps at most ``window`` chunks unacknowledged;
- "Stalls": when chunks are still unacknowledged and no acknowledgement at
  all came for ``stall_restart`` seconds, the transfer starts over from
  INIT. This recovers from a receiver that restarted and lost its
  incomplete message (the protocol has no NACK), at the cost of resending
  acked chunks, and cannot cause a second delivery: with a chunk
  unacknowledged the receiver cannot have completed the message. Once every
  chunk is acknowledged there is no restart, only DONE retransmission until
  the deadline: a reference receiver never re-acknowledges a DONE, so
  silence then may well mean "delivered, DONE ACK lost", and starting over
  would deliver the message again if it was already popped;
- accepts READ while still in progress (the DONE ACK was lost but the
  message was clearly received) and a DONE ACK whose echoed checksum
  matches even after such a restart.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass

import blake3

from common.wire.message import Abort, Chunk, Done, Init, MessagePacket

CHUNK_SIZE = 1300
MIN_CHUNK_SIZE = 250  # reference receiver's minimum for all but its max_idx chunk
_EPSILON = 1e-6


def plan_chunks(length: int) -> list[tuple[int, int]]:
    """(offset, size) of each chunk, index = position; see the module docstring."""
    if length <= 0:
        return []
    n = -(-length // CHUNK_SIZE)
    sizes = [CHUNK_SIZE] * (n - 1) + [length - CHUNK_SIZE * (n - 1)]
    if n > 1 and sizes[-1] < MIN_CHUNK_SIZE:
        pair = CHUNK_SIZE + sizes[-1]
        sizes[-2], sizes[-1] = pair - pair // 2, pair // 2
    plan = []
    offset = 0
    for size in sizes:
        plan.append((offset, size))
        offset += size
    return plan


class SendState(enum.Enum):
    INIT = "pending"  # INIT not acknowledged yet
    IN_PROGRESS = "sending"
    RECEIVED = "received"  # DONE acknowledged
    READ = "read"
    ABORTED = "aborted"


ACTIVE_STATES = (SendState.INIT, SendState.IN_PROGRESS)


@dataclass(frozen=True, slots=True)
class SendTiming:
    """Retransmission knobs; the defaults keep the reference's 100 ms floor."""

    min_rto: float = 0.1
    max_rto: float = 1.0
    window: int = 256  # chunks sent but not yet acknowledged, per message
    stall_restart: float = 15.0  # no ACK for this long while chunks are outstanding -> start over


class _Chunk:
    __slots__ = ("acked", "offset", "sent_at", "size", "tries")

    def __init__(self, offset: int, size: int) -> None:
        self.offset = offset
        self.size = size
        self.sent_at: float | None = None
        self.tries = 0
        self.acked = False


class Outbound:
    """One pushed message and its transmission state."""

    def __init__(
        self,
        msg_id: bytes,
        src_ip: bytes,
        dst_ip: bytes,
        topic: bytes,
        data: bytes | None,
        length: int,
        reply: bool,
        created_wall: float,
        created: float,
        state: SendState,
        timing: SendTiming,
    ) -> None:
        self.id = msg_id
        self.src_ip = src_ip
        self.dst_ip = dst_ip
        self.topic = topic
        self.data = data
        self.length = length
        self.reply = reply
        self.created_wall = created_wall  # Unix seconds, for status()
        self.created = created  # engine clock; deadlines derive from it
        self.state = state
        self.timing = timing
        self._checksum: bytes | None = None
        self.chunks: list[_Chunk] = []
        self._inflight: dict[int, _Chunk] = {}
        self._next_unsent = 0
        self.acked = 0
        self._init_sent_at: float | None = None
        self._init_tries = 0
        self._done_sent_at: float | None = None
        self._done_tries = 0
        self._srtt: float | None = None
        self._rttvar = 0.0
        self.rto = timing.min_rto
        self._last_progress = created

    # --- helpers ------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def checksum(self) -> bytes:
        if self._checksum is None:
            self._checksum = blake3.blake3(self.data or b"").digest()
        return self._checksum

    def _timeout(self, tries: int) -> float:
        # a hair early, so a tick at exactly sent_at + 0.1 is not lost to float rounding
        return min(self.timing.max_rto, self.rto * (1 << min(tries - 1, 16))) - _EPSILON

    def _sample(self, rtt: float) -> None:
        if rtt < 0:
            return
        if self._srtt is None:
            self._srtt, self._rttvar = rtt, rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt
        self.rto = min(self.timing.max_rto, max(self.timing.min_rto, self._srtt + 4 * self._rttvar))

    def _init_packet(self) -> Init:
        return Init(self.id, self.length, self.topic, self.reply)

    def _chunk_packet(self, index: int, chunk: _Chunk) -> Chunk:
        assert self.data is not None
        return Chunk(self.id, index, chunk.offset, chunk.size, self.data[chunk.offset : chunk.offset + chunk.size])

    def chunk_counts(self) -> tuple[int, int, int]:
        """(never sent, sent but unacknowledged, acknowledged), as the status API reports."""
        sent = len(self._inflight)
        return len(self.chunks) - sent - self.acked, sent, self.acked

    def finish(self, state: SendState) -> None:
        """Enter a final state and drop what only sending needed."""
        self.state = state
        self.data = None
        self.chunks = []
        self._inflight = {}

    # --- timer-driven sending -----------------------------------------------------------

    def service(self, now: float, out: list[MessagePacket], counters: Counter[str]) -> None:
        """Queue whatever is due: (re)sent INIT, chunks, DONE."""
        if self.state is SendState.INIT:
            if self._init_sent_at is None or now - self._init_sent_at >= self._timeout(self._init_tries):
                if self._init_tries:
                    counters["tx_init_retransmit"] += 1
                self._init_sent_at = now
                self._init_tries += 1
                counters["tx_init"] += 1
                out.append(self._init_packet())
            return
        if self.state is not SendState.IN_PROGRESS:
            return
        if self.acked < len(self.chunks) and now - self._last_progress >= self.timing.stall_restart:
            counters["send_restarted"] += 1
            self.restart(now, out, counters)
            return
        for index, chunk in self._inflight.items():
            if chunk.sent_at is not None and now - chunk.sent_at >= self._timeout(chunk.tries):
                chunk.sent_at = now
                chunk.tries += 1
                counters["tx_chunk_retransmit"] += 1
                out.append(self._chunk_packet(index, chunk))
        self._fill(now, out, counters)

    def _fill(self, now: float, out: list[MessagePacket], counters: Counter[str]) -> None:
        """Send new chunks into the window, and DONE once every chunk is acknowledged."""
        while self._next_unsent < len(self.chunks) and len(self._inflight) < self.timing.window:
            index = self._next_unsent
            self._next_unsent += 1
            chunk = self.chunks[index]
            if chunk.acked:
                continue
            chunk.sent_at = now
            chunk.tries = 1
            self._inflight[index] = chunk
            counters["tx_chunk"] += 1
            out.append(self._chunk_packet(index, chunk))
        if self.acked == len(self.chunks) and (
            self._done_sent_at is None or now - self._done_sent_at >= self._timeout(self._done_tries)
        ):
            if self._done_tries:
                counters["tx_done_retransmit"] += 1
            self._done_sent_at = now
            self._done_tries += 1
            counters["tx_done"] += 1
            out.append(Done(self.id, len(self.chunks), self.checksum))

    def restart(self, now: float, out: list[MessagePacket], counters: Counter[str]) -> None:
        """Back to INIT (after a stall); the receiver may have lost everything."""
        self.state = SendState.INIT
        self.chunks = []
        self._inflight = {}
        self._next_unsent = 0
        self.acked = 0
        self._init_sent_at = None
        self._init_tries = 0
        self._done_sent_at = None
        self._done_tries = 0
        self._last_progress = now
        self.service(now, out, counters)

    def abort(self) -> Abort | None:
        """Deadline reached: abort if not yet received, returning the one ABORT to send."""
        if not self.active:
            return None
        self.finish(SendState.ABORTED)
        return Abort(self.id)

    # --- acknowledgements ----------------------------------------------------------------

    def on_init_ack(self, now: float, out: list[MessagePacket], counters: Counter[str]) -> bool:
        if self.state is not SendState.INIT:
            counters["drop_init_ack_state"] += 1
            return False
        if self._init_tries == 1 and self._init_sent_at is not None:
            self._sample(now - self._init_sent_at)
        self.state = SendState.IN_PROGRESS
        self.chunks = [_Chunk(offset, size) for offset, size in plan_chunks(self.length)]
        self._last_progress = now
        self._fill(now, out, counters)
        return True

    def on_chunk_ack(self, index: int, now: float, out: list[MessagePacket], counters: Counter[str]) -> bool:
        if self.state is not SendState.IN_PROGRESS:
            counters["drop_chunk_ack_state"] += 1
            return False
        if index >= len(self.chunks):
            counters["drop_chunk_ack_index"] += 1
            return False
        chunk = self.chunks[index]
        if chunk.acked:
            counters["chunk_ack_duplicate"] += 1
            return False
        chunk.acked = True
        self.acked += 1
        self._inflight.pop(index, None)
        if chunk.tries == 1 and chunk.sent_at is not None:
            self._sample(now - chunk.sent_at)
        self._last_progress = now
        self._fill(now, out, counters)
        return True

    def on_done_ack(self, checksum: bytes, counters: Counter[str]) -> bool:
        """True when the message is now received (the caller persists that)."""
        if not self.active or checksum != self.checksum:
            counters["drop_done_ack_state"] += 1
            return False
        if self.state is SendState.INIT and self._done_tries == 0:
            # a DONE ACK before we ever sent DONE can only come from an earlier attempt
            # (before a restart or crash); the echoed checksum proves it is this message
            counters["done_ack_after_restart"] += 1
        self.finish(SendState.RECEIVED)
        return True

    def on_read(self, counters: Counter[str]) -> bool:
        if self.state not in (SendState.IN_PROGRESS, SendState.RECEIVED):
            counters["drop_read_state"] += 1
            return False
        self.finish(SendState.READ)
        return True
