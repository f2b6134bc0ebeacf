"""The llama family on tiny random models of each layout (grouped-query or not, Qwen2's biases, Qwen3's head norms,
Mistral's single key-value head): masks equal deleting the same weights, and sparse execution, per request and per
token, equals the masked model, in both attention units."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    decode_and_check,
    layers_of,
    make_tiny_llama,
    masked_and_pruned_logits,
    request_masks,
    shape_of,
    token_predictor,
    use_triton_kernels,
)
from torch import nn

from shadow.masking import apply_masks
from shadow.policy import Masks, Policy
from shadow.sparse import TokenDecoder, pruned

LAYOUTS = {"gqa": ("llama", 2, {}), "mha": ("llama", 4, {}), "qwen2-biases": ("qwen2", 2, {}),
           "qwen3-head-norms": ("qwen3", 2, {"head_dim": 8}), "mistral-one-kv-head": ("mistral", 1, {})}
UNITS = ["kv_group", "query_head"]
CLOSE = {"rtol": 1e-4, "atol": 1e-4}  # float32 rounding in a different summation order; logits reach about 9


def tiny(layout: str, **kwargs):
    model_type, kv_heads, fields = LAYOUTS[layout]
    return make_tiny_llama(model_type, kv_heads=kv_heads, **fields, **kwargs)


@pytest.fixture(params=list(LAYOUTS))
def model(request):
    return tiny(request.param)


def ids_of(seed: int, length: int = 12, batch: int = 1) -> torch.Tensor:
    return torch.randint(4, 8192, (batch, length), generator=torch.Generator().manual_seed(seed))


def only(model, attention_unit: str, layer: int, head: int | None = None, neurons: list[int] = ()) -> Masks:
    """Everything kept but one attention unit and some FFN units of one layer."""
    s = shape_of(model, attention_unit)
    masks = Masks(torch.ones(1, s.layers, s.heads, dtype=torch.bool), torch.ones(1, s.layers, s.neurons,
                                                                                 dtype=torch.bool))
    if head is not None:
        masks.heads[0, layer, head] = False
    masks.neurons[0, layer, list(neurons)] = False
    return masks


def linear(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    new.weight.data = weight.clone()
    if bias is not None:
        new.bias.data = bias.clone()
    return new


def delete_group(model, layer: int, group: int):
    """A copy without one key-value group: its query heads' q rows and o_proj columns, its k and v rows."""
    out = copy.deepcopy(model)
    attn = layers_of(out)[layer].self_attn
    s = shape_of(model, "kv_group")
    d, per = s.head_dim, s.group_size
    q_keep = torch.tensor([i for i in range(s.query_heads * d) if not group * per * d <= i < (group + 1) * per * d])
    kv_keep = torch.tensor([i for i in range(s.kv_heads * d) if not group * d <= i < (group + 1) * d])
    for name, keep in (("q_proj", q_keep), ("k_proj", kv_keep), ("v_proj", kv_keep)):
        old = getattr(attn, name)
        setattr(attn, name, linear(old, old.weight.data[keep], None if old.bias is None else old.bias.data[keep]))
    attn.o_proj = linear(attn.o_proj, attn.o_proj.weight.data[:, q_keep], attn.o_proj.bias)
    return out


def delete_neurons(model, layer: int, neurons: list[int]):
    """A copy without some FFN units: their gate and up rows and down columns."""
    out = copy.deepcopy(model)
    mlp = layers_of(out)[layer].mlp
    keep = torch.tensor([i for i in range(mlp.up_proj.out_features) if i not in neurons])
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        setattr(mlp, name, linear(old, old.weight.data[keep], None if old.bias is None else old.bias.data[keep]))
    mlp.down_proj = linear(mlp.down_proj, mlp.down_proj.weight.data[:, keep], mlp.down_proj.bias)
    return out


@pytest.mark.parametrize("layer, group", [(0, 0), (2, 1)])
def test_a_kv_group_mask_equals_deleting_the_group(layer, group):
    model = tiny("gqa")
    with torch.no_grad(), apply_masks(model, only(model, "kv_group", layer, group)):
        masked = model(ids_of(0)).logits
    deleted = delete_group(model, layer, group)
    with torch.no_grad():
        torch.testing.assert_close(masked, deleted(ids_of(0)).logits, **CLOSE)
        assert not torch.allclose(masked, model(ids_of(0)).logits)


def test_a_query_head_mask_equals_deleting_its_output_columns():
    """A query head reaches the output only through its columns of o_proj."""
    model = tiny("gqa")
    d = shape_of(model).head_dim
    with torch.no_grad(), apply_masks(model, only(model, "query_head", 1, 3)):
        masked = model(ids_of(1)).logits
    deleted = copy.deepcopy(model)
    layers_of(deleted)[1].self_attn.o_proj.weight.data[:, 3 * d:4 * d] = 0
    with torch.no_grad():
        torch.testing.assert_close(masked, deleted(ids_of(1)).logits, **CLOSE)
        assert not torch.allclose(masked, model(ids_of(1)).logits)


def test_an_ffn_unit_mask_equals_deleting_its_gate_up_and_down_weights():
    model = tiny("qwen2-biases")
    with torch.no_grad(), apply_masks(model, only(model, "kv_group", 2, neurons=[0, 5, 47])):
        masked = model(ids_of(2)).logits
    with torch.no_grad():
        torch.testing.assert_close(masked, delete_neurons(model, 2, [0, 5, 47])(ids_of(2)).logits, **CLOSE)


@pytest.mark.parametrize("attention_unit", UNITS)
@pytest.mark.parametrize("seed", [0, 1])
def test_pruned_forward_equals_masked_forward(model, attention_unit, seed):
    masks = request_masks(model, seed, attention_unit=attention_unit)
    masks.heads[0, 1] = False  # a layer with nothing kept
    masked, sparse = masked_and_pruned_logits(model, masks, ids_of(seed, 20), attention_unit)
    torch.testing.assert_close(sparse, masked, **CLOSE)
    with torch.no_grad():
        assert not torch.allclose(model(ids_of(seed, 20)).logits, masked)


def test_pruned_keeps_only_the_kept_groups_weights():
    model = tiny("gqa")
    s = shape_of(model, "kv_group")
    masks = Masks(torch.tensor([[[True, False], [False, True], [True, True]]]),
                  torch.ones(1, s.layers, s.neurons, dtype=torch.bool))
    masks.neurons[0, :, :12] = False
    with pruned(model, masks, s):
        attn, mlp = layers_of(model)[0].self_attn, layers_of(model)[0].mlp
        assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (16, 8, 16)
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 36
    assert layers_of(model)[0].self_attn.k_proj.out_features == 16


@pytest.mark.parametrize("attention_unit", UNITS)
def test_generation_with_the_kv_cache_equals_masked_generation(attention_unit):
    model = tiny("qwen3-head-norms")
    masks = request_masks(model, 4, attention_unit=attention_unit)
    settings = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 1}
    with torch.no_grad():
        with apply_masks(model, masks):
            masked = model.generate(ids_of(4, 10), **settings)
        with pruned(model, masks, shape_of(model, attention_unit)):
            sparse = model.generate(ids_of(4, 10), **settings)
    assert torch.equal(sparse, masked)


@pytest.mark.parametrize("attention_unit", UNITS)
def test_shadow_per_token_decoding_equals_the_masked_model(model, attention_unit):
    predictor = token_predictor(model, "shadow", attention_unit=attention_unit)
    out, _ = decode_and_check(model, predictor, Policy("global", 0.5, 0.5))
    assert out.masks.heads.shape[-1] == shape_of(model, attention_unit).heads


def test_a_kv_group_that_returns_after_being_skipped_catches_up(monkeypatch, gather):
    """Group 0 of every layer is kept at one step and skipped at the next: each time it returns, its keys and
    values at the skipped positions are computed late, from the cached attention inputs, as the masked model has
    them."""
    model = tiny("gqa")
    predictor = token_predictor(model, "shadow")
    steps, predict = iter(range(100)), predictor.group_scores

    def alternating(group, feature):
        heads, neurons = predict(group, feature)
        heads[..., 0] += 1e3 * (-1) ** next(steps)
        return heads, neurons

    monkeypatch.setattr(predictor, "group_scores", alternating)
    out, _ = decode_and_check(model, predictor, Policy("local", 0.5, 0.5))
    assert out.masks.heads[::2, :, 0].all() and not out.masks.heads[1::2, :, 0].any()


@pytest.mark.parametrize("attention_unit", UNITS)
def test_dejavu_per_token_decoding_equals_the_masked_model(attention_unit):
    model = tiny("gqa")
    decode_and_check(model, token_predictor(model, "dejavu", True, attention_unit), Policy("local", 0.5, 0.5))


@pytest.mark.parametrize("attention_unit", UNITS)
@pytest.mark.parametrize("placement,policy", [("shadow", "global"), ("dejavu", "local")])
def test_a_batch_decodes_as_the_masked_model_under_its_union_mask(attention_unit, placement, policy):
    model = tiny("gqa")
    predictor = token_predictor(model, placement, placement == "dejavu", attention_unit)
    out, _ = decode_and_check(model, predictor, Policy(policy, 0.5, 0.5), batch=3)
    assert out.masks.heads.float().mean() > 0.5  # the union keeps more than one request's half


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_half_precision_per_token_decoding_equals_the_masked_model(dtype, backend, monkeypatch):
    if backend == "triton":  # in Triton's interpreter, as on CUDA: kernels that round on their own
        use_triton_kernels(monkeypatch)
    model = tiny("qwen2-biases", dtype=dtype)
    decode_and_check(model, token_predictor(model, "shadow"), Policy("global", 0.5, 0.5))


def test_per_token_decoding_stops_at_a_sliding_window():
    model = tiny("mistral-one-kv-head", sliding_window=12)
    with pytest.raises(ValueError, match="reach position 13, past the 12-token sliding window"):
        TokenDecoder(model, token_predictor(model, "shadow"), Policy("global", 0.5, 0.5)).generate(ids_of(5, 9), 6)
