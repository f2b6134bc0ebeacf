"""Composition and validation: every option composes, and bad input fails early naming key, value and fix."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from shadow.config import EVALS, ConfigError, conf_options, validate
from shadow.criteria import CRITERIA
from shadow.models import check_opt


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
    path, config = check_opt(cfg.model)
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
    ("eval.dataset=c4", "eval.dataset='c4' is not one of opt_mini, wikitext2"),
    ("eval.protocols=[token,bytes]", "eval.protocols='bytes' is not one of token, word"),
    ("model.dtype=float16", "model.dtype='float16' is slow and inexact on the CPU"),
    ("model.dtype=int8", "model.dtype='int8' is not one of"),
    ("eval.batch_size=0", "eval.batch_size=0 must be at least 1"),
    ("cache_dir=/proc/shadow-cache", "cache_dir='/proc/shadow-cache' is not writable"),
])
def test_bad_values_fail_with_key_value_and_fix(compose_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg("+criterion=plainact", override))


def test_variant_must_exist_for_the_criterion(compose_cfg):
    validate(compose_cfg("+criterion=plainact", "criterion.variant=reference"))
    with pytest.raises(ConfigError, match="criterion.variant='reference' is not one of textbook"):
        validate(compose_cfg("+criterion=fisher", "criterion.variant=reference"))


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
    with pytest.raises(ConfigError, match="has no config.json; point model.path at"):
        check_opt(cfg.model)


def test_hub_model_while_offline(compose_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    cfg = compose_cfg("+criterion=plainact", "model=opt-1.3b")
    with pytest.raises(ConfigError, match="hub is offline .* set model.path to a local directory"):
        check_opt(cfg.model)


def test_non_opt_model(compose_cfg, tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    cfg = compose_cfg("+criterion=plainact", f"model.path={tmp_path}")
    with pytest.raises(ConfigError, match="is a 'gpt2' model; shadow needs an OPT checkpoint"):
        check_opt(cfg.model)
