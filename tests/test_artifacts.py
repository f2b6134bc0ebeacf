"""Artifacts: built once, reused, verified by checksum, never half-written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from shadow.artifacts import cache_key, cached


def builder(calls: list):
    def build(out):
        calls.append(out)
        save_file({"x": torch.arange(4.0)}, str(out / "x.safetensors"))
        return {"note": "built"}
    return build


def test_built_once_then_reused(tmp_path):
    calls = []
    first, meta = cached(tmp_path, "kind", {"a": 1}, builder(calls))
    second, meta2 = cached(tmp_path, "kind", {"a": 1}, builder(calls))
    assert first == second and len(calls) == 1 and meta == meta2 and meta["note"] == "built"
    assert torch.equal(load_file(str(first / "x.safetensors"))["x"], torch.arange(4.0))
    assert json.loads((first / "meta.json").read_text())["inputs"] == {"a": 1}


def test_key_follows_the_inputs(tmp_path):
    assert cache_key({"a": 1, "b": 2}) == cache_key({"b": 2, "a": 1})
    assert cache_key({"a": 1}) != cache_key({"a": 2})
    calls = []
    cached(tmp_path, "kind", {"a": 1}, builder(calls))
    cached(tmp_path, "kind", {"a": 2}, builder(calls))
    assert len(calls) == 2


def test_corrupt_file_is_detected_and_rebuilt(tmp_path, caplog):
    calls = []
    path, _ = cached(tmp_path, "kind", {"a": 1}, builder(calls))
    blob = path / "x.safetensors"
    blob.write_bytes(blob.read_bytes()[:-3])  # truncated
    path, _ = cached(tmp_path, "kind", {"a": 1}, builder(calls))
    assert len(calls) == 2 and "fails its checksum" in caplog.text
    assert torch.equal(load_file(str(path / "x.safetensors"))["x"], torch.arange(4.0))


def test_failed_build_leaves_nothing_behind(tmp_path):
    def broken(out):
        save_file({"x": torch.zeros(2)}, str(out / "x.safetensors"))
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cached(tmp_path, "kind", {"a": 1}, broken)
    assert [p.name for p in (tmp_path / "kind").iterdir() if not p.name.endswith(".lock")] == []


def test_too_little_disk_fails_before_any_work(tmp_path, monkeypatch, caplog):
    import shutil
    from collections import namedtuple

    from shadow.artifacts import check_space
    from shadow.errors import ConfigError

    caplog.set_level("INFO")
    check_space(tmp_path / "not" / "yet", 1e3, "traces and predictor")
    assert "traces and predictor: ≈0.0 MB on disk" in caplog.text
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10e9, 9.5e9, 0.5e9))
    with pytest.raises(ConfigError, match=r"cache_dir='.*' has 0.5 GB free but traces and predictor need ≈2.0 GB; "
                                          r"free space or set cache_dir to a larger disk"):
        check_space(tmp_path, 2e9, "traces and predictor")
