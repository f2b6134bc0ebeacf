"""The model-family seam: each family's facts against the model itself, and the models' module names kept inside
the families' files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_llama, make_tiny_opt

from shadow.arch import architecture_config, architectures, family_of
from shadow.errors import ConfigError

SHADOW = Path(__file__).resolve().parent.parent / "shadow"
MODULE_NAMES = re.compile(r"\b(fc1|fc2|out_proj|[qko]_proj|(gate|up|down)_proj|embed_positions|project_in|"
                          r"project_out|ffn_dim|intermediate_size|do_layer_norm_before|self_attn|final_layer_norm|"
                          r"input_layernorm|post_attention_layernorm|rotary_emb)\b|model\.(decoder|layers)")
BUILDERS = ("opt_mini", "llama_mini")  # they build the models themselves


def test_model_module_names_appear_only_in_the_families():
    outside = [f"{path.relative_to(SHADOW)}:{number}: {line.strip()}"
               for path in SHADOW.rglob("*.py") if path.parent.name not in ("arch", *BUILDERS)
               for number, line in enumerate(path.read_text().splitlines(), 1) if MODULE_NAMES.search(line)]
    assert outside == []


@pytest.mark.parametrize("like_350m", [False, True], ids=["pre-norm", "opt-350m-shaped"])
def test_opt_parameter_count_is_exact(like_350m):
    model = make_tiny_opt(like_350m=like_350m)
    assert family_of(model.config).parameter_count(model.config) == sum(p.numel() for p in model.parameters())


def test_opt_shape_and_roles_match_the_model():
    model = make_tiny_opt(layers=3, heads=4, hidden=16, ffn=32)
    family = family_of(model.config)
    shape = family.shape(model.config, "kv_group")
    assert (shape.layers, shape.heads, shape.kv_heads, shape.head_dim, shape.neurons) == (3, 4, 4, 4, 32)
    layer = family.layers(model)[1]
    width = shape.heads * shape.head_dim
    for role in family.query_rows + family.kv_rows:
        assert family.module(layer, role).out_features == width
    for role in family.head_columns:
        assert family.module(layer, role).in_features == width
    for role in family.neuron_rows:
        assert family.module(layer, role).out_features == shape.neurons
    for role in family.neuron_columns:
        assert family.module(layer, role).in_features == shape.neurons
    assert family.head_output(layer) is layer.self_attn.out_proj and family.ffn_output(layer) is layer.fc2
    assert family.scaling(layer) == shape.head_dim ** -0.5


@pytest.mark.parametrize("family_name", ["opt", "llama"])
def test_the_activation_is_the_models_own(family_name):
    model = make_tiny_opt() if family_name == "opt" else make_tiny_llama()
    family = family_of(model.config)
    layer = family.layers(model)[0]
    own = layer.activation_fn if family_name == "opt" else layer.mlp.act_fn
    u = torch.linspace(-2, 2, 41, requires_grad=True)
    (slope,) = torch.autograd.grad(own(u).sum(), u)
    activation = family.activation(model.config)
    assert torch.equal(activation(u), own(u)) and torch.equal(activation.derivative(u), slope)
    if family_name == "opt":
        assert torch.equal(activation.derivative(u), (u > 0).float())  # ReLU's: 1[u > 0], 0 at 0


def test_released_architectures_build_the_configs_they_name():
    assert "opt-1.3b" in architectures()
    config = architecture_config("opt-1.3b")
    shape = family_of(config).shape(config, "kv_group")
    assert (shape.layers, shape.heads, shape.neurons) == (24, 32, 8192)
    assert 1.2e9 < family_of(config).parameter_count(config) < 1.4e9


def test_an_unknown_family_is_a_one_line_error():
    from transformers import GPT2Config

    with pytest.raises(ConfigError, match=r"model_type='gpt2' is not of a family shadow knows \(llama, mistral, opt, "
                                          r"qwen2, qwen3\); use a model "
                                          r"of one of them, or add the family \(docs/extending.md\)$"):
        family_of(GPT2Config())


def test_gemma_is_refused_with_what_is_missing():
    from transformers import GemmaConfig

    with pytest.raises(ConfigError, match=r"model_type='gemma' is not supported: Gemma scales its embeddings by "
                                          r"√hidden_size, which shadow's llama family does not model; use a Llama, "
                                          r"Mistral or Qwen model$"):
        family_of(GemmaConfig())


LLAMA_LAYOUTS = {"llama-gqa": ("llama", 2, {}), "llama-mha": ("llama", 4, {}),
                 "llama-biased": ("llama", 2, {"attention_bias": True, "mlp_bias": True}),
                 "mistral": ("mistral", 1, {}), "qwen2": ("qwen2", 2, {}), "qwen3": ("qwen3", 2, {"head_dim": 8})}


@pytest.mark.parametrize("layout", LLAMA_LAYOUTS)
def test_llama_family_parameter_count_shape_and_roles_match_the_model(layout):
    model_type, kv_heads, fields = LLAMA_LAYOUTS[layout]
    model = make_tiny_llama(model_type, kv_heads=kv_heads, **fields)
    family = family_of(model.config)
    assert family.parameter_count(model.config) == sum(p.numel() for p in model.parameters())
    shape = family.shape(model.config, "query_head")
    head_dim = fields.get("head_dim", 8)
    assert (shape.layers, shape.query_heads, shape.kv_heads, shape.head_dim, shape.neurons) == (3, 4, kv_heads,
                                                                                                 head_dim, 48)
    assert (shape.heads, family.shape(model.config, "kv_group").heads) == (4, kv_heads)
    layer = family.layers(model)[2]
    for role in family.query_rows:
        assert family.module(layer, role).out_features == shape.query_heads * head_dim
    for role in family.kv_rows:
        assert family.module(layer, role).out_features == kv_heads * head_dim
    assert family.head_output(layer).in_features == shape.attention_width
    assert [family.module(layer, role).out_features for role in family.neuron_rows] == [48, 48]
    assert family.ffn_output(layer) is layer.mlp.down_proj and family.ffn_input(layer) is layer.mlp.gate_proj
    assert family.gated and family.rotary and family.scaling(layer) == head_dim ** -0.5


@pytest.mark.parametrize("name, billions", [("llama-3.2-1b", 1.236), ("llama-3.1-8b", 8.030), ("llama-2-7b", 6.738),
                                            ("mistral-7b", 7.248), ("qwen2.5-7b", 7.616), ("qwen3-8b", 8.191)])
def test_released_llama_family_sizes_count_their_published_parameters(name, billions):
    config = architecture_config(name)
    assert family_of(config).parameter_count(config) / 1e9 == pytest.approx(billions, abs=5e-4)


def test_the_llama_mini_architecture_is_the_embedded_model():
    """The latency benchmark's random-weight llama-mini has the embedded model's shape."""
    from transformers import AutoConfig

    import shadow

    embedded = AutoConfig.from_pretrained(Path(shadow.__file__).parent / "llama_mini" / "model")
    built = architecture_config("llama-mini")
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "vocab_size", "tie_word_embeddings", "max_position_embeddings", "rope_parameters")
    assert {f: getattr(built, f) for f in fields} == {f: getattr(embedded, f) for f in fields}
    assert family_of(built).parameter_count(built) == family_of(embedded).parameter_count(embedded)
