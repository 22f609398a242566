"""Topic access control and forward sockets (PROTOCOL.md 7.7-7.9, API.md 2.4).

A ``TopicConfig`` answers two questions for the message engine: may a
non-reply INIT with topic T from source address A be accepted, and does a
delivered message with topic T go to a Unix socket instead of the inbox.
The API endpoints mutate it at run time; ``revision`` changes on every
mutation so the shell knows when to persist it (topic config is hard state,
ARCHITECTURE.md "State and restarts"; ``to_dict``/``from_dict`` give a JSON
form for ``MessageStore.save_topic_config``).

Deliberate differences from the reference, none visible on the wire:

- adding a subnet that is already listed for a topic does not list it twice
  (the reference keeps duplicates, so the sources endpoint could show one
  subnet twice);
- topics are listed in insertion order (the reference uses a hash map).

The TOML loader (``--topic-config``) mirrors the reference's deserializer:
``default`` must be the exact string "Accept" or "Reject"; every other key is
a topic (its UTF-8 bytes) whose value is either a table with optional
``subnets`` (array of CIDR or bare-IP strings) and ``forward_socket``
(string), unknown keys ignored, or a bare array of subnet strings (older
format). One bad value fails the whole file; a file that fails to load
gives the default config plus a warning string for the shell to log (the
reference ignores it silently). Consequences worth knowing: a topic named
``default`` cannot be configured from the file, and an unquoted dotted
table name (``[a.b]``) whitelists topic ``a`` with no subnets, which blocks
that topic entirely.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from common.wire.errors import CodecError
from common.wire.subnet import Subnet


class TopicConfigError(ValueError):
    """A topic configuration (file, dict or subnet text) that cannot be used."""


@dataclass
class TopicWhitelist:
    """Sources allowed to send a topic; an empty list blocks everyone."""

    subnets: list[Subnet] = field(default_factory=list)
    forward_socket: str | None = None


def _subnet(value: Subnet | str) -> Subnet:
    if isinstance(value, Subnet):
        return value
    try:
        return Subnet.parse(value)
    except CodecError as exc:
        raise TopicConfigError(str(exc)) from exc


def _ip(value: bytes | ipaddress.IPv6Address | ipaddress.IPv4Address) -> ipaddress.IPv6Address | ipaddress.IPv4Address:
    if isinstance(value, bytes | bytearray):
        return ipaddress.ip_address(bytes(value))
    return value


class TopicConfig:
    """Default action plus per-topic whitelists; see the module docstring."""

    def __init__(self, default_accept: bool = True, whitelist: dict[bytes, TopicWhitelist] | None = None) -> None:
        self._default_accept = default_accept
        self._whitelist: dict[bytes, TopicWhitelist] = dict(whitelist or {})
        self.revision = 0

    # --- what the engine asks ------------------------------------------------

    def is_allowed(self, topic: bytes, src: bytes | ipaddress.IPv6Address | ipaddress.IPv4Address) -> bool:
        """ACL decision for a non-reply INIT (replies bypass the ACL, 7.7)."""
        entry = self._whitelist.get(bytes(topic))
        if entry is None:
            return self._default_accept
        addr = _ip(src)
        return any(s.contains_address(addr) for s in entry.subnets)

    def forward_socket(self, topic: bytes) -> str | None:
        entry = self._whitelist.get(bytes(topic))
        return entry.forward_socket if entry is not None else None

    # --- API endpoints (API.md 2.4) -------------------------------------------

    @property
    def default_accept(self) -> bool:
        return self._default_accept

    @default_accept.setter
    def default_accept(self, accept: bool) -> None:
        self._default_accept = bool(accept)
        self.revision += 1

    def topics(self) -> list[bytes]:
        return list(self._whitelist)

    def add_topic(self, topic: bytes) -> None:
        """Whitelist a topic with no sources yet (which blocks it)."""
        self._whitelist.setdefault(bytes(topic), TopicWhitelist())
        self.revision += 1

    def remove_topic(self, topic: bytes) -> None:
        """Idempotent; the topic falls back to the default action."""
        self._whitelist.pop(bytes(topic), None)
        self.revision += 1

    def sources(self, topic: bytes) -> list[Subnet] | None:
        """None when the topic is not whitelisted (the API answers 404)."""
        entry = self._whitelist.get(bytes(topic))
        return list(entry.subnets) if entry is not None else None

    def add_source(self, topic: bytes, subnet: Subnet | str) -> None:
        """Creates the topic if needed; raises TopicConfigError for bad subnet text."""
        parsed = _subnet(subnet)
        entry = self._whitelist.setdefault(bytes(topic), TopicWhitelist())
        if parsed not in entry.subnets:
            entry.subnets.append(parsed)
        self.revision += 1

    def remove_source(self, topic: bytes, subnet: Subnet | str) -> None:
        """Idempotent; the topic stays whitelisted even when its last source goes."""
        parsed = _subnet(subnet)
        entry = self._whitelist.get(bytes(topic))
        if entry is not None:
            entry.subnets = [s for s in entry.subnets if s != parsed]
        self.revision += 1

    def set_forward_socket(self, topic: bytes, path: str | None) -> None:
        """Silently does nothing for a topic that is not whitelisted (reference behaviour)."""
        entry = self._whitelist.get(bytes(topic))
        if entry is not None:
            entry.forward_socket = path
            self.revision += 1

    def remove_forward_socket(self, topic: bytes) -> None:
        self.set_forward_socket(topic, None)

    # --- persistence ----------------------------------------------------------

    def to_dict(self) -> dict[str, object]:
        """JSON-able form; topics are hex because they are arbitrary bytes."""
        return {
            "default_accept": self._default_accept,
            "topics": [
                {
                    "topic": topic.hex(),
                    "subnets": [f"{s.address}/{s.prefix_len}" for s in entry.subnets],
                    "forward_socket": entry.forward_socket,
                }
                for topic, entry in self._whitelist.items()
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> TopicConfig:
        try:
            default_accept = data["default_accept"]
            items = data["topics"]
            if not isinstance(default_accept, bool) or not isinstance(items, list):
                raise TypeError("bad field types")
            whitelist: dict[bytes, TopicWhitelist] = {}
            for item in items:
                sock = item["forward_socket"]
                if sock is not None and not isinstance(sock, str):
                    raise TypeError("forward_socket must be a string")
                whitelist[bytes.fromhex(item["topic"])] = TopicWhitelist(
                    [_subnet(str(s)) for s in item["subnets"]], sock
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise TopicConfigError(f"invalid stored topic config: {exc}") from exc
        return cls(default_accept, whitelist)


def parse_topic_config(text: str) -> TopicConfig:
    """Parse the ``--topic-config`` TOML text; raises TopicConfigError on any problem."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopicConfigError(f"invalid TOML: {exc}") from exc
    default_accept = True
    whitelist: dict[bytes, TopicWhitelist] = {}
    for key, value in doc.items():
        if key == "default":
            if value == "Accept":
                default_accept = True
            elif value == "Reject":
                default_accept = False
            else:
                raise TopicConfigError(f'default must be "Accept" or "Reject", not {value!r}')
            continue
        whitelist[key.encode()] = _parse_topic_value(key, value)
    return TopicConfig(default_accept, whitelist)


def _parse_topic_value(key: str, value: object) -> TopicWhitelist:
    if isinstance(value, dict):
        subnets = value.get("subnets", [])
        sock = value.get("forward_socket")
        if not isinstance(subnets, list) or not all(isinstance(s, str) for s in subnets):
            raise TopicConfigError(f"topic {key!r}: subnets must be an array of strings")
        if sock is not None and not isinstance(sock, str):
            raise TopicConfigError(f"topic {key!r}: forward_socket must be a string")
        return TopicWhitelist([_subnet(s) for s in subnets], sock)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return TopicWhitelist([_subnet(s) for s in value])
    raise TopicConfigError(f"topic {key!r}: expected a table or an array of subnet strings")


def load_topic_config(path: str | Path) -> tuple[TopicConfig, str | None]:
    """Load ``--topic-config``; on any failure return the default config and a warning to log."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        return parse_topic_config(text), None
    except (OSError, UnicodeDecodeError, TopicConfigError) as exc:
        return TopicConfig(), f"ignoring topic config {str(path)!r}: {exc}"
