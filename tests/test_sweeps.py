"""Every sweep file passes the check `python -m shadow` runs before its first job (latency sweeps: the latency
benchmark's check; sweeps of models that are not here, from the hub or a package not installed: the checks that
need no model), which reads configs, never weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import FAST_CLI, ROOT, run_shadow
from omegaconf import DictConfig

from shadow.benchmarks.latency import check as check_latency
from shadow.benchmarks.latency import placement
from shadow.cli import check_argv
from shadow.compose import check_devices, check_launch, validate
from shadow.errors import ConfigError
from shadow.placements import PLACEMENTS

SWEEPS = sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml"))


def argv(name: str) -> list[str]:
    return ["--config-dir", str(ROOT / "sweeps"), "--config-name", name]


def jobs(name: str) -> list[DictConfig]:
    """The configs of the jobs the sweep file launches, as the check composes them."""
    configs: list[DictConfig] = []
    check_argv(argv(name), check=configs.append)
    return configs


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_file_passes_the_check(name, monkeypatch):
    if name.startswith("paper_"):  # the paper's sweeps are for a GPU machine: check them as on one
        monkeypatch.setattr("torch.cuda.is_available", lambda: True)
        monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    configs: list[DictConfig] = []

    def check(cfg: DictConfig) -> None:
        if name.endswith("_latency"):
            check_latency(cfg)
        elif Path(cfg.model.path).exists():  # a model that is here: its config is read as the launch reads it
            check_launch(cfg)
        else:  # a hub model, or one of a package not installed here: the checks that need no model
            validate(cfg)
        configs.append(cfg)

    check_argv(argv(name), "latency" if name.endswith("_latency") else "config", check)
    assert len(configs) > 1 or name == "mini_scaling"


def test_paper_sweeps_fail_the_check_without_a_gpu(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    with pytest.raises(ConfigError, match="^device=cuda but 0 CUDA devices are visible; use device=cpu$"):
        check_argv(argv("paper_criteria"), devices=check_devices)


def test_a_slurm_launch_leaves_the_device_check_to_each_job(monkeypatch):
    """Submitted from a machine without GPUs, the paper's sweeps still pass every other check; each job checks its
    node's devices when it starts."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    configs: list[DictConfig] = []
    check_argv([*argv("paper_criteria"), "hydra/launcher=slurm"], check=configs.append, devices=check_devices)
    assert len(configs) == 54 and {c.device for c in configs} == {"cuda"}
    with pytest.raises(ConfigError, match="^predictor=nope is not an option"):
        check_argv([*argv("paper_criteria"), "hydra/launcher=slurm", "predictor=nope"], devices=check_devices)


def write_sweep(directory: Path, grid: dict[str, str]) -> str:
    """A sweep file ``directory``/sweep.yaml that extends conf/config.yaml as sweeps/*.yaml do, with this
    hydra.sweeper.params grid; returns the --config-dir and --config-name arguments."""
    directory.mkdir(exist_ok=True)
    params = "".join(f"      {key}: {values}\n" for key, values in grid.items())
    (directory / "sweep.yaml").write_text(f"defaults:\n  - config\n  - _self_\n\nhydra:\n  mode: MULTIRUN\n"
                                          f"  sweeper:\n    params:\n{params}")
    return f"--config-dir {directory} --config-name sweep"


def test_a_bad_value_in_the_grid_fails_in_one_line_before_any_job(tmp_path):
    sweep = write_sweep(tmp_path / "sweeps", {"+criterion": "plainact", "sparsity": "0.3,1.5"})
    result = run_shadow(sweep, tmp_path, SHADOW_CACHE_DIR=str(tmp_path / "cache"))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "error: sparsity=1.5 is outside [0, 1); set sparsity to a fraction such as 0.5\n"
    assert not (tmp_path / "multirun").exists()  # the 0.3 job did not start


def test_the_command_line_replaces_the_grids_value_as_hydra_does(tmp_path):
    sweep = write_sweep(tmp_path / "sweeps", {"+criterion": "plainact", "sparsity": "0.3,1.5"})
    result = run_shadow(f"{sweep} sparsity=0.3 {FAST_CLI} hydra.sweep.dir={tmp_path / 'sweep'}", tmp_path,
                        SHADOW_CACHE_DIR=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]
    assert [x["sparsity"] for x in lines] == [0.3]


def test_a_bad_group_option_in_the_grid_is_one_line(tmp_path):
    sweep = write_sweep(tmp_path, {"+criterion": "plainact", "predictor": "shadow,deja_vu"})
    options = ", ".join(sorted(PLACEMENTS))
    suggestion = r" \(did you mean dejavu\?\)"
    with pytest.raises(ConfigError, match=f"^predictor=deja_vu is not an option{suggestion}; use one of: {options}$"):
        check_argv(sweep.split())


def test_command_line_values_replace_the_grids_values_of_the_same_key(tmp_path):
    sweep = write_sweep(tmp_path, {"+criterion": "plainact,nope", "sparsity": "0.3,1.5", "policy": "global,local"})
    configs: list[DictConfig] = []
    check_argv([*sweep.split(), "+criterion=l2_norm", "sparsity=0.5,0.6"], check=configs.append)
    assert [(c.criterion.name, c.sparsity, c.policy) for c in configs] == [
        ("l2_norm", 0.5, "global"), ("l2_norm", 0.5, "local"), ("l2_norm", 0.6, "global"), ("l2_norm", 0.6, "local")]


def test_the_grid_applies_only_in_multirun_mode(tmp_path):
    sweep = write_sweep(tmp_path, {"sparsity": "0.3,1.5"})
    configs: list[DictConfig] = []
    check_argv([*sweep.split(), "hydra.mode=RUN", "+criterion=plainact"], check=configs.append)
    assert [c.sparsity for c in configs] == [0.5]  # Hydra runs one job, with the file's values


def test_an_unknown_config_name_lists_the_configs():
    with pytest.raises(ConfigError, match="^--config-name=paper_criterion is not a config in .*paper_criteria"):
        check_argv(argv("paper_criterion"))


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
    for cfg in jobs("paper_latency"):
        assert cfg.device_map == "auto" and cfg.dtype == "float16"
        if cfg.arch == "opt-30b":
            with pytest.raises(ConfigError, match="needs ≈107.1 GB"):
                placement(cfg, {0: 80e9})
            caps = placement(cfg, {0: 80e9, 1: 80e9})
        else:
            caps = placement(cfg, {0: 80e9})
        assert all(cap <= 80e9 for cap in caps.values())
