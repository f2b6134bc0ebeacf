"""Composition and validation: every option composes, and bad input fails early naming key, value and fix."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from shadow.compose import check_devices, conf_options, validate
from shadow.config import EVALS
from shadow.criteria import CRITERIA
from shadow.errors import ConfigError
from shadow.models import check_model


def test_criterion_registry_equals_conf_files():
    assert sorted(CRITERIA) == conf_options("criterion")


@pytest.mark.parametrize("group", ["model", "criterion", "predictor", "eval", "logger"])
def test_every_option_of_every_group_composes(compose_cfg, group):
    for option in conf_options(group):
        extra = [] if group == "criterion" else ["+criterion=plainact"]
        cfg = compose_cfg(f"{'+' if group == 'criterion' else ''}{group}={option}", *extra)
        assert cfg[group].name == option or (group == "eval" and cfg.eval.name in EVALS)
        if group != "model":
            validate(cfg)


def test_default_model_is_the_embedded_opt_mini(compose_cfg):
    cfg = compose_cfg("+criterion=plainact")
    path, config = check_model(cfg.model)
    assert cfg.model.name == "opt-mini" and path.endswith("opt_mini/model")
    assert config.num_hidden_layers > 1 and config.num_attention_heads > 1


def test_no_criterion_lists_the_criteria(compose_cfg):
    names = ", ".join(sorted(CRITERIA))
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg())
    assert str(err.value) == f"criterion is not set; add +criterion=<name> with one of: {names}"


@pytest.mark.parametrize("override,message", [
    ("sparsity=1.0", "sparsity=1.0 is outside \\[0, 1\\)"),
    ("sparsity=-0.1", "sparsity=-0.1 is outside \\[0, 1\\)"),
    ("head_sparsity=1.5", "head_sparsity=1.5 is outside"),
    ("policy=sideways", "policy='sideways' is not one of global, local"),
    ("predictor.target_norm=none", "predictor.target_norm='none' is not one of"),
    ("predictor.dtype=int4", "predictor.dtype='int4' is not one of float32, float16, bfloat16, int8"),
    ("predictor.neuron_rank=1024", "^predictor.neuron_rank=1024 must be an integer from 1 to predictor.neuron_hidden "
                                   "- 1 \\(1023\\) to save anything; use null for the full layer$"),
    ("predictor.dtype=int8 device=cuda", "^predictor.dtype=int8 runs on the CPU only \\(torch's dynamic "
                                         "quantisation\\) but the predictor runs on cuda; use predictor.dtype=float16 "
                                         "or bfloat16 there, or predictor.device=cpu$"),
    ("eval.dataset=c4", "eval.dataset='c4' is not one of opt_mini, wikitext2"),
    ("eval.protocols=[token,bytes]", "eval.protocols='bytes' is not one of token, word"),
    ("model.dtype=int8", "model.dtype='int8' is not one of"),
    ("eval.batch_size=0", "eval.batch_size=0 must be at least 1"),
    ("cache_dir=/proc/shadow-cache", "cache_dir='/proc/shadow-cache' is not writable"),
])
def test_bad_values_fail_with_key_value_and_fix(compose_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg("+criterion=plainact", *override.split()))


@pytest.mark.parametrize("override,message", [
    ("model.dtype=float16", "^model.dtype='float16' is slow and inexact on the CPU; use model.dtype=float32 or "
                            "bfloat16, or device=cuda$"),
    ("device=cuda:1", "^device=cuda:1 but 0 CUDA devices are visible; use device=cpu$"),
    ("predictor.device=cuda", "^predictor.device=cuda but 0 CUDA devices are visible; use predictor.device=cpu$"),
])
def test_devices_are_checked_where_the_job_runs(compose_cfg, monkeypatch, override, message):
    """Machine-dependent rules are their own check: a SLURM job runs it on its node, not where it was submitted."""
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    cfg = compose_cfg("+criterion=plainact", override)
    validate(cfg)
    with pytest.raises(ConfigError, match=message):
        check_devices(cfg)


def test_variant_must_exist_for_the_criterion(compose_cfg):
    validate(compose_cfg("+criterion=plainact", "criterion.variant=reference"))
    with pytest.raises(ConfigError, match="criterion.variant='reference' is not one of textbook"):
        validate(compose_cfg("+criterion=jacov", "criterion.variant=reference"))


def test_each_eval_kind_accepts_only_its_own_keys(compose_cfg):
    """One schema per kind: a setting the chosen evaluation would ignore is an error, not silence."""
    for overrides, key in ((["eval.tasks=[piqa]"], "tasks"), (["eval.num_fewshot=5"], "num_fewshot"),
                           (["eval=tasks", "eval.protocols=[token]"], "protocols"),
                           (["eval=tasks", "eval.dataset=wikitext2"], "dataset"),
                           (["eval=paper", "eval.seq_len=128"], "seq_len")):
        with pytest.raises(ConfigCompositionException) as err:
            compose_cfg("+criterion=plainact", *overrides)
        assert f"Key '{key}' not in" in str(err.value.__cause__)
    for kind in ("perplexity", "tasks"):  # the keys every kind has
        cfg = compose_cfg("+criterion=plainact", f"eval={kind}", "eval.limit=3", "eval.batch_size=2",
                          "eval.mask_from=scored")
        validate(cfg)
        assert (cfg.eval.name, cfg.eval.limit, cfg.eval.mask_from) == (kind, 3, "scored")


def test_calibration_presets_and_ignored_keys(compose_cfg):
    paper = compose_cfg("+criterion=plainact", "calibration=paper")
    assert (paper.calibration.source, paper.calibration.num_fewshot, paper.calibration.limit) == ("tasks", 5, 500)
    assert compose_cfg("+criterion=plainact").calibration.source == "opt_mini"
    with pytest.raises(ConfigError, match="calibration.tasks is read only with calibration.source=tasks"):
        validate(compose_cfg("+criterion=plainact", "calibration.tasks=[piqa]"))
    validate(compose_cfg("+criterion=plainact", "calibration.source=tasks", "calibration.tasks=[piqa]"))


def test_reference_compat_sets_each_of_its_settings_and_yields_to_the_command_line(compose_cfg):
    ours = compose_cfg("+criterion=plainact")
    cfg = compose_cfg("compat=reference", "+criterion=snip")  # group order on the command line does not matter
    assert (cfg.compat, cfg.criterion.name, cfg.criterion.variant) == ("reference", "snip", "reference")
    assert cfg.neuron_sparsity == 0.0 and cfg.dense_first_layer and cfg.eval.mask_from == "scored"
    assert cfg.model.dtype == "float16" and ours.compat == "none" and ours.eval.mask_from == "context"
    mine = compose_cfg("+criterion=plainact", "compat=reference", "model.dtype=float32", "dense_first_layer=false")
    assert mine.model.dtype == "float32" and not mine.dense_first_layer and mine.criterion.variant == "reference"
    validate(mine)
    with pytest.raises(ConfigError, match="criterion.variant='reference' is not one of textbook"):
        validate(compose_cfg("+criterion=jacov", "compat=reference", "model.dtype=float32"))


def test_unknown_criterion(compose_cfg):
    with pytest.raises(ConfigCompositionException, match="criterion"):
        compose_cfg("+criterion=magic")


@pytest.mark.parametrize("override,key", [("sparsity=abc", "sparsity"), ("sparsty=0.5", "sparsty"),
                                          ("eval.limt=3", "limt")])
def test_typos_and_types_fail_at_composition_naming_the_key(compose_cfg, override, key):
    with pytest.raises((ConfigCompositionException, ValidationError), match=key):
        compose_cfg("+criterion=plainact", override)


def test_missing_local_model_path(compose_cfg, tmp_path):
    cfg = compose_cfg("+criterion=plainact", f"model.path={tmp_path}/nothing-here")
    with pytest.raises(ConfigError, match="does not exist; point model.path at"):
        check_model(cfg.model)


def test_hub_model_while_offline(compose_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    cfg = compose_cfg("+criterion=plainact", "model=opt-1.3b")
    with pytest.raises(ConfigError, match="hub is offline .* set model.path to a local directory"):
        check_model(cfg.model)


def test_a_model_of_an_unknown_family(compose_cfg, tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    cfg = compose_cfg("+criterion=plainact", f"model.path={tmp_path}")
    with pytest.raises(ConfigError, match="is a 'gpt2' model, not of a family shadow knows "
                                          "\\(llama, mistral, opt, qwen2, qwen3\\)"):
        check_model(cfg.model)
