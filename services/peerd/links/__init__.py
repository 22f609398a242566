"""Link types, one module each, behind the interface in ``base.py``.

A peerd process serves the link types of its family (node.json's
``peerd_families``: family -> endpoint protocols; the launcher writes it).
To add a link type:

1. write ``links/<proto>.py``: a ``Link`` subclass (``link_type`` = the
   endpoint protocol) and ``make_factory(cfg, host) -> LinkFactory | None``
   (None: off by configuration). The factory's ``listen`` hands inbound
   links to ``host.accepted``; ``dial`` returns an outbound link not yet
   started. A started link calls ``host.on_control`` / ``host.on_data``
   with what it receives and ``host.on_closed`` exactly once, and starts
   its tasks with ``host.spawn`` (a failure there restarts peerd). Stream
   transports reuse ``stream.py`` (``StreamLink``: override ``read_into``
   / ``_writev`` for a TLS layer; ``StreamFactory.wrap``); a link that
   writes a byte stream can use ``sendqueue.SendQueue``.
2. list it in ``LINK_MODULES`` (done for tcp, tls, vsock, quic) and add the
   protocol to ``services/cli/options.py``'s ``SUPPORTED_PEER_PROTOCOLS``:
   that puts it in node.json's ``peerd_families`` (tls and vsock in the
   ``tcp`` family, quic in its own ``quic`` family, so the launcher starts
   ``peerd-quic``) and lets ``--peers`` and the API accept its endpoints.
3. unit-test it against a fake ``LinkHost`` (tests/unit/test_peerd_links.py).

A module that does not exist yet (or fails to import for want of its
library) leaves that protocol unserved: its peers are skipped with a
warning. For tests of the process layout, MYCELIUM_DEBUG_STREAM_QUIC=1
serves ``quic://`` with a TCP stream (``tcp.StreamAsQuicFactory``).
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
