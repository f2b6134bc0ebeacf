"""Sweeps through Hydra launchers: submitit's local executor (what SLURM runs), and joblib's parallel processes
sharing one artifact cache."""

from __future__ import annotations

import json

import pytest
from helpers import FAST_CLI, run_shadow
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from shadow.compose import gpus_for, register_configs


def results(sweep) -> list[dict]:
    return [json.loads(x) for x in (sweep / "results.jsonl").read_text().splitlines()]


def test_submitit_local_executor_runs_a_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_shadow(f"+criterion=l2_norm {FAST_CLI} hydra/launcher=submitit_local hydra.sweep.dir={sweep} "
                        "-m sparsity=0.3,0.5", tmp_path, SHADOW_CACHE_DIR=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(r["sparsity"] for r in results(sweep)) == [0.3, 0.5]
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2  # each point ran as a submitit job


def test_parallel_jobs_compute_a_shared_artifact_once(tmp_path):
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    result = run_shadow(f"+criterion=l2_norm {FAST_CLI} hydra/launcher=parallel hydra.sweep.dir={sweep} "
                        "-m sparsity=0.3,0.5", tmp_path, SHADOW_CACHE_DIR=str(cache), SHADOW_JOBS="2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    assert sorted(r["sparsity"] for r in results(sweep)) == [0.3, 0.5]
    log = result.stdout + result.stderr
    # both jobs need the same traces and predictor: one computed each, the other waited and reused it
    assert log.count("traces: reusing") == 1 and log.count("predictor: reusing") == 1
    assert len([p for p in (cache / "traces").iterdir() if p.is_dir() and not p.name.startswith(".")]) == 1


@pytest.mark.parametrize(("model", "dtype", "gpus"), [("opt-mini", "float32", 0), ("opt-1.3b", "float32", 1),
                                                      ("opt-13b", "float16", 1), ("opt-66b", "float16", 2),
                                                      ("opt-66b", "float32", 4), ("llama-mini", "float32", 0),
                                                      ("llama-3.1-8b", "bfloat16", 1),
                                                      ("llama-2-13b", "float32", 1), ("qwen3-8b", "float32", 1)])
def test_slurm_preset_asks_for_gpus_by_model_size(model, dtype, gpus):
    assert gpus_for(model, dtype) == gpus


def test_slurm_preset_composes_with_the_models_gpu_count(monkeypatch):
    from helpers import CONF_DIR

    monkeypatch.setenv("SHADOW_GPU_GB", "40")
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+criterion=plainact", "model=opt-30b",
                                                       "hydra/launcher=slurm"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["gpus_per_node"] == 2  # 30B in fp16 with 20% headroom: 72 GB over 40 GB GPUs
