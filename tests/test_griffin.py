"""GRIFFIN's per-request masks: its statistic against a direct computation, the masks against deleting the
weights they skip, attention dense unless asked, and generation through RequestDecoder equal to the masked
model."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    griffin_decode_and_check,
    layers_of,
    make_tiny_llama,
    make_tiny_opt,
    masked_and_pruned_logits,
    request_decode_and_check,
    shape_of,
    tiny_models,
    use_triton_kernels,
)

from shadow.arch import family_of
from shadow.compose import compose_config
from shadow.evaluate.requests import Request
from shadow.policy import Policy
from shadow.predictors import GriffinMasks

FAMILIES = {"opt": make_tiny_opt, "llama": make_tiny_llama}


def direct_statistics(model, ids: torch.Tensor, attention_unit: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The flocking statistic written out: each token's down-projection (and output-projection) input divided by
    its norm, then each unit's columns' norm over the tokens."""
    family, shape = family_of(model.config), shape_of(model, attention_unit)
    inputs = {}
    handles = [family.module(layer, role).register_forward_pre_hook(
        lambda m, args, key=(role, i): inputs.__setitem__(key, args[0].reshape(*ids.shape, -1)))
        for i, layer in enumerate(layers_of(model)) for role in ("output", "down")]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    heads, neurons = [], []
    for i in range(shape.layers):
        for role, out, units in (("output", heads, shape.heads), ("down", neurons, shape.neurons)):
            z = inputs[role, i]
            z = z / z.norm(dim=-1, keepdim=True)
            width = z.shape[-1] // units
            out.append(torch.stack([z[..., u * width:(u + 1) * width].pow(2).sum((1, 2)).sqrt() for u in range(units)],
                                   -1))
    return torch.stack(heads, 1), torch.stack(neurons, 1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention_unit", ["kv_group", "query_head"])
def test_the_statistic_is_each_units_norm_over_the_prompts_normalised_tokens(family, attention_unit):
    model = FAMILIES[family]()
    ids = torch.randint(4, 8192, (2, 7), generator=torch.Generator().manual_seed(0))
    masks = GriffinMasks(model, shape_of(model, attention_unit), Policy("local", 0.0, 0.5), 1)
    got = masks.statistics(ids, torch.ones_like(ids))
    for g, want in zip(got, direct_statistics(model, ids, attention_unit), strict=True):
        torch.testing.assert_close(g, want)
    padded = torch.cat([ids[:1, :5], torch.full((1, 2), 1)], 1)  # padding counts nowhere
    torch.testing.assert_close(masks.statistics(padded, (padded != 1).long()),
                               direct_statistics(model, ids[:1, :5], attention_unit))


@pytest.mark.parametrize("family", FAMILIES)
def test_griffin_keeps_each_layers_top_units_from_the_prompt_and_equals_deleting_the_rest(family):
    model = FAMILIES[family]()
    shape = shape_of(model)
    prompt = torch.randint(4, 8192, (1, 8), generator=torch.Generator().manual_seed(1))
    griffin = GriffinMasks(model, shape, Policy("local", 0.0, 0.5), 1)
    masks = griffin([Request(prompt[0].tolist() + [5], 1, prompt[0].tolist())])  # the scored token unseen
    _, neurons = griffin.statistics(prompt, torch.ones_like(prompt))
    assert masks.heads.all() and (masks.neurons.sum(-1) == shape.neurons // 2).all()
    kept_stat = torch.where(masks.neurons, neurons, torch.inf).amin(-1)
    dropped_stat = torch.where(masks.neurons, -torch.inf, neurons).amax(-1)
    assert (kept_stat >= dropped_stat).all()  # the largest statistics, in every layer
    masked, deleted = masked_and_pruned_logits(model, masks, prompt)
    torch.testing.assert_close(masked, deleted)


def test_attention_is_dense_unless_head_sparsity_is_set():
    plain = compose_config("+criterion=plainact", "predictor=griffin", "policy=local", "sparsity=0.5")
    assert Policy.configured(plain, False, dense_attention=True).head_sparsity == 0.0
    asked = compose_config("+criterion=plainact", "predictor=griffin", "policy=local", "sparsity=0.5",
                           "head_sparsity=0.25")
    policy = Policy.configured(asked, False, dense_attention=True)
    assert (policy.head_sparsity, policy.neuron_sparsity) == (0.25, 0.5)


@pytest.mark.parametrize("family", list(tiny_models()))
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_generation_on_griffins_units_equals_the_masked_model(family, backend, monkeypatch):
    if backend == "triton":
        use_triton_kernels(monkeypatch)
    model = tiny_models()[family]()

    def griffin(ids: torch.Tensor):
        shape = shape_of(model)
        masks = GriffinMasks(model, shape, Policy("local", 0.5, 0.5), 1)
        return masks.policy.select(*masks.statistics(ids, torch.ones_like(ids)))

    request_decode_and_check(model, batch=2, masks_of=griffin)


@pytest.mark.parametrize("family", list(tiny_models()))
def test_griffins_generation_chooses_its_units_in_the_dense_prompt_pass_and_runs_the_new_tokens_on_them(family):
    griffin_decode_and_check(tiny_models()[family]())
