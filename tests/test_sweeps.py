"""Every sweep file composes, and every job it describes passes validation (latency sweeps: known architectures)."""

from __future__ import annotations

import itertools

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir

from shadow.benchmarks.latency import check as check_latency
from shadow.benchmarks.latency import placement
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
            check_latency(cfg)
        else:
            validate(cfg)


PAPER_TASKS = ["piqa", "copa", "openbookqa", "winogrande", "rte", "hellaswag", "arc_easy"]


@pytest.mark.parametrize("name", [n for n in SWEEPS if n.startswith("paper_") and n != "paper_latency"])
def test_paper_sweeps_calibrate_as_the_paper_did(name):
    """Every trace, predictor and static mask at paper size comes from the seven tasks' training documents,
    5-shot, up to 500 per task, in half precision: not from opt-mini's speeches."""
    for cfg in jobs(name):
        assert cfg.calibration.source == "tasks" and list(cfg.calibration.tasks) == PAPER_TASKS
        assert cfg.calibration.num_fewshot == 5 and cfg.calibration.limit == 500
        assert cfg.model.dtype == "float16" and cfg.device == "cuda"


def test_reference_sweeps_run_both_protocols_of_the_same_grid():
    for name in ("paper_reference", "mini_reference"):
        configs = jobs(name)
        ours = [c for c in configs if c.compat == "none"]
        theirs = [c for c in configs if c.compat == "reference"]
        assert len(ours) == len(theirs) == 5
        assert [c.sparsity for c in ours] == [c.sparsity for c in theirs]
        for cfg in theirs:
            assert cfg.criterion.variant == "reference" and cfg.neuron_sparsity == 0.0
            assert cfg.dense_first_layer and cfg.eval.mask_from == "scored"
        for cfg in ours:
            assert cfg.criterion.variant == "textbook" and cfg.neuron_sparsity is None
            assert not cfg.dense_first_layer and cfg.eval.mask_from == "context"


def test_paper_latency_fits_80_gb_cards():
    """Counted on meta: OPT-1.3B to 13B (fp16, with gathered copies and predictors) fit one 80 GB card, OPT-30B
    does not and spreads over two under device_map=auto."""
    from shadow.config import ConfigError

    for cfg in jobs("paper_latency"):
        assert cfg.device_map == "auto" and cfg.dtype == "float16"
        if cfg.arch == "opt-30b":
            with pytest.raises(ConfigError, match="needs ≈107.1 GB"):
                placement(cfg, {0: 80e9})
            caps = placement(cfg, {0: 80e9, 1: 80e9})
        else:
            caps = placement(cfg, {0: 80e9})
        assert all(cap <= 80e9 for cap in caps.values())
