"""The programs of a node, shared by the launcher (which starts them) and
apid (which reports on them): one list, below both."""

from __future__ import annotations

# (supervisord program name, python module, priority): started in ascending
# and stopped in descending order, so peerd starts last and stops first and
# neighbours see the links close before anything else goes away
PROGRAMS: tuple[tuple[str, str, int], ...] = (
    ("router", "services.router", 10),
    ("tund", "services.tund", 20),
    ("apid", "services.apid", 20),
    ("msgbus", "services.msgbus", 20),
    ("peerd-tcp", "services.peerd", 30),
)
