"""The user's exact command, in a subprocess, as typed: `python -m shadow +criterion=plainact -m sparsity=0.3,0.5`."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FAST_CLI, run_shadow

from shadow.benchmarks.gpu import Budget, step
from shadow.cli import fix_argv, overrides_of
from shadow.criteria import CRITERIA
from shadow.opt_mini import MODEL_DIR

shadow = run_shadow


def test_flags_move_to_the_front():
    assert fix_argv(["+criterion=plainact", "-m", "sparsity=0.3,0.5"]) == ["-m", "+criterion=plainact",
                                                                          "sparsity=0.3,0.5"]
    assert fix_argv(["--cfg", "job"]) == ["--cfg", "job", "--resolve"]
    assert fix_argv(["logger=none", "--config-dir", "sweeps", "-cn", "opt_mini_study", "seed=1", "--info",
                     "defaults", "--config-name=x"]) == ["--config-dir", "sweeps", "-cn", "opt_mini_study", "--info",
                                                         "defaults", "--config-name=x", "logger=none", "seed=1"]


def test_flags_and_their_values_are_told_from_overrides():
    argv = ["-m", "-cd", "sweeps", "--config-name=paper_criteria", "--info", "searchpath", "a=1"]
    assert overrides_of(argv) == (["a=1"], {"--multirun": "", "--config-dir": "sweeps",
                                            "--config-name": "paper_criteria", "--info": "searchpath"})
    assert overrides_of(["--info", "a=1"]) == (["a=1"], {"--info": ""})  # --info's value is optional


@pytest.mark.slow
def test_the_exact_command_runs_two_jobs(tmp_path):
    """The README's command, which CI runs verbatim on opt-mini before the tests, on the other embedded model, with
    32 calibration examples, short predictor training and the first 6 windows: two jobs, the second reusing the
    first's traces, each with its results line, metrics file and offline W&B run."""
    model = "llama-mini"
    result = shadow(f"model={model} calibration.limit=32 predictor.head_epochs=20 predictor.neuron_epochs=5 "
                    "eval.limit=6 +criterion=plainact -m sparsity=0.3,0.5", tmp_path,
                    SHADOW_CACHE_DIR=str(tmp_path / "cache"), WANDB_MODE="offline")
    assert result.returncode == 0, result.stderr[-3000:]
    [results] = list((tmp_path / "multirun").glob("*/*/results.jsonl"))
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert sorted(x["sparsity"] for x in lines) == [0.3, 0.5]
    assert all(x["model"] == model and x["criterion"] == "plainact" for x in lines)
    low, high = sorted(lines, key=lambda x: x["sparsity"])
    assert low["metrics"]["token_perplexity"] < high["metrics"]["token_perplexity"]
    assert result.stdout.count("traces: reusing") == 1  # the second job reuses the first job's scores
    assert len(list(results.parent.glob("*/wandb/offline-run-*"))) == 2
    assert len(list(results.parent.glob("*/metrics.json"))) == 2


def test_missing_criterion_is_one_line_listing_the_criteria(tmp_path):
    result = shadow("sparsity=0.3", tmp_path, SHADOW_CACHE_DIR=str(tmp_path / "cache"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: criterion is not set; add +criterion=<name> with one of: {', '.join(sorted(CRITERIA))}"
    assert "Traceback" not in result.stderr


def test_cfg_job_shows_the_resolved_model_path(tmp_path):
    result = shadow("+criterion=plainact --cfg job", tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"path: {MODEL_DIR}" in result.stdout


@pytest.mark.slow
def test_every_criterion_runs_end_to_end(tmp_path):
    fast = f"{FAST_CLI} hydra.sweep.dir={tmp_path / 'sweep'}"
    result = shadow(f"-m +criterion={','.join(sorted(CRITERIA))} {fast}", tmp_path,
                    SHADOW_CACHE_DIR=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]
    assert sorted(x["criterion"] for x in lines) == sorted(CRITERIA)
    for line in lines:
        assert 1 < line["metrics"]["token_perplexity"] < 1e6
        assert line["metrics"]["achieved_head_sparsity"] == 0.5
        heads_only = line["criterion"] in ("jacov", "epenas")
        assert line["metrics"]["achieved_neuron_sparsity"] == (0.0 if heads_only else 0.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the check runs for real")
def test_the_gpu_check_says_in_one_line_that_it_needs_cuda(tmp_path):
    result = run_shadow("--out report.md", tmp_path, module="shadow.benchmarks.gpu")
    assert result.returncode == 1 and not (tmp_path / "report.md").exists()
    assert result.stdout.strip().splitlines() == [
        "no CUDA device is visible (torch.cuda.is_available() is False): the GPU check needs one"]


def test_a_gpu_check_budget_too_short_for_any_step_is_refused_in_one_line(tmp_path):
    result = run_shadow("--budget 30", tmp_path, module="shadow.benchmarks.gpu")
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "--budget 30: under 60 s no step can run; give at least 60, or leave it out for no bound"]


def test_the_gpu_checks_budget_cuts_each_steps_limit_to_what_is_left():
    assert Budget(None).limit(300) == 300
    assert Budget(1000).limit(300) == 300
    assert 118 <= Budget(120).limit(300) <= 120
    assert Budget(59).limit(300) is None  # too little left for a step: skipped


def test_a_gpu_check_step_cut_short_reports_what_it_printed(tmp_path, monkeypatch):
    (tmp_path / "slow_step.py").write_text("import sys, time\nprint('row 1')\nprint('warned', file=sys.stderr)\n"
                                          "print('row 2')\ntime.sleep(60)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    passed, tail, seconds = step(["slow_step"], timeout=5)
    assert not passed and seconds < 30
    assert tail.splitlines() == ["row 1", "row 2", "warned", "timed out after 5 s"]
