"""Where a simulation puts its hospitals' homes when the caller names no folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedcore import simulate
from fedcore.simulate._scratch import scratch_root

_MEMORY = Path("/dev/shm")
needs_memory_folder = pytest.mark.skipif(
    not (_MEMORY.is_dir() and os.access(_MEMORY, os.W_OK)),
    reason="no /dev/shm on this system (the homes go to an ordinary temporary folder)")


@needs_memory_folder
def test_a_simulation_keeps_its_temporary_homes_in_memory_and_deletes_them(monkeypatch):
    monkeypatch.delenv("TMPDIR", raising=False)
    X, y = np.arange(40.0).reshape(20, 2), np.arange(20) % 2
    with simulate.from_arrays(X, y, n_nodes=2, tags=["t"]) as fed:
        root = fed.root
        assert root.parent == _MEMORY
        assert sorted(p.name for p in root.iterdir()) == ["node-01", "node-02"]
        assert (fed.nodes[0].home / "audit.jsonl").stat().st_size > 0  # the same files
    assert not root.exists()


def test_tmpdir_set_by_the_user_is_where_temporary_homes_go(monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # tempfile reads TMPDIR again
    X, y = np.arange(40.0).reshape(20, 2), np.arange(20) % 2
    with simulate.from_arrays(X, y, n_nodes=2, tags=["t"]) as fed:
        assert fed.root.parent == tmp_path
    assert list(tmp_path.iterdir()) == []


@needs_memory_folder
def test_data_too_large_for_the_memory_folder_goes_to_disk(monkeypatch):
    monkeypatch.delenv("TMPDIR", raising=False)
    free = shutil.disk_usage(_MEMORY).free
    root = scratch_root(size_hint=free)  # four times that would not fit
    try:
        assert root.parent != _MEMORY and root.is_dir()
    finally:
        root.rmdir()


def test_without_a_memory_folder_the_homes_go_to_an_ordinary_temporary_folder(
        monkeypatch, tmp_path):
    monkeypatch.delenv("TMPDIR", raising=False)
    root = scratch_root(memory=tmp_path / "absent")
    try:
        assert root.is_dir() and root.parent != tmp_path / "absent"
    finally:
        root.rmdir()
