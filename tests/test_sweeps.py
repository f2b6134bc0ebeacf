"""Every sweep file composes, and every job it describes passes validation (latency sweeps: known architectures)."""

from __future__ import annotations

import itertools

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir

from shadow.benchmarks.latency import ARCHS
from shadow.config import register_configs, validate

SWEEPS = sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml"))


def jobs(name: str) -> list:
    register_configs()
    search = f"hydra.searchpath=[file://{ROOT / 'conf'}]"
    with initialize_config_dir(config_dir=str(ROOT / "sweeps"), version_base="1.3"):
        base = compose(config_name=name, overrides=[search], return_hydra_config=True)
        params = base.hydra.sweeper.params
        grid = [[f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()]
        return [compose(config_name=name, overrides=[search, *combination])
                for combination in itertools.product(*grid)]


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_file_describes_valid_jobs(name, monkeypatch):
    if name.startswith("paper_"):  # the paper's sweeps are for a GPU machine: validate them as on one
        monkeypatch.setattr("torch.cuda.is_available", lambda: True)
        monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    configs = jobs(name)
    assert len(configs) > 1 or name == "mini_scaling"
    for cfg in configs:
        if "arch" in cfg:  # a latency sweep
            assert cfg.arch in ARCHS and all(0 <= s < 1 for s in cfg.sparsity)
        else:
            validate(cfg)
