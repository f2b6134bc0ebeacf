"""Weights read per token: against the weights that deleting the same units leaves, and per kind of unit."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_llama, make_tiny_opt, request_masks, shape_of
from torch import nn

from shadow.policy import Masks
from shadow.sparse import pruned
from shadow.weights_read import sparsity_meter, unit_reads, weights_read


def step_parameters(model) -> int:
    """What a dense decoding step of the model as it stands reads: every parameter, but one row of each
    embedding table, and the LM head whole."""
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return (sum(p.numel() for p in model.parameters()) - sum(m.weight.numel() - m.weight.shape[1] for m in embeddings)
            + (model.get_output_embeddings().weight.numel() if tied else 0))


@pytest.mark.parametrize("family", ["opt", "llama", "qwen2"])
def test_weights_read_are_what_deleting_the_units_leaves(family):
    """Per request, kept key-value groups and FFN units: the share of the dense step's parameters that remain
    once ``pruned`` deletes the rest (biased projections on OPT and Qwen2, a tied head on OPT)."""
    model = make_tiny_opt() if family == "opt" else make_tiny_llama(family if family == "qwen2" else "llama")
    masks = request_masks(model, seed=3, sparsity=0.5)
    meter = sparsity_meter(model)
    meter.add(masks)
    read = weights_read(model, unit_reads(model, meter.per_layer()))
    with pruned(model, masks, shape_of(model)):
        left = step_parameters(model)
    assert read == pytest.approx(left / step_parameters(model), rel=1e-9)
    assert 0.5 < read < 1


def test_per_token_masks_read_their_mean_and_dense_reads_everything(tiny_opt):
    """Per-token masks read the mean of what each token's mask reads; no masks, the whole step."""
    one, other = request_masks(tiny_opt, seed=1, sparsity=0.25), request_masks(tiny_opt, seed=2, sparsity=0.75)
    each = []
    for masks in (one, other):
        meter = sparsity_meter(tiny_opt)
        meter.add(masks)
        each.append(weights_read(tiny_opt, unit_reads(tiny_opt, meter.per_layer())))
    meter = sparsity_meter(tiny_opt)
    meter.add(Masks(torch.stack([one.heads, other.heads], 1), torch.stack([one.neurons, other.neurons], 1)))
    assert weights_read(tiny_opt, unit_reads(tiny_opt, meter.per_layer())) == pytest.approx(sum(each) / 2)
    assert weights_read(tiny_opt, unit_reads(tiny_opt, sparsity_meter(tiny_opt).per_layer())) == 1.0


def test_query_head_units_read_the_key_value_heads_in_use():
    """With query-head units a key-value head's rows are read when any of its query heads is kept."""
    model = make_tiny_llama(heads=4, kv_heads=2)
    shape = shape_of(model, "query_head")
    heads = torch.zeros(1, shape.layers, 4, dtype=torch.bool)
    heads[0, :, [0, 1]] = True  # both query heads of group 0: one key-value head in use
    heads[0, 1, 1], heads[0, 1, 2] = False, True  # layer 1: one query head in each group: both in use
    neurons = torch.ones(1, shape.layers, shape.neurons, dtype=torch.bool)
    meter = sparsity_meter(model)
    meter.add(Masks(heads, neurons))
    assert meter.per_layer()["kv_head_sparsity"] == [0.5, 0.0, 0.5]
    reads = unit_reads(model, meter.per_layer())
    assert reads["key"] == reads["value"] == [0.5, 1.0, 0.5] and reads["query"] == reads["output"] == [0.5] * 3
