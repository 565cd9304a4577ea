"""Atomic file writes: complete or absent, flushed to disk, no temporary file left behind."""

from __future__ import annotations

import os

import pytest

from evomerge import atomic
from evomerge.atomic import atomic_write_bytes, atomic_write_text


def test_writes_replace_whole_files_and_sync_them(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "new" / "dir" / "state.bin"  # missing parents are created
    atomic_write_bytes(path, b"\x00first")
    assert path.read_bytes() == b"\x00first"
    atomic_write_text(path, "second, ünïcode")
    assert path.read_text(encoding="utf-8") == "second, ünïcode"
    assert len(synced) == 2
    assert os.listdir(path.parent) == ["state.bin"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "best.yaml"
    atomic_write_text(path, "old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["best.yaml"]
