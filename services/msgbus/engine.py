"""Sans-IO core of the message subsystem (PROTOCOL.md 7, API.md 2.3-2.4, 3).

``MessageEngine`` is shaped like aioquic's QuicConnection: a plain object
fed with ``push``, ``receive``, ``pop``, ``forward_done`` and
``handle_timer``, drained with ``packets_to_send`` and ``events``, and woken
at ``get_timer``. It reads no clock: ``now`` (monotonic seconds) comes with
every call, and one wall-clock reading given to the constructor maps it to
the Unix times the status API and the store need. Its only side effect is
the optional ``MessageStore`` it calls synchronously before making a
promise (store.py explains the crash-safety argument).

Sender and receiver details are in outbound.py (chunk planning for
reference quirk 7, retransmission) and inbound.py (chunk acceptance).
Engine-level behaviour beyond the reference, all interoperable:

- Incomplete inbound messages are keyed by (source address, id), not id
  alone, so one node cannot reset or abort another node's transfer.
- A re-sent INIT that matches a pending message (same length, topic, REPLY
  flag) keeps the chunks already received instead of discarding them; the
  reference discards, which loses chunks it already acknowledged when an
  INIT duplicate arrives late.
- Completed (source, id) pairs are remembered for ``completed_ttl`` seconds
  (persisted) whether or not the message was popped. Retransmissions of a
  completed message are acknowledged but never delivered again: INIT with
  the same length gets an INIT ACK, an in-bounds CHUNK a CHUNK ACK, and a
  DONE with the same chunk count and checksum a DONE ACK. The reference
  silently drops these, so a lost DONE ACK leaves its sender retrying until
  it aborts at 300 s although the message was delivered.
- ACKs and READs for an outbound message are only accepted from the
  address the message was sent to (where every receiver answers from).
- Everything fed by the wire is bounded (``Limits``): incomplete messages
  per sender /64 (count and declared bytes) and in total, the declared
  length of one message, the inbox (count and bytes; a full inbox drops the
  INIT or DONE unacknowledged so the sender retries), and the completed-id
  table. Drops are counted in ``counters`` by reason; ``receive`` never
  raises for anything a peer can send.
- A reply waiter (``expect_reply``) gets any completed message carrying
  its id, as in the reference; no READ is sent for it.
- With a store, an inbound message whose chunks are all in is persisted
  before its last CHUNK ACK ("assembled", inbound.py), so a receiver crash
  before the DONE does not strand the sender.

Deadlines are the reference's: 300 s after the push an unfinished message
is aborted (one ABORT packet), 600 s after the push it is forgotten. After
a restart the deadlines continue from the persisted push time, and every
unfinished outbound message starts over from INIT. Our receivers recognise
an already delivered message by its completed id; a *reference* receiver
only does while the message sits unpopped in its inbox, so a message it
already delivered and whose pop happened before our crash can reach its
application twice. The protocol offers no way to avoid that.

Public keys are not the engine's business: the shell feeds only packets it
could decrypt (so the sender has a route and a key, the reference's
"no public key -> drop" rule) and fills srcPk/dstPk from the routing table.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import os
import random
import sqlite3
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

import blake3

from common.wire.errors import CodecError
from common.wire.message import (
    MAX_TOPIC_LEN,
    MESSAGE_ID_SIZE,
    Abort,
    Chunk,
    ChunkAck,
    Done,
    DoneAck,
    Init,
    InitAck,
    MessagePacket,
    Read,
    ReadAck,
    decode_message,
)

from .events import ForwardToSocket, MessageEvent, MessageReceived, ReceivedMessage, ReplyReceived
from .inbound import Completed, Pending, SenderKey, sender_key
from .outbound import Outbound, SendState, SendTiming
from .store import (
    OUT_ABORTED,
    OUT_ACTIVE,
    OUT_READ,
    OUT_RECEIVED,
    CompletedRecord,
    InboundRecord,
    MessageStore,
    OutboundRecord,
)
from .topics import TopicConfig

TICK = 0.1  # retransmission tick while anything is being sent (PROTOCOL.md 10)
SEND_WINDOW = 300.0  # abort unfinished messages this long after the push (the default of Limits.send_window)
FORGET_AFTER = 2 * SEND_WINDOW  # drop the outbox entry (status -> not found) this long after the push
SWEEP_INTERVAL = 10.0  # expiry of idle incomplete messages and old completed ids
ADDRESS_SIZE = 16

_FINAL_TO_STORE = {SendState.RECEIVED: OUT_RECEIVED, SendState.READ: OUT_READ, SendState.ABORTED: OUT_ABORTED}
_STORE_TO_STATE = {OUT_RECEIVED: SendState.RECEIVED, OUT_READ: SendState.READ, OUT_ABORTED: SendState.ABORTED}

Packet = tuple[bytes, bytes, MessagePacket]  # (source address, destination address, packet)

MiB = 1 << 20


class MessageError(Exception):
    """Base of the errors ``push`` raises; the shell maps them to API errors."""


class TopicTooLong(MessageError, ValueError):
    """Topic over 255 bytes (HTTP 400, JSON-RPC -32015)."""


class OutboxFull(MessageError):
    """Too many (or too many bytes of) unfinished outbound messages; try again later."""


class InvalidAddress(MessageError, ValueError):
    """A destination or id of the wrong size."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on everything the engine holds; defaults suit a desktop node."""

    max_outbox_messages: int = 10_000  # unfinished outbound messages
    max_outbox_bytes: int = 256 * MiB  # data of unfinished outbound messages
    max_finished: int = 100_000  # finished entries kept for status until forgotten
    max_inbox_messages: int = 10_000  # completed, not yet popped (including ones being forwarded)
    max_inbox_bytes: int = 256 * MiB
    max_message_size: int = 64 * MiB  # declared length an INIT may announce
    max_pending_per_sender: int = 64  # incomplete inbound messages per sender /64
    max_pending_bytes_per_sender: int = 64 * MiB  # sum of their declared lengths
    max_pending_total: int = 4_096
    max_pending_bytes_total: int = 256 * MiB
    pending_idle_timeout: float = 300.0  # drop an incomplete message silent for this long
    completed_ttl: float = 600.0  # remember delivered (source, id) pairs this long
    max_completed: int = 200_000
    send_window: float = SEND_WINDOW  # abort after this long; forget after twice this long


@dataclass(slots=True)
class _InboxEntry:
    message: ReceivedMessage
    forward_socket: str | None  # set while the message is out to a forward socket
    lease: int = 0  # non-zero while a push subscriber holds it (``pop(lease=...)``)
    leased_until: float = 0.0  # engine clock; past it the lease lapses and others may pop it


class MessageEngine:
    """Reliable chunked messages over the overlay; see the module docstring."""

    def __init__(
        self,
        own_ip: bytes,
        now: float,
        *,
        wall_now: float | None = None,
        rng: random.Random | None = None,
        store: MessageStore | None = None,
        limits: Limits | None = None,
        timing: SendTiming | None = None,
        topics: TopicConfig | None = None,
    ) -> None:
        if len(own_ip) != ADDRESS_SIZE:
            raise InvalidAddress("own_ip must be a 16-byte IPv6 address")
        self.own_ip = bytes(own_ip)
        self.limits = limits or Limits()
        self.timing = timing or SendTiming()
        self.topics = topics if topics is not None else TopicConfig()
        self.counters: Counter[str] = Counter()
        self._lease_ids = itertools.count(random.getrandbits(48) | 1)
        self._rng = rng
        self._store = store
        self._wall_offset = (now if wall_now is None else wall_now) - now
        self._out: list[Packet] = []
        self._events: list[MessageEvent] = []
        # sender side
        self._outbox: dict[bytes, Outbound] = {}
        self._active: dict[bytes, Outbound] = {}
        self._active_bytes = 0
        self._finished: OrderedDict[bytes, None] = OrderedDict()
        self._deadlines: list[tuple[float, int, str, Outbound]] = []
        self._heap_seq = itertools.count()
        self._next_tick: float | None = None
        # receiver side
        self._pending: dict[tuple[bytes, bytes], Pending] = {}
        self._usage: dict[SenderKey, list[int]] = {}
        self._pending_bytes = 0
        self._completed: OrderedDict[tuple[bytes, bytes], Completed] = OrderedDict()
        self._inbox: OrderedDict[int, _InboxEntry] = OrderedDict()
        self._inbox_bytes = 0
        self._next_seq = 1
        self._waiters: Counter[bytes] = Counter()
        self._next_sweep: float | None = None
        if store is not None:
            self._restore(now)

    # --- clock --------------------------------------------------------------------

    def _wall(self, now: float) -> float:
        return now + self._wall_offset

    def _mono(self, wall: float) -> float:
        return wall - self._wall_offset

    # --- restore --------------------------------------------------------------------

    def _restore(self, now: float) -> None:
        assert self._store is not None
        state = self._store.load()
        expired: list[bytes] = []
        for rec in state.outbox:
            created = self._mono(rec.created)
            if created + 2 * self.limits.send_window <= now or (rec.state == OUT_ACTIVE and rec.data is None):
                expired.append(rec.id)
                continue
            st = _STORE_TO_STATE.get(rec.state, SendState.INIT)
            data = rec.data if st is SendState.INIT else None
            msg = Outbound(
                rec.id,
                rec.src_ip,
                rec.dst_ip,
                rec.topic,
                data,
                rec.length,
                rec.reply,
                created_wall=rec.created,
                created=created,
                state=st,
                timing=self.timing,
            )
            self._add_outbound(msg)
            if msg.active and created + self.limits.send_window > now:
                self._service(msg, now)
            self.counters["restored_outbound"] += 1
        self._store.delete_outbound(expired)
        for irec in state.inbox:
            self._next_seq = max(self._next_seq, irec.seq + 1)
            if irec.assembled:
                self._restore_assembled(irec, now)
                continue
            message = ReceivedMessage(irec.id, irec.src_ip, irec.dst_ip, irec.topic, irec.data, irec.reply, irec.seq)
            self._inbox[irec.seq] = _InboxEntry(message, irec.forward_socket)
            self._inbox_bytes += len(irec.data)
            if irec.forward_socket is not None:
                # at-least-once: the crash may have come after the socket got it
                self._events.append(ForwardToSocket(message, irec.forward_socket))
            self.counters["restored_inbound"] += 1
        for crec in state.completed:
            expires = self._mono(crec.expires)
            if expires > now:
                self._completed[(crec.src_ip, crec.id)] = Completed(
                    crec.length, crec.chunk_count, crec.checksum, expires
                )
        if self._completed:
            self._next_sweep = now + SWEEP_INTERVAL

    def _restore_assembled(self, irec: InboundRecord, now: float) -> None:
        """An inbound message that had all its chunks but no DONE yet: wait for the DONE again."""
        pending = Pending(
            irec.id, irec.src_ip, irec.dst_ip, len(irec.data), irec.topic, irec.reply, now, slots=irec.slots
        )
        pending.assembled, pending.buffered, pending.seq = irec.data, len(irec.data), irec.seq
        self._track_pending(pending, now)
        self.counters["restored_assembled"] += 1

    # --- API: sending -----------------------------------------------------------------

    def push(self, dst_ip: bytes, topic: bytes, data: bytes, now: float, *, reply_to: bytes | None = None) -> bytes:
        """Queue a message (durably, when there is a store) and send its INIT; returns the id.

        ``reply_to`` sends a reply: same id, REPLY flag, empty topic (the given topic is
        ignored, as in the API). A reply replaces an outbox entry with the same id.
        Raises TopicTooLong, OutboxFull or InvalidAddress; store errors propagate.
        """
        msg, old = self._prepare_push(dst_ip, topic, data, now, reply_to)
        if self._store is not None:
            self._store.add_outbound(self._record(msg))
        self._commit_push(msg, old, now)
        return msg.id

    def _prepare_push(
        self, dst_ip: bytes, topic: bytes, data: bytes, now: float, reply_to: bytes | None
    ) -> tuple[Outbound, Outbound | None]:
        """Validate and build the outbound message without changing any state."""
        dst_ip = bytes(dst_ip)
        if len(dst_ip) != ADDRESS_SIZE:
            raise InvalidAddress("destination must be a 16-byte IPv6 address")
        if reply_to is not None:
            if len(reply_to) != MESSAGE_ID_SIZE:
                raise InvalidAddress("message id must be 8 bytes")
            topic = b""
        topic = bytes(topic)
        if len(topic) > MAX_TOPIC_LEN:
            raise TopicTooLong(f"topic is {len(topic)} bytes, at most {MAX_TOPIC_LEN} allowed")
        data = bytes(data)
        old = self._outbox.get(bytes(reply_to)) if reply_to is not None else None
        old_active = 1 if old is not None and old.active else 0
        old_bytes = old.length if old is not None and old.active else 0
        if len(self._active) - old_active >= self.limits.max_outbox_messages:
            raise OutboxFull(f"{len(self._active)} messages are already being sent")
        if self._active_bytes - old_bytes + len(data) > self.limits.max_outbox_bytes:
            raise OutboxFull(f"outbox holds {self._active_bytes} bytes; {len(data)} more do not fit")
        msg_id = bytes(reply_to) if reply_to is not None else self._new_id()
        msg = Outbound(
            msg_id,
            self.own_ip,
            dst_ip,
            topic,
            data,
            len(data),
            reply_to is not None,
            created_wall=self._wall(now),
            created=now,
            state=SendState.INIT,
            timing=self.timing,
        )
        return msg, old

    @staticmethod
    def _record(msg: Outbound) -> OutboundRecord:
        return OutboundRecord(
            msg.id, msg.src_ip, msg.dst_ip, msg.topic, msg.data, msg.length, msg.reply, msg.created_wall, OUT_ACTIVE
        )

    def _commit_push(self, msg: Outbound, old: Outbound | None, now: float) -> None:
        if old is not None:
            self._remove_outbound(old)
            self.counters["outbox_replaced"] += 1
        self._add_outbound(msg)
        self.counters["pushed"] += 1
        self._service(msg, now)

    def _new_id(self) -> bytes:
        while True:
            msg_id = self._rng.randbytes(MESSAGE_ID_SIZE) if self._rng is not None else os.urandom(MESSAGE_ID_SIZE)
            if msg_id not in self._outbox:
                return msg_id

    def _add_outbound(self, msg: Outbound) -> None:
        self._outbox[msg.id] = msg
        if msg.active:
            self._active[msg.id] = msg
            self._active_bytes += msg.length
            heapq.heappush(self._deadlines, (msg.created + self.limits.send_window, next(self._heap_seq), "abort", msg))
        else:
            self._finished[msg.id] = None
        forget_at = msg.created + 2 * self.limits.send_window
        heapq.heappush(self._deadlines, (forget_at, next(self._heap_seq), "forget", msg))

    def _remove_outbound(self, msg: Outbound) -> None:
        if self._outbox.get(msg.id) is msg:
            del self._outbox[msg.id]
        if self._active.get(msg.id) is msg:
            del self._active[msg.id]
            self._active_bytes -= msg.length
        self._finished.pop(msg.id, None)

    def _service(self, msg: Outbound, now: float) -> None:
        sent: list[MessagePacket] = []
        msg.service(now, sent, self.counters)
        self._emit_from(msg, sent)
        if self._next_tick is None and self._active:
            self._next_tick = now + TICK

    def _emit_from(self, msg: Outbound, packets: list[MessagePacket]) -> None:
        for pkt in packets:
            self._out.append((msg.src_ip, msg.dst_ip, pkt))

    def _finish(self, msg: Outbound, now: float) -> None:
        """Bookkeeping after ``msg`` reached a final state (already set on it)."""
        if self._active.pop(msg.id, None) is not None:
            self._active_bytes -= msg.length
        self._finished[msg.id] = None
        self._persist_state(msg)
        while len(self._finished) > self.limits.max_finished:
            old_id, _ = self._finished.popitem(last=False)
            old = self._outbox.pop(old_id, None)
            if old is not None:
                self._delete_outbound([old_id])
                self.counters["forgotten_early"] += 1

    def _persist_state(self, msg: Outbound) -> None:
        if self._store is None:
            return
        try:
            self._store.set_outbound_state(msg.id, _FINAL_TO_STORE[msg.state])
        except sqlite3.Error:
            # harmless if lost: after a restart the message is re-sent and the receiver
            # acknowledges it as already completed
            self.counters["store_error"] += 1

    def _delete_outbound(self, ids: list[bytes]) -> None:
        if self._store is None:
            return
        try:
            self._store.delete_outbound(ids)
        except sqlite3.Error:
            self.counters["store_error"] += 1

    def status(self, msg_id: bytes, now: float) -> dict[str, Any] | None:
        """The API's MessageInfo JSON object, or None (unknown or forgotten)."""
        msg = self._outbox.get(bytes(msg_id))
        if msg is None:
            return None
        state: str | dict[str, dict[str, int]]
        if msg.state is SendState.IN_PROGRESS:
            pending, sent, acked = msg.chunk_counts()
            state = {"sending": {"pending": pending, "sent": sent, "acked": acked}}
        else:
            state = msg.state.value
        created = int(msg.created_wall // 1)
        return {
            "dst": str(ipaddress.IPv6Address(msg.dst_ip)),
            "state": state,
            "created": created,
            "deadline": created + int(self.limits.send_window),
            "msgLen": msg.length,
        }

    # --- API: replies ---------------------------------------------------------------------

    def expect_reply(self, msg_id: bytes) -> None:
        """Route the next completed message with this id to ``ReplyReceived`` (call right after push)."""
        self._waiters[bytes(msg_id)] += 1

    def cancel_reply(self, msg_id: bytes) -> None:
        """A waiter gave up (reply timeout); later messages with this id go to the inbox."""
        key = bytes(msg_id)
        if self._waiters[key] > 1:
            self._waiters[key] -= 1
        else:
            self._waiters.pop(key, None)

    # --- API: inbox --------------------------------------------------------------------------

    def pop(self, topic: bytes | None, peek: bool, now: float) -> ReceivedMessage | None:
        """Oldest inbox message (with exactly this topic, if given); queues a READ to its sender.

        Without ``peek`` the message is removed durably before it is returned.
        """
        found = self._next_poppable(topic, now)
        if found is None:
            return None
        seq, entry = found
        if not peek:
            self._remove_inbox(seq)
        self._read(entry.message)
        return entry.message

    def lease(self, topic: bytes | None, seconds: float, now: float) -> tuple[ReceivedMessage, int] | None:
        """Like ``pop``, but the message is held for the caller (a push subscriber) for ``seconds``.

        Nobody else gets it until the lease lapses; it is removed (and its READ
        sent) only by ``ack``, once the caller has delivered it. Leases live in
        memory: after a restart every message is poppable again, so a crash
        between delivery and ``ack`` repeats a message, never loses one.
        """
        found = self._next_poppable(topic, now)
        if found is None:
            return None
        _, entry = found
        entry.lease = next(self._lease_ids)
        entry.leased_until = now + seconds
        self.counters["leased"] += 1
        return entry.message, entry.lease

    def _next_poppable(self, topic: bytes | None, now: float) -> tuple[int, _InboxEntry] | None:
        wanted = None if topic is None else bytes(topic)
        for seq, entry in self._inbox.items():
            if entry.forward_socket is not None or entry.leased_until > now:
                continue
            if wanted is not None and entry.message.topic != wanted:
                continue
            return seq, entry
        return None

    def _read(self, message: ReceivedMessage) -> None:
        self._out.append((message.dst_ip, message.src_ip, Read(message.id)))
        self.counters["tx_read"] += 1

    def ack(self, seq: int, lease: int) -> bool:
        """The leased message was delivered: remove it and tell its sender it was read.

        False when that lease is no longer held (it lapsed and someone else may
        have the message, or the engine restarted)."""
        entry = self._inbox.get(seq)
        if entry is None or entry.lease != lease or lease == 0:
            self.counters["ack_stale"] += 1
            return False
        self._remove_inbox(seq)
        self._read(entry.message)
        self.counters["acked"] += 1
        return True

    def release(self, seq: int, lease: int) -> bool:
        """The leased message could not be delivered: make it poppable again now."""
        entry = self._inbox.get(seq)
        if entry is None or entry.lease != lease or lease == 0:
            return False
        entry.lease, entry.leased_until = 0, 0.0
        self.counters["released"] += 1
        self._events.append(MessageReceived(entry.message))
        return True

    def release_all(self) -> int:
        """Every lease lapses now (the subscribers' process restarted); how many there were."""
        held = [e for e in self._inbox.values() if e.lease]
        for entry in held:
            entry.lease, entry.leased_until = 0, 0.0
            self._events.append(MessageReceived(entry.message))
        self.counters["released"] += len(held)
        return len(held)

    def _remove_inbox(self, seq: int) -> None:
        """Durably first: a store failure raises with the message still in the inbox."""
        if self._store is not None:
            self._store.delete_inbound(seq)
        entry = self._inbox.pop(seq)
        self._inbox_bytes -= len(entry.message.data)

    def inbox_size(self) -> int:
        """Completed messages held, including those out to a forward socket."""
        return len(self._inbox)

    # --- API: forward sockets -----------------------------------------------------------------

    def forward_done(self, message: ReceivedMessage, reply: bytes | None, now: float) -> None:
        """Outcome of a ``ForwardToSocket``: a non-empty reply is sent back as a reply message;
        None or empty (failure, timeout, no answer) puts the message in the inbox."""
        entry = self._inbox.get(message.seq)
        if entry is None or entry.forward_socket is None:
            self.counters["forward_done_unknown"] += 1
            return
        if reply:
            try:
                msg, old = self._prepare_push(message.src_ip, b"", reply, now, message.id)
            except OutboxFull:
                self.counters["forward_reply_dropped"] += 1
            else:
                try:
                    if self._store is not None:
                        with self._store.transaction():
                            self._store.add_outbound(self._record(msg))
                            self._store.delete_inbound(message.seq)
                except sqlite3.Error:  # nothing changed: the message goes to the inbox instead
                    self.counters["store_error"] += 1
                else:
                    del self._inbox[message.seq]
                    self._inbox_bytes -= len(message.data)
                    self._commit_push(msg, old, now)
                    self.counters["forward_replied"] += 1
                    return
        if self._store is not None:
            try:
                self._store.set_inbound_forward(message.seq, None)
            except sqlite3.Error:  # harmless: after a restart it is forwarded again
                self.counters["store_error"] += 1
        entry.forward_socket = None
        self.counters["forward_to_inbox"] += 1
        self._events.append(MessageReceived(entry.message))

    # --- drains and timers ---------------------------------------------------------------------

    def packets_to_send(self) -> list[Packet]:
        """(source, destination, packet) triples to encode and send, oldest first."""
        out, self._out = self._out, []
        return out

    def events(self) -> list[MessageEvent]:
        events, self._events = self._events, []
        return events

    def get_timer(self) -> float | None:
        """When ``handle_timer`` should next run (engine clock), or None when idle."""
        times = [t for t in (self._next_tick, self._next_sweep) if t is not None]
        if self._deadlines:
            times.append(self._deadlines[0][0])
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, kind, msg = heapq.heappop(self._deadlines)
            if self._outbox.get(msg.id) is not msg:
                continue
            if kind == "abort":
                abort = msg.abort()
                if abort is not None:
                    self._out.append((msg.src_ip, msg.dst_ip, abort))
                    self.counters["aborted"] += 1
                    self._finish(msg, now)
            else:
                self._remove_outbound(msg)
                self._delete_outbound([msg.id])
                self.counters["forgotten"] += 1
        if self._next_tick is not None and now >= self._next_tick:
            for msg in list(self._active.values()):
                self._service(msg, now)
            self._next_tick = now + TICK if self._active else None
        if self._next_sweep is not None and now >= self._next_sweep:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        idle = [k for k, p in self._pending.items() if now - p.last_activity >= self.limits.pending_idle_timeout]
        for key in idle:
            self._release_pending(key)
            self.counters["pending_expired"] += 1
        expired = 0
        while self._completed:
            key, info = next(iter(self._completed.items()))
            if info.expires > now:
                break
            del self._completed[key]
            expired += 1
        if expired and self._store is not None:
            try:
                self._store.purge_completed(self._wall(now))
            except sqlite3.Error:
                self.counters["store_error"] += 1
        self._next_sweep = now + SWEEP_INTERVAL if (self._pending or self._completed) else None

    def queue_depths(self) -> dict[str, int]:
        """Gauges for the stats socket."""
        return {
            "outbox_active": len(self._active),
            "outbox_active_bytes": self._active_bytes,
            "outbox_finished": len(self._finished),
            "inbox": len(self._inbox),
            "inbox_bytes": self._inbox_bytes,
            "pending": len(self._pending),
            "pending_bytes": self._pending_bytes,
            "completed_ids": len(self._completed),
            "reply_waiters": len(self._waiters),
        }

    # --- wire input ---------------------------------------------------------------------------

    def receive(self, src_ip: bytes, dst_ip: bytes, packet: MessagePacket | bytes, now: float) -> None:
        """One message packet from the wire (decoded, or raw bytes after the inner header).

        ``src_ip``/``dst_ip`` are the data packet's addresses. Never raises for bad input.
        """
        if isinstance(packet, bytes | bytearray | memoryview):
            try:
                packet = decode_message(bytes(packet))
            except CodecError:
                self.counters["drop_malformed"] += 1
                return
        if len(src_ip) != ADDRESS_SIZE or len(dst_ip) != ADDRESS_SIZE:
            self.counters["drop_bad_address"] += 1
            return
        src, dst = bytes(src_ip), bytes(dst_ip)
        if isinstance(packet, Init):
            self._on_init(src, dst, packet, now)
        elif isinstance(packet, Chunk):
            self._on_chunk(src, dst, packet, now)
        elif isinstance(packet, Done):
            self._on_done(src, dst, packet, now)
        elif isinstance(packet, Abort):
            self._on_abort(src, packet)
        elif isinstance(packet, InitAck | ChunkAck | DoneAck | Read):
            self._on_answer(src, packet, now)
        elif isinstance(packet, ReadAck):
            self.counters["rx_read_ack"] += 1
        else:
            self.counters["drop_unknown_packet"] += 1

    # --- answers to our outbound messages --------------------------------------------------------

    def _on_answer(self, src: bytes, pkt: InitAck | ChunkAck | DoneAck | Read, now: float) -> None:
        name = type(pkt).__name__.lower()
        self.counters[f"rx_{name}"] += 1
        msg = self._outbox.get(pkt.id)
        if msg is None:
            self.counters[f"drop_{name}_unknown"] += 1
            return
        if src != msg.dst_ip:
            self.counters[f"drop_{name}_source"] += 1
            return
        sent: list[MessagePacket] = []
        if isinstance(pkt, InitAck):
            msg.on_init_ack(now, sent, self.counters)
        elif isinstance(pkt, ChunkAck):
            msg.on_chunk_ack(pkt.index, now, sent, self.counters)
        elif isinstance(pkt, DoneAck):
            if msg.on_done_ack(pkt.checksum, self.counters):
                self.counters["sent_received"] += 1
                self._finish(msg, now)
        elif msg.on_read(self.counters):
            self.counters["sent_read"] += 1
            self._finish(msg, now)
        self._emit_from(msg, sent)

    # --- inbound messages ------------------------------------------------------------------------

    def _on_init(self, src: bytes, dst: bytes, pkt: Init, now: float) -> None:
        self.counters["rx_init"] += 1
        if not pkt.reply and not self.topics.is_allowed(pkt.topic, src):
            self.counters["drop_init_acl"] += 1
            return
        key = (src, pkt.id)
        ack = (dst, src, InitAck(pkt.id, pkt.length, len(pkt.topic), pkt.reply, pkt.reserved))
        done = self._completed.get(key)
        if done is not None and done.expires > now:
            if done.length == pkt.length:
                self.counters["init_completed_acked"] += 1
                self._out.append(ack)
            else:
                self.counters["drop_init_completed"] += 1
            return
        pending = self._pending.get(key)
        if pending is not None and pending.same_as(pkt.length, pkt.topic, pkt.reply):
            pending.last_activity = now
            self.counters["init_duplicate"] += 1
            self._out.append(ack)
            return
        if pending is not None:
            self._release_pending(key)
            self.counters["pending_replaced"] += 1
        reason = self._admit(src, pkt)
        if reason is not None:
            self.counters[reason] += 1
            return
        self._track_pending(Pending(pkt.id, src, dst, pkt.length, pkt.topic, pkt.reply, now), now)
        self._out.append(ack)

    def _admit(self, src: bytes, pkt: Init) -> str | None:
        """Why a new incomplete message cannot be accepted now, or None."""
        lim = self.limits
        if pkt.length > lim.max_message_size:
            return "drop_init_too_large"
        if not (pkt.reply and pkt.id in self._waiters) and (
            len(self._inbox) >= lim.max_inbox_messages or self._inbox_bytes + pkt.length > lim.max_inbox_bytes
        ):
            return "drop_init_inbox_full"
        count, nbytes = self._usage.get(sender_key(src), (0, 0))
        if count >= lim.max_pending_per_sender or nbytes + pkt.length > lim.max_pending_bytes_per_sender:
            return "drop_init_sender_limit"
        if (
            len(self._pending) >= lim.max_pending_total
            or self._pending_bytes + pkt.length > lim.max_pending_bytes_total
        ):
            return "drop_init_pending_limit"
        return None

    def _track_pending(self, pending: Pending, now: float) -> None:
        self._pending[(pending.src_ip, pending.id)] = pending
        usage = self._usage.setdefault(sender_key(pending.src_ip), [0, 0])
        usage[0] += 1
        usage[1] += pending.length
        self._pending_bytes += pending.length
        if self._next_sweep is None:
            self._next_sweep = now + SWEEP_INTERVAL

    def _release_pending(self, key: tuple[bytes, bytes], delivered: bool = False) -> None:
        pending = self._pending.pop(key, None)
        if pending is None:
            return
        if pending.seq is not None and not delivered and self._store is not None:
            try:
                self._store.delete_inbound(pending.seq, durable=False)
            except sqlite3.Error:
                self.counters["store_error"] += 1
        skey = sender_key(pending.src_ip)
        usage = self._usage[skey]
        usage[0] -= 1
        usage[1] -= pending.length
        if usage[0] <= 0:
            del self._usage[skey]
        self._pending_bytes -= pending.length

    def _on_chunk(self, src: bytes, dst: bytes, pkt: Chunk, now: float) -> None:
        self.counters["rx_chunk"] += 1
        key = (src, pkt.id)
        ack = (dst, src, ChunkAck(pkt.id, pkt.index, pkt.offset, pkt.size, pkt.reserved))
        pending = self._pending.get(key)
        if pending is None:
            done = self._completed.get(key)
            if done is not None and done.expires > now and pkt.offset + min(pkt.size, len(pkt.data)) <= done.length:
                self.counters["chunk_completed_acked"] += 1
                self._out.append(ack)
            else:
                self.counters["drop_chunk_unknown"] += 1
            return
        reason, data = pending.check_chunk(pkt)
        if reason is not None:
            self.counters[reason] += 1
            return
        pending.store_chunk(pkt.index, data)
        pending.last_activity = now
        if (
            self._store is not None
            and pending.seq is None
            and pending.complete
            and not self._persist_assembled(pending)
        ):
            return
        self._out.append(ack)

    def _persist_assembled(self, p: Pending) -> bool:
        """Store a message whose chunks are all in before the last CHUNK ACK (see inbound.py)."""
        assert self._store is not None
        data = p.freeze()
        seq = self._next_seq
        record = InboundRecord(seq, p.id, p.src_ip, p.dst_ip, p.topic, data, p.reply, None, 0.0, True, p.slots)
        try:
            self._store.add_assembled(record)
        except sqlite3.Error:
            self.counters["store_error"] += 1
            return False
        self._next_seq += 1
        p.seq = seq
        return True

    def _on_done(self, src: bytes, dst: bytes, pkt: Done, now: float) -> None:
        self.counters["rx_done"] += 1
        key = (src, pkt.id)
        ack = (dst, src, DoneAck(pkt.id, pkt.chunk_count, pkt.checksum, pkt.reserved))
        pending = self._pending.get(key)
        if pending is None:
            done = self._completed.get(key)
            if (
                done is not None
                and done.expires > now
                and done.checksum == pkt.checksum
                and done.chunk_count == pkt.chunk_count
            ):
                self.counters["done_completed_acked"] += 1
                self._out.append(ack)
            else:
                self.counters["drop_done_unknown"] += 1
            return
        pending.last_activity = now
        reason = pending.check_done(pkt.chunk_count)
        if reason is not None:
            self.counters[reason] += 1
            return
        data = pending.joined()
        if blake3.blake3(data).digest() != pkt.checksum:
            self.counters["drop_done_checksum"] += 1
            return
        if self._deliver(pending, data, pkt, now):
            self._release_pending(key, delivered=True)
            self._out.append(ack)

    def _deliver(self, p: Pending, data: bytes, done: Done, now: float) -> bool:
        """Hand a completed message on (7.6); False if it must wait (no ACK, sender retries)."""
        to_waiter = self._waiters.get(p.id, 0) > 0
        forward = None if to_waiter else self.topics.forward_socket(p.topic)
        lim = self.limits
        if not to_waiter and (
            len(self._inbox) >= lim.max_inbox_messages or self._inbox_bytes + len(data) > lim.max_inbox_bytes
        ):
            self.counters["drop_done_inbox_full"] += 1
            return False
        seq = self._next_seq
        message = ReceivedMessage(p.id, p.src_ip, p.dst_ip, p.topic, data, p.reply, seq)
        completed = Completed(p.length, done.chunk_count, done.checksum, now + lim.completed_ttl)
        key = (p.src_ip, p.id)
        excess = len(self._completed) + (key not in self._completed) - lim.max_completed
        evict = [k for k in itertools.islice(self._completed, max(excess, 0) + 1) if k != key][: max(excess, 0)]
        if self._store is not None:
            wall = self._wall(now)
            crec = CompletedRecord(
                p.src_ip, p.id, p.length, done.chunk_count, done.checksum, self._wall(completed.expires)
            )
            try:
                if p.seq is not None:
                    new_seq = None if to_waiter else seq
                    self._store.complete_assembled(p.seq, new_seq, forward, wall, crec, evict)
                else:
                    record = None
                    if not to_waiter:
                        record = InboundRecord(seq, p.id, p.src_ip, p.dst_ip, p.topic, data, p.reply, forward, wall)
                    self._store.add_inbound(record, crec, evict)
            except sqlite3.Error:
                self.counters["store_error"] += 1
                return False
        self._next_seq += 1
        for old in evict:
            del self._completed[old]
        self.counters["completed_evicted"] += len(evict)
        self._completed.pop(key, None)
        self._completed[key] = completed
        if self._next_sweep is None:
            self._next_sweep = now + SWEEP_INTERVAL
        self.counters["delivered"] += 1
        if to_waiter:
            del self._waiters[p.id]
            self._events.append(ReplyReceived(message))
            return True
        self._inbox[seq] = _InboxEntry(message, forward)
        self._inbox_bytes += len(data)
        if forward is not None:
            self._events.append(ForwardToSocket(message, forward))
        else:
            self._events.append(MessageReceived(message))
        return True

    def _on_abort(self, src: bytes, pkt: Abort) -> None:
        self.counters["rx_abort"] += 1
        if (src, pkt.id) in self._pending:
            self._release_pending((src, pkt.id))
            self.counters["pending_aborted"] += 1
