"""Privilege dropping for the services started as root: once a service
holds what needed root (tund: the TUN device; dnsd: port 53), it keeps one
capability (CAP_NET_ADMIN, CAP_NET_BIND_SERVICE) and, when a user is given,
stops being root.

Order matters: the capability bounding set and securebits can only be
changed while CAP_SETPCAP is still held, and PR_SET_KEEPCAPS must be set
before setuid or the kernel clears every capability.
"""

from __future__ import annotations

import ctypes
import os
import pwd

CAP_NET_BIND_SERVICE = 10
CAP_SETPCAP = 8
CAP_NET_ADMIN = 12
CAP_NAMES = {CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE"}
_PR_SET_KEEPCAPS = 8
_PR_CAPBSET_DROP = 24
_PR_SET_SECUREBITS = 28
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_SECBIT_NOROOT = 1 << 0
_SECBIT_NOROOT_LOCKED = 1 << 1
_SECBIT_NO_SETUID_FIXUP = 1 << 2
_SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
_CAP_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def _capset(mask: int) -> None:
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        word = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = word
        data[i].permitted = word
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def effective_caps() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def drop_all_capabilities() -> None:
    """What ``setpriv --bounding-set=-all --inh-caps=-all --ambient-caps=-all
    --no-new-privs`` gives the program it execs, for a process that is not
    exec'ed (services/cli/prefork.py): without an exec the kernel does not
    recompute the capability sets, so effective and permitted are cleared too."""
    if effective_caps() & (1 << CAP_SETPCAP):
        for cap in range(_last_cap() + 1):
            try:
                _prctl(_PR_CAPBSET_DROP, cap)
            except OSError:
                pass
    # fails only on a kernel without ambient capabilities (< 4.3): none to clear
    _libc.prctl(_PR_CAP_AMBIENT, ctypes.c_ulong(_PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0)
    _capset(0)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)


def drop_to_net_admin(user: str | None) -> str:
    """tund: keep CAP_NET_ADMIN only."""
    return drop_to_capability(CAP_NET_ADMIN, user)


def drop_to_capability(cap: int, user: str | None) -> str:
    """Keep capability ``cap`` only; switch to ``user`` if given. Returns a
    short description for the log. Without root there is nothing to drop but
    the other capabilities, if any."""
    name = CAP_NAMES.get(cap, f"capability {cap}")
    keep = 1 << cap
    if os.geteuid() != 0 or not effective_caps() & (1 << CAP_SETPCAP):
        # not root, or root already stripped of its capabilities (the launcher's setpriv)
        caps = effective_caps() & keep
        _capset(caps)
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        return f"uid {os.getuid()}, capabilities {name if caps else 'none'}"
    for other in range(_last_cap() + 1):
        if other != cap:
            try:
                _prctl(_PR_CAPBSET_DROP, other)
            except OSError:
                pass
    _prctl(
        _PR_SET_SECUREBITS,
        _SECBIT_NOROOT | _SECBIT_NOROOT_LOCKED | _SECBIT_NO_SETUID_FIXUP | _SECBIT_NO_SETUID_FIXUP_LOCKED,
    )
    if user:
        pw = pwd.getpwnam(user)
        _prctl(_PR_SET_KEEPCAPS, 1)
        os.setgroups([])
        os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
        os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
    _capset(keep)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    who = f"user {user}" if user else "uid 0 without root's capabilities"
    return f"{who}, {name} only"
