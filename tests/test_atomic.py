"""Atomic writers: a failing write re-raises, leaves the previous file intact and no temporary file behind."""

from __future__ import annotations

import json

import pytest
import torch

from protoclr import atomic


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle")


@pytest.mark.parametrize(
    "write,bad",
    [
        (lambda p, v: atomic.torch_save({"v": v}, p), lambda p: atomic.torch_save({"x": Unpicklable()}, p)),
        (lambda p, v: atomic.write_json(p, {"v": v}), lambda p: atomic.write_json(p, {"x": object()})),
    ],
    ids=["torch_save", "write_json"],
)
def test_failed_write_keeps_previous_file(tmp_path, write, bad):
    path = tmp_path / "sub" / "file"
    write(path, 1)
    before = path.read_bytes()
    with pytest.raises((RuntimeError, TypeError)):
        bad(path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["file"]


def test_write_json_is_strict(tmp_path):
    path = tmp_path / "r.json"
    atomic.write_json(path, {"a": float("nan"), "b": [1.0, float("inf")], 3: {"c": 0.5}})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "3": {"c": 0.5}}


def test_torch_save_round_trip_weights_only(tmp_path):
    atomic.torch_save({"w": torch.arange(3)}, tmp_path / "t.pt")
    assert torch.load(tmp_path / "t.pt", weights_only=True)["w"].tolist() == [0, 1, 2]


def test_new_files_follow_the_umask_and_rewrites_keep_the_mode(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        path = tmp_path / "report.md"
        atomic.write_text(path, "a")
        assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        path.chmod(0o640)
        atomic.write_text(path, "b")
        assert path.stat().st_mode & 0o777 == 0o640 and path.read_text() == "b"
    finally:
        os.umask(old)
