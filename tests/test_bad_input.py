"""Bad input, table-driven: each case fails before any model loads, with one line naming the key, the value and
the fix. The "Bad input" table of docs/reliability.md (between its bad-input markers) is generated from this table
and checked against it: ``python tests/test_bad_input.py`` regenerates it. The lists of options in the messages
come from the code's registries (criteria, predictors, policies, dtypes, datasets, launchers) and conf/'s groups."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import ROOT
from hydra import compose, initialize_config_dir

from shadow.cli import LAUNCHERS, check_argv, fix_argv, overrides_of
from shadow.compose import check_devices, register_configs
from shadow.config import ATTENTION_UNITS, EVAL_DATASETS, MODEL_DTYPES, POLICIES
from shadow.criteria import CRITERIA
from shadow.errors import ConfigError
from shadow.placements import PLACEMENTS
from shadow.run import run

DOC = ROOT / "docs" / "reliability.md"


def listed(names) -> str:
    return ", ".join(names)


def conf_group(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


CRITERION_NAMES = listed(sorted(CRITERIA))
JACOV_VARIANTS = sorted(CRITERIA["jacov"])  # jacov has no reference form


@dataclass(frozen=True)
class Case:
    what: str
    args: str  # as typed after `python -m shadow`; {tmp} is a scratch directory
    message: str  # the whole error line after "error: "


CASES = [
    Case("no criterion", "sparsity=0.3",
         f"criterion is not set; add +criterion=<name> with one of: {CRITERION_NAMES}"),
    Case("unknown criterion", "+criterion=plainact_v2",
         f"criterion=plainact_v2 is not an option (did you mean plainact?); use one of: {CRITERION_NAMES}"),
    Case("criterion variant it does not have", "+criterion=jacov criterion.variant=reference",
         f"criterion.variant='reference' is not one of {listed(JACOV_VARIANTS)}; pick one, e.g. "
         f"criterion.variant={JACOV_VARIANTS[0]}"),
    Case("unknown predictor", "+criterion=plainact predictor=deja_vu",
         f"predictor=deja_vu is not an option (did you mean dejavu?); use one of: {listed(sorted(PLACEMENTS))}"),
    Case("unknown model", "+criterion=plainact model=opt-175b",
         f"model=opt-175b is not an option; use one of: {listed(conf_group('model'))}"),
    Case("unknown policy", "+criterion=plainact policy=per_layer",
         f"policy='per_layer' is not one of {listed(POLICIES)}; pick one, e.g. policy={POLICIES[0]}"),
    Case("sparsity of 1", "+criterion=plainact sparsity=1.0",
         "sparsity=1.0 is outside [0, 1); set sparsity to a fraction such as 0.5"),
    Case("negative sparsity", "+criterion=plainact head_sparsity=-0.1",
         "head_sparsity=-0.1 is outside [0, 1); set head_sparsity to a fraction such as 0.5"),
    Case("sparsity that is not a number", "+criterion=plainact sparsity=half",
         "sparsity='half' is not a number; give sparsity a number"),
    Case("one bad value in a sweep", "+criterion=plainact -m sparsity=0.3,0.5,50",
         "sparsity=50.0 is outside [0, 1); set sparsity to a fraction such as 0.5"),
    Case("a layer left empty by a local policy", "+criterion=plainact policy=local head_sparsity=0.99",
         "head_sparsity=0.99 keeps no unit of the 8 per layer under policy=local; lower head_sparsity below "
         "0.9375 or use policy=global"),
    Case("a hybrid floor above the budget", "+criterion=plainact policy=hybrid min_heads=6 sparsity=0.5",
         "min_heads=6 per layer needs 36 heads but head_sparsity=0.5 keeps 24; lower min_heads or head_sparsity"),
    Case("misspelt key", "+criterion=plainact sparsty=0.5",
         "sparsty is not a setting (did you mean sparsity?); check its spelling (python -m shadow --cfg job lists "
         "them all)"),
    Case("a checkpoint given as a preset", "+criterion=plainact model=./my-model",
         "model=./my-model is not a preset; for a checkpoint of your own write model.path=./my-model "
         "(docs/your-model.md)"),
    Case("a job of a sweep whose layer the model lacks", "+criterion=plainact -m predictor.layer=4,6",
         "predictor.layer=6 is not a layer of this 6-layer model; set predictor.layer between 0 and 5"),
    Case("missing local model path", "+criterion=plainact model.path=/nonexistent/opt-1.3b",
         "model.path='/nonexistent/opt-1.3b' does not exist; point model.path at a Hugging Face model directory "
         "or a .gguf file, or use a hub id such as facebook/opt-1.3b"),
    Case("a directory without a model", "+criterion=plainact model.path={tmp}",
         "model.path='{tmp}' has no config.json; point model.path at a Hugging Face model directory or a .gguf "
         "file, or use a hub id such as facebook/opt-1.3b"),
    Case("missing GGUF file", "+criterion=plainact model.path=/nonexistent/model.Q4_1.gguf",
         "model.path='/nonexistent/model.Q4_1.gguf' does not exist; point model.path at a .gguf file (the preset's "
         "comment says which package ships it) or at a model directory"),
    Case("GGUF file not in the model directory", "+criterion=plainact model.path={tmp} model.gguf_file=model.gguf",
         "model.gguf_file='model.gguf' is not in model.path='{tmp}'; name a .gguf file of that directory"),
    Case("unknown layer scale", "+criterion=plainact layer_scale=per_layer",
         "layer_scale='per_layer' is not one of calibrated, none; pick one, e.g. layer_scale=calibrated"),
    Case("calibration sample larger than its pool", "+criterion=plainact calibration.limit=300 "
         "calibration.sample_from=100",
         "calibration.sample_from=100 draws calibration.limit=300 examples from the first 100; set "
         "calibration.limit to at most 100, or calibration.sample_from=null"),
    Case("greedy allocation beyond TEAL's path", "+criterion=plainact predictor=teal predictor.allocation=greedy "
         "sparsity=0.95",
         "predictor.allocation=greedy follows TEAL's greedy path up to a sparsity of 0.9; lower sparsity to at most "
         "that, or use predictor.allocation=uniform"),
    Case("hub name while offline", "+criterion=plainact model=opt-1.3b",
         "model.path='facebook/opt-1.3b': the hub is offline (HF_HUB_OFFLINE=1) and it is not in the local cache; "
         "download it where the hub is reachable (huggingface-cli download) or set model.path to a local directory"),
    Case("a model of a family shadow does not know", "+criterion=plainact model.path={tmp}/gpt2",
         "model.path='{tmp}/gpt2' is a 'gpt2' model, not of a family shadow knows (llama, mistral, opt, qwen2, "
         "qwen3); use a checkpoint of one of them, or add the family (docs/extending.md)"),
    Case("a Gemma checkpoint", "+criterion=plainact model.path={tmp}/gemma",
         "model.path='{tmp}/gemma' is a 'gemma' model: Gemma scales its embeddings by √hidden_size, which shadow's "
         "llama family does not model; use a Llama, Mistral or Qwen checkpoint"),
    Case("unknown attention unit", "+criterion=plainact attention_unit=kv_head",
         f"attention_unit='kv_head' is not one of {listed(ATTENTION_UNITS)}; pick one, e.g. "
         f"attention_unit={ATTENTION_UNITS[0]}"),
    Case("greedy allocation for a placement without sites to allocate",
         "+criterion=plainact predictor=cats predictor.allocation=greedy",
         "predictor.allocation=greedy allocates TEAL's and WINA's sites, not predictor=cats's; use predictor=teal "
         "or wina, or predictor.allocation=uniform"),
    Case("a dense context for thresholds", "+criterion=plainact predictor=teal eval.context=dense",
         "eval.context=dense runs each request's context on the whole model and masks the rest, but predictor=teal "
         "thresholds every position and has no masks; use eval.context=auto"),
    Case("unknown eval context", "+criterion=plainact eval.context=prompt",
         "eval.context='prompt' is not one of auto, masked, dense; pick one, e.g. eval.context=auto"),
    Case("predictor after the last layer", "+criterion=plainact predictor.layer=6",
         "predictor.layer=6 is not a layer of this 6-layer model; set predictor.layer between 0 and 5"),
    Case("more few-shot examples than the task has", "+criterion=plainact eval=tasks eval.num_fewshot=5000",
         "eval.num_fewshot=5000 needs more than the 200 documents of opt_mini_nextsent; lower eval.num_fewshot"),
    Case("unknown lm-eval task", "+criterion=plainact eval=tasks eval.tasks=[hellaswagg]",
         "eval.tasks: hellaswagg unknown to lm-eval; use an lm-eval task name (e.g. piqa) or add its directory with "
         "eval.include_path"),
    Case("task directory that does not exist", "+criterion=plainact eval=tasks eval.include_path=/nonexistent/tasks",
         "eval.include_path='/nonexistent/tasks' is not a directory; point it at a folder of lm-eval task YAML files"),
    Case("unknown launcher preset", "+criterion=plainact hydra/launcher=slurm_a100 -m sparsity=0.5",
         "hydra/launcher=slurm_a100 is not an option; use one of: "
         f"{listed(sorted({*conf_group('hydra/launcher'), *LAUNCHERS}))}"),
    Case("unknown dtype", "+criterion=plainact model.dtype=float8",
         f"model.dtype='float8' is not one of {listed(MODEL_DTYPES)}; pick one, e.g. model.dtype={MODEL_DTYPES[0]}"),
    Case("float16 on the CPU", "+criterion=plainact model.dtype=float16",
         "model.dtype='float16' is slow and inexact on the CPU; use model.dtype=float32 or bfloat16, or device=cuda"),
    Case("device caps that are not a map", "+criterion=plainact model.device_map=auto model.max_memory=[70GiB]",
         "model.max_memory=['70GiB'] is not a map from devices to sizes; write it as accelerate takes it, e.g. "
         "model.max_memory={{0: 70GiB, 1: 70GiB, cpu: 200GiB}}"),
    Case("device caps without a device map", "+criterion=plainact model.max_memory={{cpu:8MB}}",
         "model.max_memory is read only with model.device_map=auto; add model.device_map=auto, or drop "
         "model.max_memory"),
    Case("a GPU that is not there", "+criterion=plainact device=cuda:64",
         "device=cuda:64 but {gpus} CUDA devices are visible; use device={fallback}"),
    Case("cache directory that is not writable", "+criterion=plainact cache_dir={tmp}/a-file/cache",
         "cache_dir='{tmp}/a-file/cache' is not writable; set cache_dir or SHADOW_CACHE_DIR to a writable "
         "directory"),
    Case("per-token masks without a predictor", "+criterion=plainact predictor=static predictor.granularity=token",
         "predictor.granularity=token needs a trained predictor, not predictor=static; use predictor=shadow or "
         "dejavu, or predictor.granularity=request"),
    Case("a task setting under a perplexity evaluation", "+criterion=plainact eval.tasks=[piqa]",
         "eval.tasks applies only to eval=tasks; add eval=tasks, or drop eval.tasks"),
    Case("a calibration setting its source ignores", "+criterion=plainact calibration.num_fewshot=5",
         "calibration.num_fewshot is read only with calibration.source=tasks; add calibration.source=tasks (or "
         "calibration=paper), or drop calibration.num_fewshot"),
    Case("unknown perplexity dataset", "+criterion=plainact eval.dataset=ptb",
         f"eval.dataset='ptb' is not one of {listed(EVAL_DATASETS)}; pick one, e.g. eval.dataset={EVAL_DATASETS[0]}"),
    Case("batch size of 0", "+criterion=plainact calibration.batch_size=0",
         "calibration.batch_size=0 must be at least 1; set calibration.batch_size=8"),
    Case("broken override syntax", "+criterion=plainact sparsity=[0.3",
         "sparsity=[0.3 does not parse (no viable alternative at input '[0.3'); write key=value, key=a,b for a "
         "sweep, key=[a,b] for a list"),
]

IN_JOB = ("sparsity of 1", "a layer left empty by a local policy", "predictor after the last layer",
          "missing local model path", "unknown lm-eval task", "a GPU that is not there")  # a job launched elsewhere


@pytest.fixture
def scratch(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "gemma").mkdir()
    (tmp_path / "gemma" / "config.json").write_text(json.dumps({"model_type": "gemma"}))
    (tmp_path / "a-file").write_text("not a directory")
    return tmp_path


def expected(case: Case, tmp: Path) -> str:
    import torch

    fallback = "cuda:0" if torch.cuda.is_available() else "cpu"
    return case.message.format(tmp=tmp, gpus=torch.cuda.device_count(), fallback=fallback)


def first_error(args: str) -> str:
    """What `python -m shadow <args>` reports before launching any job."""
    try:
        check_argv(fix_argv(args.split()), devices=check_devices)
    except ConfigError as err:
        return str(err)
    raise AssertionError(f"no error before the first job for {args}")


def error_in_job(args: str, monkeypatch) -> str:
    """What a job reports for the same overrides, up to (not including) model loading: it checks them again."""
    def loaded(*a, **k):
        raise AssertionError("the model was loaded before the error")
    monkeypatch.setattr("shadow.run.load_model", loaded)
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        overrides = [o for o in overrides_of(fix_argv(args.split()))[0] if "hydra/" not in o and o != "-m"]
        cfg = compose(config_name="config", overrides=overrides)
    with pytest.raises(ConfigError) as err:
        run(cfg, Path(cfg.cache_dir).parent / "out")
    return str(err.value)


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input_fails_before_the_first_job_in_one_line(case, scratch, monkeypatch):
    monkeypatch.setenv("SHADOW_CACHE_DIR", str(scratch / "cache"))
    assert first_error(case.args.format(tmp=scratch)) == expected(case, scratch)


@pytest.mark.parametrize("case", [c for c in CASES if c.what in IN_JOB], ids=lambda c: c.what)
def test_a_job_checks_its_config_again(case, scratch, monkeypatch):
    monkeypatch.setenv("SHADOW_CACHE_DIR", str(scratch / "cache"))
    assert error_in_job(case.args.format(tmp=scratch), monkeypatch) == expected(case, scratch)


def test_the_command_line_shows_one_line_and_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SHADOW_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "shadow", "+criterion=plainact", "-m", "sparsity=0.3,0.5,50"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "error: sparsity=50.0 is outside [0, 1); set sparsity to a fraction such as 0.5\n"
    assert not (tmp_path / "multirun").exists()  # no job started
    full = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env={**env, "HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr and "ConfigError" in full.stderr
    shown = subprocess.run([sys.executable, "-m", "shadow", "--cfg", "job", "sparsity=5"], cwd=tmp_path,
                           capture_output=True, text=True, env=env)
    assert shown.returncode == 0 and "sparsity: 5" in shown.stdout
    assert shown.stderr == "note: --cfg prints the config unchecked; drop --cfg to check every job\n"


def doc_section() -> str:
    rows = [f"| {c.what} | `{c.args.format(tmp='/tmp')}` | {c.message.format(tmp='/tmp', gpus=0, fallback='cpu')} |"
            for c in CASES]
    return "\n".join(["| bad input | command (`python -m shadow …`) | error |", "|---|---|---|", *rows]) + "\n"


def test_reliability_doc_lists_every_case():
    doc = DOC.read_text()
    start, end = "<!-- bad-input:start -->\n", "<!-- bad-input:end -->"
    assert doc.split(start)[1].split(end)[0] == doc_section(), "run: python tests/test_bad_input.py"


if __name__ == "__main__":  # regenerate the table in docs/reliability.md
    doc = DOC.read_text()
    head, rest = doc.split("<!-- bad-input:start -->\n")
    tail = rest.split("<!-- bad-input:end -->")[1]
    DOC.write_text(f"{head}<!-- bad-input:start -->\n{doc_section()}<!-- bad-input:end -->{tail}")
