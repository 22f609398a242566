"""Receiver side of the message protocol (PROTOCOL.md 7.5): incomplete
messages and the checks a CHUNK must pass.

Chunk acceptance follows the reference (effective size = min(size field,
bytes present); offset + size <= length; index <= ceil(length/250) - 1; a
chunk under 250 bytes only at that last index) with the recommended
relaxation: a short chunk is also accepted when it ends exactly at
``length``, so reference senders' 1300-byte splits with a small tail
(L > 1300, 1 <= L % 1300 <= 249) are accepted here. Reassembly is by index
order, offsets unused, as in the reference.

Stricter than the reference, to bound memory: the bytes buffered for one
message never exceed its declared length (slots are a dict, nothing is
allocated from the declared length), and a declared length above the
engine's limit is refused at INIT.

"Assembled": once every slot is filled the chunks are joined and, with a
store, persisted before the chunk that completed them is acknowledged. The
sender then only waits for the DONE ACK and (rightly, see outbound.py)
never starts over, so without this a receiver crash between the last CHUNK
ACK and the DONE would leave the message to abort at its deadline. From
then on the slots are frozen: further chunks are acknowledged if they fit
but not stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.wire.message import Chunk

from .outbound import CHUNK_SIZE, MIN_CHUNK_SIZE

SenderKey = bytes  # the sender's /64 (first 8 bytes of its address): limits are per node, not per address


def sender_key(src_ip: bytes) -> SenderKey:
    return bytes(src_ip[:8])


def max_chunk_index(length: int) -> int:
    """The reference receiver's last allowed chunk index."""
    return -(-length // MIN_CHUNK_SIZE) - 1 if length else 0


@dataclass
class Pending:
    """An inbound message between INIT and a valid DONE."""

    id: bytes
    src_ip: bytes
    dst_ip: bytes
    length: int
    topic: bytes
    reply: bool
    last_activity: float
    slots: int = 0  # ceil(length/1300), grown by higher chunk indices like the reference
    chunks: dict[int, bytes] = field(default_factory=dict)
    buffered: int = 0
    assembled: bytes | None = None  # every slot filled, joined in index order
    seq: int | None = None  # store row of the assembled data, when persisted

    def __post_init__(self) -> None:
        if not self.slots:
            self.slots = -(-self.length // CHUNK_SIZE)

    def same_as(self, length: int, topic: bytes, reply: bool) -> bool:
        return self.length == length and self.topic == topic and self.reply == reply

    def check_chunk(self, chunk: Chunk) -> tuple[str | None, bytes]:
        """(drop reason or None, effective data) for a received CHUNK."""
        data = chunk.data[: chunk.size]
        size = len(data)
        if chunk.offset + size > self.length:
            return "drop_chunk_bounds", data
        if self.assembled is not None:
            return (None if chunk.index < self.slots else "drop_chunk_index"), data
        last = max_chunk_index(self.length)
        if chunk.index > last:
            return "drop_chunk_index", data
        if size < MIN_CHUNK_SIZE and chunk.index != last and chunk.offset + size != self.length:
            return "drop_chunk_small", data
        old = self.chunks.get(chunk.index)
        if self.buffered - (len(old) if old is not None else 0) + size > self.length:
            return "drop_chunk_overflow", data
        return None, data

    def store_chunk(self, index: int, data: bytes) -> None:
        if self.assembled is not None:
            return
        old = self.chunks.get(index)
        self.buffered += len(data) - (len(old) if old is not None else 0)
        self.chunks[index] = data
        if index >= self.slots:
            self.slots = index + 1

    @property
    def complete(self) -> bool:
        return self.assembled is not None or (len(self.chunks) == self.slots and self.buffered == self.length)

    def check_done(self, chunk_count: int) -> str | None:
        if chunk_count != self.slots:
            return "drop_done_count"
        if self.assembled is not None:
            return None
        if len(self.chunks) != self.slots:
            return "drop_done_incomplete"
        if self.buffered != self.length:
            return "drop_done_length"
        return None

    def joined(self) -> bytes:
        """The message data in index order; only valid when ``complete``."""
        if self.assembled is not None:
            return self.assembled
        return b"".join(self.chunks[i] for i in range(self.slots))

    def freeze(self) -> bytes:
        """Keep only the joined data from now on (it is about to be persisted)."""
        self.assembled = self.joined()
        self.chunks = {}
        return self.assembled


@dataclass(slots=True)
class Completed:
    """Enough of a delivered message to answer its sender's retransmissions."""

    length: int
    chunk_count: int
    checksum: bytes
    expires: float  # engine clock
