"""What the message engine hands to its shell, besides packets to send.

Drained with ``MessageEngine.events()``; each is a small frozen dataclass in
the style of aioquic's ``quic/events.py``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """A completed inbound message (API MessageReceiveInfo minus the public keys)."""

    id: bytes  # 8-byte message id chosen by the sender (a reply reuses the id it answers)
    src_ip: bytes  # 16-byte overlay address the message came from
    dst_ip: bytes  # 16-byte overlay address it was sent to (one of ours)
    topic: bytes  # 0-255 bytes; replies always have an empty topic
    data: bytes  # the message body
    is_reply: bool  # the INIT carried the REPLY flag (not exposed by the API)
    seq: int  # engine-local arrival number; the handle for ``forward_done``


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A message was appended to the poppable inbox: wake long-polls on its topic."""

    message: ReceivedMessage


@dataclass(frozen=True, slots=True)
class ReplyReceived:
    """A reply arrived for an id registered with ``expect_reply``; it is not in the inbox."""

    message: ReceivedMessage


@dataclass(frozen=True, slots=True)
class ForwardToSocket:
    """Write ``message.data`` to the Unix socket, read the answer, then call ``forward_done``."""

    message: ReceivedMessage
    socket_path: str


MessageEvent = MessageReceived | ReplyReceived | ForwardToSocket
