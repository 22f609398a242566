"""Start a node: write its node.json and supervisord config into the run
directory, run supervisord in the foreground, and clean up on exit."""

from __future__ import annotations

import configparser
import glob
import io
import logging
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.identity import Identity, load_or_create_key
from common.lifecycle import die_with_parent
from common.nodeconfig import NodeConfig
from common.privnet import PrivnetError, load_network_key
from common.programs import DNS_PROGRAM as DNS_PROGRAM  # re-exported: the launcher is where readers look
from common.programs import ON_DEMAND, PRIVILEGED, programs
from common.programs import PROGRAMS as PROGRAMS
from common.shmring import remove_rings, ring_path
from common.wake import WAKE_FILE, wake_path

from . import prefork
from .prefork import DROP_CAPS as DROP_CAPS  # re-exported: the launcher writes it into program commands

log = logging.getLogger("mycelium")

CONF_FILE = "supervisord.conf"
PID_FILE = "supervisord.pid"
SOCK_FILE = "supervisor.sock"
ROOT_FILES = (CONF_FILE, PID_FILE, SOCK_FILE, "logs", "node.json")  # what the service user never owns
SERVICE_KEY_FILE = "service_key.bin"  # copy of the secret key the unprivileged services can read
NETWORK_KEY_FILE = "network_key.bin"  # copy of the private network's key, likewise (never the user's file)
# Privilege separation (started as root): every program but tund runs as this
# user, created as a system user if missing; "root" turns separation off.
SERVICE_USER = "mycelium"
SERVICE_USER_ENV = "MYCELIUM_SERVICE_USER"
CAP_NET_ADMIN = 12
MAX_CRYPTO_WORKERS = 64


class LaunchError(Exception):
    """The node cannot start; the message is user-facing."""


@dataclass(frozen=True)
class Privsep:
    """How the programs of a node started as root give up root.

    ``user``: supervisord starts every program but tund as this user;
    ``drop_caps``: they run as uid 0 stripped of every capability instead
    (setpriv), when ``user`` cannot run them; tund starts as root, creates
    the TUN and keeps CAP_NET_ADMIN only (becoming ``user`` if set)."""

    user: str | None = None
    drop_caps: bool = False

    @property
    def active(self) -> bool:
        return self.user is not None or self.drop_caps


NO_PRIVSEP = Privsep()


def tun_problem() -> str | None:
    """Why this process could not create a TUN interface, or None."""
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun does not exist"
    caps = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    if not caps & (1 << CAP_NET_ADMIN):
        return "creating the TUN interface needs root or CAP_NET_ADMIN"
    return None


def program_args(
    module: str, run_dir: str, crypto_workers: int = 1, tund_user: str | None = None, family: str = "tcp"
) -> list[str]:
    extra: list[str] = []
    if module == "services.peerd":
        extra = ["--family", family] + (["--tund-workers", str(crypto_workers)] if crypto_workers > 1 else [])
    elif module == "services.tund":
        extra = (["--workers", str(crypto_workers)] if crypto_workers > 1 else []) + (
            ["--user", tund_user] if tund_user else []
        )
    elif module == "services.dnsd" and tund_user:
        extra = ["--user", tund_user]
    return [sys.executable, "-m", module, "--run-dir", run_dir, *extra]


# characters a command argument may carry unescaped (everything else gets a backslash)
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-+=/.,:@")


def command_line(args: list[str]) -> str:
    """``args`` as one supervisord ``command`` value.

    supervisord expands ``%(name)s`` in the value (so ``%`` is doubled),
    then splits it with ``shlex.split``. Every character outside a small
    plain set gets a backslash rather than shell quotes: the value then
    holds no whitespace before a ``;`` or ``#``, which its config parser
    would cut off as an inline comment."""
    out = []
    for arg in args:
        if not arg.replace("\t", " ").isprintable():  # a line break cannot be written in the ini file
            raise LaunchError(f"cannot start a program whose argument holds control characters: {arg!r}")
        word = "".join(c if c in _PLAIN else "\\" + c for c in arg) if arg else "''"
        out.append(word.replace("%", "%%"))
    return " ".join(out)


def on_demand_programs(cfg: NodeConfig) -> tuple[str, ...]:
    """The programs of this node that wait for their first request: only
    under the preforking supervisord, which listens for it."""
    names = {name for name, _module, _priority in programs(cfg)}
    return tuple(p for p in ON_DEMAND if p in names) if prefork.enabled() else ()


def supervisord_conf(
    cfg: NodeConfig, log_to_stdout: bool = True, crypto_workers: int = 1, privsep: Privsep = NO_PRIVSEP
) -> str:
    """The supervisord config of a node, written with configparser.

    The config file lives in the run directory, so every path in it but
    the commands is written as ``%(here)s/...`` (supervisord's own
    expansion): the run directory's text never meets the ini syntax."""
    run = cfg.run_dir
    password = secrets.token_hex(16)  # the control socket is 0700 already; this also keeps supervisord quiet
    ini = configparser.RawConfigParser(interpolation=None)
    ini.optionxform = str  # type: ignore[assignment,method-assign]  # keep keys as written
    here = "%(here)s"
    ini["unix_http_server"] = {
        "file": f"{here}/{SOCK_FILE}",
        "chmod": "0700",
        "username": "mycelium",
        "password": password,
    }
    ini["supervisord"] = {
        "nodaemon": "true",
        **({"user": "root"} if os.geteuid() == 0 else {}),
        "logfile": f"{here}/logs/supervisord.log",
        "logfile_maxbytes": "5MB",
        "logfile_backups": "2",
        "pidfile": f"{here}/{PID_FILE}",
        "childlogdir": f"{here}/logs",
        "loglevel": "warn",
    }
    factory = "supervisor.rpcinterface:make_main_rpcinterface"
    ini["rpcinterface:supervisor"] = {"supervisor.rpcinterface_factory": factory}
    ini["supervisorctl"] = {"serverurl": f"unix://{here}/{SOCK_FILE}", "username": "mycelium", "password": password}
    on_demand = on_demand_programs(cfg)
    for name, module, priority in programs(cfg):
        privileged = module in PRIVILEGED and not (module == "services.tund" and cfg.no_tun)
        family = name.split("-", 1)[1] if module == "services.peerd" else "tcp"
        args = program_args(module, run, crypto_workers, privsep.user if privileged else None, family)
        if privsep.drop_caps and not privileged:
            args = [*DROP_CAPS, *args]
        section: dict[str, str] = {"command": command_line(args)}
        if privsep.user and not privileged:
            section["user"] = privsep.user
        section |= {
            "directory": here,
            "priority": str(priority),
            "autostart": "false" if name in on_demand else "true",
            "autorestart": "true",
            "startsecs": "1",
            "startretries": "1000",
            "stopsignal": "TERM",
            "stopwaitsecs": "5",
            "redirect_stderr": "true",
        }
        if log_to_stdout:
            section |= {"stdout_logfile": "/dev/stdout", "stdout_logfile_maxbytes": "0"}
        else:
            section |= {
                # supervisord expands a program's log file name twice (4.x): one
                # level of escaping so the second expansion meets %(here)s
                "stdout_logfile": f"%{here}/logs/{name}.log",
                "stdout_logfile_maxbytes": "5MB",
                "stdout_logfile_backups": "2",
            }
        section["environment"] = 'PYTHONUNBUFFERED="1"'
        ini[f"program:{name}"] = section
    out = io.StringIO()
    out.write("; generated by `mycelium` for this node; edits are overwritten on the next start\n")
    ini.write(out, space_around_delimiters=False)
    return out.getvalue()


def _pid_alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _warn(text: str) -> None:
    print(f"mycelium: warning: {text}", file=sys.stderr, flush=True)


def _service_user(name: str) -> pwd.struct_passwd | None:
    """The service user, created as a system user (no home, no shell) if missing."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    try:
        subprocess.run(
            [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", "--comment", "mycelium node services", name],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        return pwd.getpwnam(name)
    except (OSError, subprocess.SubprocessError, KeyError) as exc:
        _warn(f"cannot create the service user {name!r}: {exc}")
        return None


_PROBE = (
    "import sys, services.router.service, services.peerd.service, services.apid.service, services.tund.service;"
    "from common.nodeconfig import NodeConfig; from common.identity import load_key_file;"
    "load_key_file(NodeConfig.load(sys.argv[1]).key_file)"
)


def _probe(run: Path, prefix: list[str], user: pwd.struct_passwd | None) -> bool:
    """Can a service started this way import the code and read node.json and the key?"""
    kwargs = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    try:
        out = subprocess.run(
            [*prefix, sys.executable, "-c", _PROBE, str(run)],
            cwd=run, capture_output=True, timeout=30, **kwargs,  # type: ignore[call-overload]  # user/group only as root
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0


def setup_privsep(cfg: NodeConfig, run: Path) -> Privsep:
    """Started as root: decide how the programs give up root and prepare
    the run directory for it (updates and saves ``cfg``)."""
    name = os.environ.get(SERVICE_USER_ENV, SERVICE_USER) or SERVICE_USER
    if os.geteuid() != 0 or name == "root":
        return NO_PRIVSEP
    original_key = cfg.key_file
    key_copy = run / SERVICE_KEY_FILE
    secret = Path(original_key).read_bytes()[:32]
    key_copy.unlink(missing_ok=True)
    fd = os.open(key_copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    cfg.key_file = str(key_copy)
    cfg.save()
    user = _service_user(name)
    if user is not None:
        # root owns the directory and what supervisord reads; the sticky bit keeps
        # the services (group members) from replacing files that are not theirs
        given = [p for p in run.iterdir() if p.name not in ROOT_FILES and not p.is_symlink()]
        for path in given:
            os.chown(path, user.pw_uid, user.pw_gid)
        os.chown(run, 0, user.pw_gid)
        os.chmod(run, 0o1770)
        if _probe(run, [], user):
            return Privsep(user=name)
        # the services will run as root without CAP_DAC_OVERRIDE: what a previous
        # start gave the user (the message store) must be root's again, or it is read-only
        for path in [run, *given]:
            os.chown(path, 0, 0)
        os.chmod(run, 0o700)
    if shutil.which("setpriv") and _probe(run, DROP_CAPS, None):
        _warn(
            f"user {name!r} cannot run this installation ({sys.executable}) or reach {run}; "
            "the services run as root without capabilities instead"
        )
        return Privsep(drop_caps=True)
    _warn("privilege separation is not possible here; every service runs as root")
    key_copy.unlink(missing_ok=True)
    cfg.key_file = original_key
    cfg.save()
    return NO_PRIVSEP


def prepare(cfg: NodeConfig, log_to_stdout: bool = True, crypto_workers: int = 1) -> Identity:
    """Create the key, the run directory, node.json and supervisord.conf."""
    if not 1 <= crypto_workers <= MAX_CRYPTO_WORKERS:
        raise LaunchError(f"crypto workers must be 1-{MAX_CRYPTO_WORKERS}, got {crypto_workers}")
    identity = Identity.from_secret(load_or_create_key(cfg.key_file))
    run = Path(cfg.run_dir)
    try:
        (run / "logs").mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise LaunchError(f"cannot create run directory {run}: {exc.strerror}") from exc
    pid = _pid_alive(run / PID_FILE)
    if pid is not None:
        raise LaunchError(f"a node is already running with run directory {run} (supervisord pid {pid})")
    cleanup(str(run))  # sockets of a killed predecessor, possibly owned by another user
    cfg.start_time = int(time.time())
    if cfg.network_key_file is not None:
        cfg.network_key_file = _copy_network_key(cfg.network_key_file, run)
    cfg.save()
    privsep = setup_privsep(cfg, run)
    conf = run / CONF_FILE
    conf.touch(mode=0o600)
    conf.chmod(0o600)
    conf.write_text(supervisord_conf(cfg, log_to_stdout, crypto_workers, privsep), encoding="utf-8")
    return identity


def _copy_network_key(path: str, run: Path) -> str:
    """The key's 32 bytes into the run directory (0600, owned like the other
    service files), so services that gave up root can read it."""
    try:
        key = load_network_key(path)
    except PrivnetError as exc:
        raise LaunchError(str(exc)) from exc
    copy = run / NETWORK_KEY_FILE
    copy.unlink(missing_ok=True)
    fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return str(copy)


def cleanup(run_dir: str) -> None:
    paths = [
        *glob.glob(os.path.join(run_dir, "*.ipc")),
        *glob.glob(os.path.join(run_dir, "*.data")),  # data path sockets (common/datapath.py)
        *glob.glob(os.path.join(run_dir, "*.state.json")),  # what a restarted service resumes (proxyd), not a new node
        os.path.join(run_dir, SOCK_FILE),
        wake_path(run_dir),
    ]
    for path in [*paths, os.path.join(run_dir, SERVICE_KEY_FILE), os.path.join(run_dir, NETWORK_KEY_FILE)]:
        try:
            os.unlink(path)
        except OSError:
            pass
    remove_rings(run_dir)


# The launcher's last act: wait for supervisord, then clean up. A Python
# interpreter doing only that costs the node ~18 MiB (docs/PERFORMANCE.md,
# "Memory"), a POSIX shell well under 1 MiB, so where the tools exist the
# launcher execs this script instead. $1: run directory, $2: the rings'
# path prefix, the rest: supervisord's command line. Signals are forwarded
# as SIGTERM (as run() does); a wait cut short by a trapped signal is
# repeated while supervisord lives (a zombie still answers kill -0).
WAITER_SCRIPT = f"""\
run=$1; rings=$2; shift 2
trap 'kill -TERM "$pid" 2>/dev/null' INT TERM HUP
setsid -w setpriv --pdeathsig TERM -- "$@" &
pid=$!
while :; do
    wait "$pid"; rc=$?
    if [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi
    break
done
rm -f -- "$run"/*.ipc "$run"/*.data "$run"/*.state.json "$run"/{SOCK_FILE} "$run"/{WAKE_FILE} \
    "$run"/{SERVICE_KEY_FILE} "$run"/{NETWORK_KEY_FILE} "$rings"*.ring "$rings"*.ring.*.tmp
echo "mycelium: node stopped" >&2
if [ "$rc" -eq 143 ]; then rc=0; fi
exit "$rc"
"""
WAITER_ENV = "MYCELIUM_LAUNCHER_WAIT"  # "python": keep the Python launcher waiting (no exec)


def waiter_argv(run_dir: str, command: list[str]) -> list[str] | None:
    """The shell command line that replaces the launcher, or None where
    /bin/sh, setsid or setpriv (util-linux) is missing."""
    if os.environ.get(WAITER_ENV) == "python" or not os.access("/bin/sh", os.X_OK):
        return None
    if shutil.which("setsid") is None or shutil.which("setpriv") is None:
        return None
    rings = ring_path(run_dir, "\0").split("\0", 1)[0]  # what remove_rings() globs, up to the name
    return ["/bin/sh", "-c", WAITER_SCRIPT, "mycelium-launcher", run_dir, rings, *command]


def run(cfg: NodeConfig, crypto_workers: int = 1) -> int:
    identity = prepare(cfg, crypto_workers=crypto_workers)
    print(
        f"mycelium: node {identity.address} (subnet {identity.subnet}) starting; "
        f"run directory {cfg.run_dir}, API http://{cfg.api_addr}",
        file=sys.stderr,
        flush=True,
    )
    modules = [module for _name, module, _priority in programs(cfg)]
    command = prefork.command(
        modules,
        ["-n", "-c", os.path.join(cfg.run_dir, CONF_FILE)],
        wake_path(cfg.run_dir),
        on_demand_programs(cfg),
    )
    argv = waiter_argv(cfg.run_dir, command)
    if argv is not None:
        sys.stdout.flush()
        os.execv(argv[0], argv)  # no return
    proc = subprocess.Popen(command, start_new_session=True, preexec_fn=die_with_parent)

    def forward(signum: int, _frame: object) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        rc = proc.wait()
    finally:
        cleanup(cfg.run_dir)
    print("mycelium: node stopped", file=sys.stderr, flush=True)
    return 0 if rc in (0, -signal.SIGTERM) else rc
