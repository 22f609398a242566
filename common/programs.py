"""The programs of a node, shared by the launcher (which starts them) and
apid (which reports on them): one list, below both."""

from __future__ import annotations

from .nodeconfig import NodeConfig

# (supervisord program name, python module, priority): started in ascending
# and stopped in descending order, so peerd starts last and stops first and
# neighbours see the links close before anything else goes away
PROGRAMS: tuple[tuple[str, str, int], ...] = (
    ("router", "services.router", 10),
    ("tund", "services.tund", 20),
    ("apid", "services.apid", 20),
    ("msgbus", "services.msgbus", 20),
    ("proxyd", "services.proxyd", 20),
    ("peerd-tcp", "services.peerd", 30),
)
DNS_PROGRAM = ("dnsd", "services.dnsd", 20)  # only with --enable-dns
# programs started on the first request that needs them (common/wake.py)
# where supervisord can be asked to (the preforking one); at once elsewhere
ON_DEMAND = ("proxyd",)
# programs that start as root and keep one capability (their own --user drop)
PRIVILEGED = ("services.tund", "services.dnsd")


def programs(cfg: NodeConfig) -> list[tuple[str, str, int]]:
    """The programs this node runs: dnsd only with --enable-dns; a peerd per
    transport family of node.json (``peerd-quic`` when QUIC is on), so each
    family restarts alone."""
    out = [*PROGRAMS, *([DNS_PROGRAM] if cfg.enable_dns else [])]
    for family in cfg.peerd_families:
        name = f"peerd-{family}"
        if all(name != n for n, _m, _p in out):
            out.append((name, "services.peerd", 30))
    return sorted(out, key=lambda p: p[2])
