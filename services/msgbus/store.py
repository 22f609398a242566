"""Durable message state: the outbox, the inbox and recently completed ids.

Queued and received messages are hard state (ARCHITECTURE.md "State and
restarts"): a kill -9 of msgbus at any moment must neither lose nor
duplicate a message. The engine calls this store synchronously at the
moments where it makes a promise to somebody else, and only makes the
promise after the call returned:

- ``push`` returns a message id to the API caller only after the outbound
  message is committed;
- a DONE ACK goes to the remote sender (which then forgets the message)
  only after the completed message *and* its completed-id record are
  committed in one transaction;
- ``pop`` returns a message to the API caller only after its removal is
  committed, so a popped message never comes back.

What is *not* stored, because the protocol rebuilds it: chunk-level send
progress (a restored outbound message restarts from INIT) and incomplete
inbound messages (their sender restarts; see engine.py "Stalls").

Fsync policy: sqlite3 in WAL mode with ``synchronous=FULL`` for the three
promise-making commits above (push, completed message + id, pop). In WAL
mode NORMAL already survives a process crash (the WAL write is in the OS
page cache when COMMIT returns), but only FULL fsyncs the WAL on each commit
and so also survives power loss or a kernel crash; each of these commits is
a promise to another party (API caller, remote sender) that cannot be taken
back, and they happen once or twice per message, not per packet, so one
fsync each is the price. Bookkeeping commits whose loss is harmless (final
outbound states, which only make a restarted sender re-send and the
receiver re-acknowledge; expiry deletes; moving a forwarded message to the
inbox, which only forwards it again) run at NORMAL: they reach the disk
with the next FULL commit's fsync of the same WAL file. Pass
``synchronous="NORMAL"`` to run everything at NORMAL (tests, tmpfs run
directories) and trade power-loss safety for throughput.

Completed-id records keep (src, id) -> (length, chunk count, checksum) with
a wall-clock expiry, so a sender that retransmits after our crash (or after
losing our DONE ACK) is answered without a second delivery (PROTOCOL.md 7.5
keeps completed ids only while the message is in the inbox; we keep them
for a fixed time, popped or not).

The connection is opened with ``check_same_thread=False`` because the shell
may create the engine on one thread and run it on another; calls must still
be serialised, which the single-owner engine does anyway.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 2  # 2: inbox.assembled, inbox.slots
# how long a write waits for a lock another process holds on the file (only msgbus
# writes it); then the call fails and the API answers 500, msgbus keeps serving
BUSY_TIMEOUT = 1.0

OUT_ACTIVE = "active"
OUT_RECEIVED = "received"
OUT_READ = "read"
OUT_ABORTED = "aborted"
_OUT_STATES = (OUT_ACTIVE, OUT_RECEIVED, OUT_READ, OUT_ABORTED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id BLOB PRIMARY KEY,
    src BLOB NOT NULL,
    dst BLOB NOT NULL,
    topic BLOB NOT NULL,
    data BLOB,
    length INTEGER NOT NULL,
    reply INTEGER NOT NULL,
    created REAL NOT NULL,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS inbox (
    seq INTEGER PRIMARY KEY,
    id BLOB NOT NULL,
    src BLOB NOT NULL,
    dst BLOB NOT NULL,
    topic BLOB NOT NULL,
    data BLOB NOT NULL,
    reply INTEGER NOT NULL,
    forward_socket TEXT,
    received REAL NOT NULL,
    assembled INTEGER NOT NULL DEFAULT 0,
    slots INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS completed (
    src BLOB NOT NULL,
    id BLOB NOT NULL,
    length INTEGER NOT NULL,
    chunk_count INTEGER NOT NULL,
    checksum BLOB NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (src, id)
);
CREATE INDEX IF NOT EXISTS completed_expires ON completed (expires);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class StoreError(Exception):
    """The database cannot be used (wrong schema version, corrupt file)."""


@dataclass(frozen=True, slots=True)
class OutboundRecord:
    id: bytes
    src_ip: bytes
    dst_ip: bytes
    topic: bytes
    data: bytes | None  # None once the message reached a final state
    length: int
    reply: bool
    created: float  # Unix seconds (wall clock) of the push
    state: str  # one of OUT_ACTIVE, OUT_RECEIVED, OUT_READ, OUT_ABORTED


@dataclass(frozen=True, slots=True)
class InboundRecord:
    seq: int
    id: bytes
    src_ip: bytes
    dst_ip: bytes
    topic: bytes
    data: bytes
    reply: bool
    forward_socket: str | None  # set while the message is handed to a forward socket
    received: float  # Unix seconds
    assembled: bool = False  # every chunk is in but no valid DONE yet: not a message yet
    slots: int = 0  # chunk count an assembled message expects in its DONE


@dataclass(frozen=True, slots=True)
class CompletedRecord:
    src_ip: bytes
    id: bytes
    length: int
    chunk_count: int
    checksum: bytes
    expires: float  # Unix seconds


@dataclass(frozen=True, slots=True)
class StoredState:
    outbox: list[OutboundRecord]
    inbox: list[InboundRecord]  # in arrival (seq) order
    completed: list[CompletedRecord]


class MessageStore:
    """sqlite3 (WAL) persistence for ``MessageEngine``; see the module docstring."""

    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"unsupported synchronous level {synchronous!r}")
        self.path = Path(path)
        self._db = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
        self._depth = 0
        self._level = synchronous.upper()
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: cannot enable WAL mode (got {mode})")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.execute("PRAGMA foreign_keys=OFF")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, SCHEMA_VERSION):
                raise StoreError(f"{self.path}: schema version {version}, expected {SCHEMA_VERSION}")
            with self.transaction():
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                if version == 1:
                    for column in ("assembled", "slots"):
                        self._db.execute(f"ALTER TABLE inbox ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreError(f"{self.path}: {exc}") from exc
        except StoreError:
            self._db.close()
            raise

    # --- plumbing ---------------------------------------------------------------

    @contextmanager
    def transaction(self, durable: bool = True) -> Iterator[None]:
        """Group several writes into one atomic commit (nests; the outermost commits and
        decides durability: ``durable=False`` skips the fsync, see the module docstring)."""
        relax = self._depth == 0 and not durable and self._level != "NORMAL"
        if relax:
            self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            if self._depth == 0:
                self._db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if self._depth == 0 and self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):  # keep the original error
                        self._db.execute("ROLLBACK")
                raise
            self._depth -= 1
            if self._depth == 0:
                try:
                    self._db.execute("COMMIT")
                except sqlite3.Error:  # e.g. disk full at commit: leave no transaction open
                    if self._db.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            self._db.execute("ROLLBACK")
                    raise
        finally:
            if relax:
                self._db.execute(f"PRAGMA synchronous={self._level}")

    def close(self) -> None:
        self._db.close()

    @property
    def synchronous(self) -> int:
        """sqlite's numeric level (2 = FULL, 1 = NORMAL); for tests and diagnostics."""
        return int(self._db.execute("PRAGMA synchronous").fetchone()[0])

    @property
    def journal_mode(self) -> str:
        return str(self._db.execute("PRAGMA journal_mode").fetchone()[0])

    # --- loading ------------------------------------------------------------------

    def load(self) -> StoredState:
        db = self._db
        outbox = [
            OutboundRecord(
                bytes(r[0]), bytes(r[1]), bytes(r[2]), bytes(r[3]), _opt_bytes(r[4]), r[5], bool(r[6]), r[7], r[8]
            )
            for r in db.execute(
                "SELECT id, src, dst, topic, data, length, reply, created, state FROM outbox ORDER BY created, id"
            )
            if r[8] in _OUT_STATES
        ]
        inbox = [
            InboundRecord(
                r[0],
                bytes(r[1]),
                bytes(r[2]),
                bytes(r[3]),
                bytes(r[4]),
                bytes(r[5]),
                bool(r[6]),
                r[7],
                r[8],
                bool(r[9]),
                r[10],
            )
            for r in db.execute(
                "SELECT seq, id, src, dst, topic, data, reply, forward_socket, received, assembled, slots"
                " FROM inbox ORDER BY seq"
            )
        ]
        completed = [
            CompletedRecord(bytes(r[0]), bytes(r[1]), r[2], r[3], bytes(r[4]), r[5])
            for r in db.execute(
                "SELECT src, id, length, chunk_count, checksum, expires FROM completed ORDER BY expires"
            )
        ]
        return StoredState(outbox, inbox, completed)

    # --- outbox -------------------------------------------------------------------

    def add_outbound(self, rec: OutboundRecord) -> None:
        """Insert, replacing an entry with the same id (a second reply to one id)."""
        with self.transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO outbox (id, src, dst, topic, data, length, reply, created, state)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rec.id,
                    rec.src_ip,
                    rec.dst_ip,
                    rec.topic,
                    rec.data,
                    rec.length,
                    int(rec.reply),
                    rec.created,
                    rec.state,
                ),
            )

    def set_outbound_state(self, msg_id: bytes, state: str) -> None:
        """Record a final state; the data is dropped since it will never be sent again."""
        if state not in _OUT_STATES:
            raise ValueError(f"unknown outbound state {state!r}")
        with self.transaction(durable=False):
            if state == OUT_ACTIVE:
                self._db.execute("UPDATE outbox SET state = ? WHERE id = ?", (state, msg_id))
            else:
                self._db.execute("UPDATE outbox SET state = ?, data = NULL WHERE id = ?", (state, msg_id))

    def delete_outbound(self, msg_ids: list[bytes]) -> None:
        if not msg_ids:
            return
        with self.transaction(durable=False):
            self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in msg_ids])

    # --- inbox --------------------------------------------------------------------

    def add_inbound(
        self, rec: InboundRecord | None, completed: CompletedRecord, evict: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Record a completed message (None when it went to a reply waiter) and its id, atomically;
        ``evict`` drops older completed ids (src, id) in the same commit."""
        with self.transaction():
            if rec is not None:
                self._insert_inbound(rec)
            self._add_completed(completed, evict)

    def add_assembled(self, rec: InboundRecord) -> None:
        """Every chunk of a message is in: keep it before acknowledging the last chunk."""
        with self.transaction():
            self._insert_inbound(rec)

    def complete_assembled(
        self,
        seq: int,
        new_seq: int | None,
        forward_socket: str | None,
        received: float,
        completed: CompletedRecord,
        evict: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """A valid DONE for an assembled message: it becomes inbox entry ``new_seq`` (or is removed,
        None, when it went to a reply waiter), and its id is recorded, atomically."""
        with self.transaction():
            if new_seq is None:
                self._db.execute("DELETE FROM inbox WHERE seq = ?", (seq,))
            else:
                self._db.execute(
                    "UPDATE inbox SET seq = ?, assembled = 0, forward_socket = ?, received = ? WHERE seq = ?",
                    (new_seq, forward_socket, received, seq),
                )
            self._add_completed(completed, evict)

    def _insert_inbound(self, rec: InboundRecord) -> None:
        self._db.execute(
            "INSERT INTO inbox (seq, id, src, dst, topic, data, reply, forward_socket, received, assembled, slots)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rec.seq,
                rec.id,
                rec.src_ip,
                rec.dst_ip,
                rec.topic,
                rec.data,
                int(rec.reply),
                rec.forward_socket,
                rec.received,
                int(rec.assembled),
                rec.slots,
            ),
        )

    def _add_completed(self, completed: CompletedRecord, evict: list[tuple[bytes, bytes]] | None) -> None:
        if evict:
            self._db.executemany("DELETE FROM completed WHERE src = ? AND id = ?", evict)
        self._db.execute(
            "INSERT OR REPLACE INTO completed (src, id, length, chunk_count, checksum, expires)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                completed.src_ip,
                completed.id,
                completed.length,
                completed.chunk_count,
                completed.checksum,
                completed.expires,
            ),
        )

    def delete_inbound(self, seq: int, durable: bool = True) -> None:
        """Durable for a pop; not for dropping an assembled message (ABORT, expiry)."""
        with self.transaction(durable):
            self._db.execute("DELETE FROM inbox WHERE seq = ?", (seq,))

    def set_inbound_forward(self, seq: int, socket_path: str | None) -> None:
        """None moves a message being forwarded into the poppable inbox."""
        with self.transaction(durable=False):
            self._db.execute("UPDATE inbox SET forward_socket = ? WHERE seq = ?", (socket_path, seq))

    def purge_completed(self, before: float) -> int:
        with self.transaction(durable=False):
            cur = self._db.execute("DELETE FROM completed WHERE expires <= ?", (before,))
        return cur.rowcount

    def delete_completed(self, keys: list[tuple[bytes, bytes]]) -> None:
        if not keys:
            return
        with self.transaction(durable=False):
            self._db.executemany("DELETE FROM completed WHERE src = ? AND id = ?", keys)

    # --- topic configuration --------------------------------------------------------

    def save_topic_config(self, config: dict[str, object]) -> None:
        """Persist ``TopicConfig.to_dict()`` so API changes survive a restart."""
        with self.transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('topic_config', ?)", (json.dumps(config),)
            )

    def load_topic_config(self) -> dict[str, object] | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'topic_config'").fetchone()
        if row is None:
            return None
        try:
            value = json.loads(row[0])
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


def _opt_bytes(value: bytes | None) -> bytes | None:
    return None if value is None else bytes(value)
