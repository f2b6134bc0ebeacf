"""The model-family seam: the OPT family's facts against the model itself, and OPT's module names kept inside
the family's file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_opt

from shadow.arch import architecture_config, architectures, family_of
from shadow.config import ConfigError

SHADOW = Path(__file__).resolve().parent.parent / "shadow"
OPT_NAMES = re.compile(r"\b(fc1|fc2|out_proj|[qkv]_proj|embed_positions|project_in|project_out|ffn_dim|"
                       r"do_layer_norm_before|self_attn|final_layer_norm)\b|model\.decoder")


def test_opt_module_names_appear_only_in_the_opt_family():
    outside = [f"{path.relative_to(SHADOW)}:{number}: {line.strip()}"
               for path in SHADOW.rglob("*.py") if path.parent.name != "opt_mini" and path.name != "opt.py"
               for number, line in enumerate(path.read_text().splitlines(), 1) if OPT_NAMES.search(line)]
    assert outside == []


@pytest.mark.parametrize("like_350m", [False, True], ids=["pre-norm", "opt-350m-shaped"])
def test_opt_parameter_count_is_exact(like_350m):
    model = make_tiny_opt(like_350m=like_350m)
    assert family_of(model.config).parameter_count(model.config) == sum(p.numel() for p in model.parameters())


def test_opt_shape_and_roles_match_the_model():
    model = make_tiny_opt(layers=3, heads=4, hidden=16, ffn=32)
    family = family_of(model.config)
    shape = family.shape(model.config)
    assert (shape.layers, shape.heads, shape.kv_heads, shape.head_dim, shape.neurons) == (3, 4, 4, 4, 32)
    layer = family.layers(model)[1]
    width = shape.heads * shape.head_dim
    for role in family.head_rows:
        assert family.module(layer, role).out_features == width
    for role in family.head_columns:
        assert family.module(layer, role).in_features == width
    for role in family.neuron_rows:
        assert family.module(layer, role).out_features == shape.neurons
    for role in family.neuron_columns:
        assert family.module(layer, role).in_features == shape.neurons
    assert family.head_output(layer) is layer.self_attn.out_proj and family.ffn_output(layer) is layer.fc2
    assert family.head_count(layer) == shape.heads and family.scaling(layer) == shape.head_dim ** -0.5


def test_opt_activation_facts_hold_for_its_activation():
    model = make_tiny_opt()
    family = family_of(model.config)
    u = torch.linspace(-2, 2, 41)
    z = family.layers(model)[0].activation_fn(u)
    assert family.activation.zero_below and z[u <= 0].eq(0).all() and z[u > 0].gt(0).all()
    assert torch.equal(family.activation.slope(z), (u > 0).float())


def test_released_architectures_build_the_configs_they_name():
    assert "opt-1.3b" in architectures()
    config = architecture_config("opt-1.3b")
    shape = family_of(config).shape(config)
    assert (shape.layers, shape.heads, shape.neurons) == (24, 32, 8192)
    assert 1.2e9 < family_of(config).parameter_count(config) < 1.4e9


def test_an_unknown_family_is_a_one_line_error():
    from transformers import GPT2Config

    with pytest.raises(ConfigError, match=r"model_type='gpt2' is not of a family shadow knows \(opt\); use a model "
                                          r"of one of them, or add the family \(docs/extending.md\)$"):
        family_of(GPT2Config())
