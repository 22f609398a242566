"""Option checks that both the launcher (cli) and apid make."""

from __future__ import annotations

from typing import Any

from .endpoint import Endpoint, EndpointError


class OptionError(Exception):
    """An invalid option or config file; the message is user-facing."""


def parse_socket_addr(name: str, text: Any) -> tuple[str, int]:
    if not isinstance(text, str):
        raise OptionError(f"{name} must be ADDR:PORT, got {text!r}")
    try:
        ep = Endpoint.parse(f"tcp://{text}")
    except EndpointError as exc:
        raise OptionError(f"{name} {text!r} is not a valid ADDR:PORT") from exc
    return str(ep.ip), ep.port
