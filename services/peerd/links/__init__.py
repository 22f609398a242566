"""Link types, one module each, behind the interface in ``base.py``.

A peerd process serves the link types of its family (node.json's
``peerd_families``: family -> endpoint protocols; the launcher writes it).
To add a link type: write ``links/<proto>.py`` with a ``Link`` subclass and
``make_factory(cfg, host) -> LinkFactory | None``, and list it in
``LINK_MODULES``. A module that does not exist yet (or fails to import
for want of its library) leaves that protocol unserved: its peers are
skipped with a warning.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

log = logging.getLogger("peerd")

LINK_MODULES = {
    "tcp": "services.peerd.links.tcp",
    "tls": "services.peerd.links.tls",
    "vsock": "services.peerd.links.vsock",
    "quic": "services.peerd.links.quic",
}


def load_link_module(proto: str) -> ModuleType | None:
    """The module serving ``proto``, or None when there is none (logged)."""
    name = LINK_MODULES.get(proto)
    if name is None:
        return None
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name not in (name, None) and not name.startswith(str(exc.name)):
            log.warning("link type %s unavailable: %s", proto, exc)
        return None
