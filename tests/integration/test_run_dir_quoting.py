"""A node whose run directory and key path hold spaces, ``%``, quotes and
non-ASCII starts, peers with another node and answers its API (the
generated supervisord config quotes them; unit tests in test_launcher_conf.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .nodes import Node, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def awkward_base() -> Iterator[Path]:
    # short and under /tmp: IPC socket paths must stay under 107 bytes
    base = Path(tempfile.mkdtemp(prefix="q ", dir="/tmp"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_node_with_awkward_run_dir_peers_and_answers(awkward_base: Path) -> None:
    odd = Node(awkward_base, "run dir 100% 'q' é")
    odd.run_dir = odd.dir / 'r "x" #1 ;2'
    odd.key_file = odd.dir / "key 100% é.bin"
    plain = Node(awkward_base, "plain")
    plain.peers = [odd.endpoint]
    try:
        odd.start()
        plain.start()
        odd.wait_ready()
        plain.wait_ready()
        wait_for("the link between the nodes", lambda: odd.alive_peers() == 1 and plain.alive_peers() == 1, 30)
        assert odd.lookup(plain.address) == plain.info["nodePubkey"]
        assert plain.lookup(odd.address) == odd.info["nodePubkey"]
        assert odd.key_file.stat().st_size == 32
        assert (odd.run_dir / "logs").is_dir()
    except BaseException:
        for node in (odd, plain):
            print(f"\n===== log of {node.name} =====\n{node.log_tail()}")
        raise
    finally:
        odd.stop()
        plain.stop()
