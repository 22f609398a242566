"""`mycelium inspect`, run as a real subprocess of the installed console script
(and of ``python -m services.cli``), as a user or a script would run it.

Every failure must be one line on stderr, a non-zero exit, no traceback,
and must leave an existing key file byte-for-byte and mtime untouched.
"""

from __future__ import annotations

import json
import os
import resource
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from common.identity import address_of, public_key_of
from tests.vectors import params

REPO_ROOT = Path(__file__).resolve().parents[2]
CONSOLE_SCRIPT = Path(sys.executable).parent / "mycelium"

ALICE_SK = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PK = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
ALICE_ADDR = "520:c662:fd00:9e92:5d99:34ed:ab8:82ab"

INVOCATIONS = {
    "console_script": [str(CONSOLE_SCRIPT)],
    "python_m": [sys.executable, "-m", "services.cli"],
}


def run(
    args: list[str],
    cwd: Path,
    *,
    how: str = "console_script",
    preexec: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    if how == "console_script" and not CONSOLE_SCRIPT.exists():
        pytest.fail(f"console script not installed at {CONSOLE_SCRIPT} (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "PYTHON"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["HOME"] = str(cwd)
    return subprocess.run(
        INVOCATIONS[how] + args,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=preexec,
    )


def assert_ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    return r.stdout


def assert_one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode != 0
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    assert r.stderr.endswith("\n") and r.stderr.count("\n") == 1, repr(r.stderr)
    assert r.stderr.startswith("mycelium: ")
    return r.stderr


def snapshot(path: Path) -> tuple[bytes, int, int]:
    st_ = path.stat()
    return path.read_bytes(), st_.st_mtime_ns, st_.st_mode


def text_output(pk: str, addr: str) -> str:
    return f"Public key: {pk}\nAddress: {addr}\n"


def json_output(pk: str, addr: str) -> str:
    return f'{{\n  "publicKey": "{pk}",\n  "address": "{addr}"\n}}\n'


# --------------------------------------------------------------------------- output


@pytest.mark.parametrize("how", INVOCATIONS)
def test_alice_text(tmp_path: Path, how: str) -> None:
    out = assert_ok(run(["inspect", ALICE_PK], tmp_path, how=how))
    assert out == f"Public key: {ALICE_PK}\nAddress: {ALICE_ADDR}\n"


@pytest.mark.parametrize("how", INVOCATIONS)
def test_alice_json(tmp_path: Path, how: str) -> None:
    out = assert_ok(run(["inspect", "--json", ALICE_PK], tmp_path, how=how))
    assert out == json_output(ALICE_PK, ALICE_ADDR)
    assert list(json.loads(out)) == ["publicKey", "address"]
    assert assert_ok(run(["inspect", ALICE_PK, "--json"], tmp_path, how=how)) == out


@pytest.mark.parametrize("v", params("address_derivation"))
def test_vector_addresses(tmp_path: Path, v: dict[str, Any]) -> None:
    f = v["fields"]
    out = assert_ok(run(["inspect", f["public_key"]], tmp_path))
    assert out == text_output(f["public_key"], f["address"])


def test_uppercase_key_prints_lowercase(tmp_path: Path) -> None:
    assert assert_ok(run(["inspect", ALICE_PK.upper()], tmp_path)) == text_output(ALICE_PK, ALICE_ADDR)


def test_given_key_does_not_touch_key_file(tmp_path: Path) -> None:
    assert_ok(run(["-k", "sub/key.bin", "inspect", ALICE_PK], tmp_path))
    assert_ok(run(["inspect", ALICE_PK], tmp_path))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- own key


@pytest.mark.parametrize("how", INVOCATIONS)
def test_creates_default_key_once(tmp_path: Path, how: str) -> None:
    first = assert_ok(run(["inspect"], tmp_path, how=how, preexec=lambda: os.umask(0)))
    key = tmp_path / "priv_key.bin"
    assert key.is_file()
    secret = key.read_bytes()
    assert len(secret) == 32
    mode = stat.S_IMODE(key.stat().st_mode)
    assert mode & 0o022 == 0, oct(mode)  # created with umask 0: the mode itself must forbid it
    assert mode & 0o007 == 0, oct(mode)  # reference: 0o640
    pk = public_key_of(secret).hex()
    assert first == text_output(pk, str(address_of(bytes.fromhex(pk))))
    before = snapshot(key)
    assert assert_ok(run(["inspect"], tmp_path, how=how)) == first
    assert assert_ok(run(["inspect", "--json"], tmp_path, how=how)) == json_output(pk, first.split()[-1])
    assert snapshot(key) == before


@pytest.mark.parametrize(
    "args",
    [
        ["-k", "{key}", "inspect"],
        ["inspect", "-k", "{key}"],
        ["--key-file", "{key}", "inspect"],
        ["inspect", "--key-file", "{key}"],
        ["inspect", "--json", "-k", "{key}"],
    ],
    ids=["short_before", "short_after", "long_before", "long_after", "json_after"],
)
def test_key_file_option(tmp_path: Path, args: list[str]) -> None:
    key = tmp_path / "alice.key"
    key.write_bytes(ALICE_SK + b"ignored trailing bytes")
    before = snapshot(key)
    out = assert_ok(run([a.format(key=key) for a in args], tmp_path))
    expected = json_output if "--json" in args else text_output
    assert out == expected(ALICE_PK, ALICE_ADDR)
    assert snapshot(key) == before
    assert not (tmp_path / "priv_key.bin").exists()


def test_key_file_after_subcommand_wins(tmp_path: Path) -> None:
    (tmp_path / "alice.key").write_bytes(ALICE_SK)
    out = assert_ok(run(["-k", "other.key", "inspect", "-k", "alice.key"], tmp_path))
    assert out == text_output(ALICE_PK, ALICE_ADDR)


def test_creates_parent_directories(tmp_path: Path) -> None:
    first = assert_ok(run(["-k", "a/b/c/key.bin", "inspect"], tmp_path))
    assert len((tmp_path / "a/b/c/key.bin").read_bytes()) == 32
    assert assert_ok(run(["inspect", "-k", "a/b/c/key.bin"], tmp_path)) == first


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "pubkey",
    [ALICE_PK[:-1], ALICE_PK + "0", ALICE_PK[:-2], "", "g" * 64, ALICE_PK[:-1] + "z", "é" * 64],
    ids=["63_chars", "65_chars", "62_chars", "empty", "non_hex", "one_non_hex", "non_ascii"],
)
def test_bad_public_key(tmp_path: Path, pubkey: str) -> None:
    assert_one_line_error(run(["inspect", pubkey], tmp_path))
    assert_one_line_error(run(["inspect", "--json", pubkey], tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_unknown_option(tmp_path: Path) -> None:
    r = run(["inspect", "--frobnicate", ALICE_PK], tmp_path)
    assert_one_line_error(r)
    assert r.returncode == 2


@pytest.mark.parametrize("size", [0, 31])
def test_key_file_too_short(tmp_path: Path, size: int) -> None:
    key = tmp_path / "short.key"
    key.write_bytes(ALICE_SK[:size])
    before = snapshot(key)
    assert_one_line_error(run(["-k", str(key), "inspect"], tmp_path))
    assert_one_line_error(run(["inspect", "-k", str(key)], tmp_path))
    assert snapshot(key) == before


def test_short_default_key_not_replaced(tmp_path: Path) -> None:
    key = tmp_path / "priv_key.bin"
    key.write_bytes(b"\x01" * 16)
    before = snapshot(key)
    assert_one_line_error(run(["inspect"], tmp_path))
    assert snapshot(key) == before


def test_key_file_is_directory(tmp_path: Path) -> None:
    (tmp_path / "priv_key.bin").mkdir()
    assert_one_line_error(run(["inspect"], tmp_path))
    assert_one_line_error(run(["-k", str(tmp_path), "inspect"], tmp_path))
    assert list((tmp_path / "priv_key.bin").iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads mode-000 files; test_key_path_inside_a_file covers it")
def test_unreadable_key_file(tmp_path: Path) -> None:
    key = tmp_path / "locked.key"
    key.write_bytes(ALICE_SK)
    key.chmod(0)
    before = snapshot(key)
    assert_one_line_error(run(["-k", str(key), "inspect"], tmp_path))
    assert snapshot(key) == before


def test_key_path_inside_a_file(tmp_path: Path) -> None:
    """Unreadable even for root: a path component that is a regular file (ENOTDIR)."""
    blocker = tmp_path / "blocker"
    blocker.write_bytes(ALICE_SK)
    before = snapshot(blocker)
    assert_one_line_error(run(["-k", str(blocker / "priv_key.bin"), "inspect"], tmp_path))
    assert_one_line_error(run(["-k", str(blocker / "sub" / "priv_key.bin"), "inspect"], tmp_path))
    assert snapshot(blocker) == before


def test_parent_cannot_be_created(tmp_path: Path) -> None:
    """ENOENT at lookup but mkdir refused, even for root (procfs)."""
    assert_one_line_error(run(["-k", "/proc/self/no-such-dir/priv_key.bin", "inspect"], tmp_path))


def test_key_path_too_long(tmp_path: Path) -> None:
    assert_one_line_error(run(["-k", "k" * 5000, "inspect"], tmp_path))
    assert_one_line_error(run(["-k", "d" * 300 + "/priv_key.bin", "inspect"], tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_dangling_symlink_not_followed(tmp_path: Path) -> None:
    (tmp_path / "priv_key.bin").symlink_to(tmp_path / "target")
    assert_one_line_error(run(["inspect"], tmp_path))
    assert not (tmp_path / "target").exists()


def test_write_failure_leaves_nothing(tmp_path: Path) -> None:
    """A full disk (here: RLIMIT_FSIZE 0, EFBIG) must not leave an empty key file behind."""

    def no_file_growth() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    assert_one_line_error(run(["inspect"], tmp_path, preexec=no_file_growth))
    assert not (tmp_path / "priv_key.bin").exists()
    # and the next, healthy start creates a proper key
    assert_ok(run(["inspect"], tmp_path))
    assert len((tmp_path / "priv_key.bin").read_bytes()) == 32
