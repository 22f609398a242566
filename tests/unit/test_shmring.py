"""The shared-memory rings of the data path (common/shmring.py): FIFO
records, bounded, released by the reader, restarts of either side."""

from __future__ import annotations

import os
from pathlib import Path

from common.shmring import DATA_AT, RingReader, RingWriter, remove_rings, ring_path


def test_records_go_through_in_order_and_wrap(tmp_path: Path) -> None:
    path = str(tmp_path / "r.ring")
    w = RingWriter(path, size=10_000)
    r = RingReader(path)
    sent = []
    for i in range(200):  # 200 x ~3 KB through 10 KB: wraps many times
        data = os.urandom(2000 + i * 7 % 1500)
        desc = w.put(data, now=0.0)
        assert desc is not None
        view = r.get(*desc)
        assert view is not None and bytes(view) == data
        r.release(desc[0], desc[1] + desc[2])
        sent.append(data)
    assert w.drops == 0
    w.close()
    r.close()
    assert not os.path.exists(path)


def test_full_ring_refuses_until_the_reader_releases(tmp_path: Path) -> None:
    path = str(tmp_path / "r.ring")
    w = RingWriter(path, size=10_000)
    r = RingReader(path)
    descs = [w.put(bytes([i]) * 3000, now=0.0) for i in range(3)]
    assert all(descs)
    assert w.put(b"x" * 3000, now=0.0) is None and w.drops == 1  # 12 KB would not fit
    g, start, n = descs[0]  # type: ignore[misc]
    view = r.get(g, start, n)
    assert view is not None and bytes(view) == bytes([0]) * 3000
    r.release(g, start + n)
    assert w.put(b"y" * 3000, now=0.1) is not None
    assert w.put(b"z" * 6000, now=0.0) is None  # larger than half the ring: never
    w.close()


def test_a_reader_that_lost_track_makes_the_writer_start_a_new_generation(tmp_path: Path) -> None:
    path = str(tmp_path / "r.ring")
    w = RingWriter(path, size=10_000)
    first = w.generation
    for _ in range(3):
        assert w.put(b"a" * 3000, now=0.0)
    assert w.put(b"b" * 3000, now=10.0) is None  # full: the stall clock starts
    desc = w.put(b"c" * 3000, now=11.5)  # still full 1.5 s later: a new file
    assert desc is not None and desc[0] != first
    r = RingReader(path)
    view = r.get(*desc)
    assert view is not None and bytes(view) == b"c" * 3000
    w.close()


def test_reader_refuses_descriptors_it_cannot_honour(tmp_path: Path) -> None:
    path = str(tmp_path / "r.ring")
    w = RingWriter(path, size=10_000)
    g, start, n = w.put(b"q" * 100, now=0.0)  # type: ignore[misc]
    r = RingReader(path)
    assert r.get(g + 1, start, n) is None  # another generation
    assert r.get(g, 9_950, 100) is None  # runs off the end
    assert r.get(g, -5, 10) is None
    assert r.get(g, 0, 0) is None
    assert r.get(g, start, n) is not None
    assert RingReader(str(tmp_path / "missing.ring")).get(g, 0, 10) is None
    w.close()


def test_writer_restart_keeps_old_records_readable(tmp_path: Path) -> None:
    path = str(tmp_path / "r.ring")
    w1 = RingWriter(path, size=10_000)
    d1 = w1.put(b"old" * 10, now=0.0)
    r = RingReader(path)
    assert r.get(*d1) is not None  # type: ignore[misc]
    w1.close(unlink=False)
    w2 = RingWriter(path, size=10_000)  # a restarted tund: replaces the file
    d2 = w2.put(b"new" * 10, now=0.0)
    view = r.get(*d2)  # type: ignore[misc]
    assert view is not None and bytes(view) == b"new" * 10
    assert os.path.getsize(path) == DATA_AT + 10_000
    w2.close()


def test_ring_files_are_named_per_run_directory_and_removed(tmp_path: Path) -> None:
    a, b = ring_path(str(tmp_path / "a"), "x"), ring_path(str(tmp_path / "b"), "x")
    assert a != b
    w = RingWriter(a, size=8192)
    assert os.stat(a).st_mode & 0o777 == 0o600
    remove_rings(str(tmp_path / "a"))
    assert not os.path.exists(a)
    w.close()
