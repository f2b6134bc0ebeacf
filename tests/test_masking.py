"""Masks reach the output, equal deleting the same weights, and leave no trace when all ones."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import layers_of, shape_of
from torch import nn

from shadow.masking import apply_masks
from shadow.policy import Masks


def all_kept(model, batch: int) -> Masks:
    s = shape_of(model)
    return Masks(torch.ones(batch, s.layers, s.heads, dtype=torch.bool),
                 torch.ones(batch, s.layers, s.neurons, dtype=torch.bool))


def delete_head(model, layer: int, head: int):
    """A copy of the model without one head: its q/k/v rows and out_proj columns are gone."""
    pruned = copy.deepcopy(model)
    attn = layers_of(pruned)[layer].self_attn
    d = attn.head_dim
    keep = torch.tensor([i for i in range(attn.num_heads * d) if not head * d <= i < (head + 1) * d])
    for name in ("q_proj", "k_proj", "v_proj"):
        old = getattr(attn, name)
        new = nn.Linear(old.in_features, len(keep))
        new.weight.data, new.bias.data = old.weight.data[keep].clone(), old.bias.data[keep].clone()
        setattr(attn, name, new)
    old = attn.out_proj
    new = nn.Linear(len(keep), old.out_features)
    new.weight.data, new.bias.data = old.weight.data[:, keep].clone(), old.bias.data.clone()
    attn.out_proj = new
    attn.num_heads -= 1
    return pruned


def delete_neurons(model, layer: int, neurons: list[int]):
    """A copy of the model without some FFN neurons: their fc1 rows and fc2 columns are gone."""
    pruned = copy.deepcopy(model)
    block = layers_of(pruned)[layer]
    keep = torch.tensor([i for i in range(block.fc1.out_features) if i not in neurons])
    fc1 = nn.Linear(block.fc1.in_features, len(keep))
    fc1.weight.data, fc1.bias.data = block.fc1.weight.data[keep].clone(), block.fc1.bias.data[keep].clone()
    fc2 = nn.Linear(len(keep), block.fc2.out_features)
    fc2.weight.data, fc2.bias.data = block.fc2.weight.data[:, keep].clone(), block.fc2.bias.data.clone()
    block.fc1, block.fc2 = fc1, fc2
    return pruned


@pytest.fixture
def ids():
    return torch.randint(4, 8192, (2, 12), generator=torch.Generator().manual_seed(0))


def test_all_ones_mask_is_bit_identical_to_no_hooks(tiny_opt, ids):
    with torch.no_grad():
        dense = tiny_opt(ids).logits
        with apply_masks(tiny_opt, all_kept(tiny_opt, 2)):
            masked = tiny_opt(ids).logits
    assert torch.equal(dense, masked)


@pytest.mark.parametrize("layer,head", [(0, 0), (1, 2), (2, 3)])
def test_head_mask_equals_deleting_the_head(tiny_opt, ids, layer, head):
    masks = all_kept(tiny_opt, 2)
    masks.heads[:, layer, head] = False
    with torch.no_grad():
        with apply_masks(tiny_opt, masks):
            masked = tiny_opt(ids).logits
        deleted = delete_head(tiny_opt, layer, head)(ids).logits
        dense = tiny_opt(ids).logits
    torch.testing.assert_close(masked, deleted, rtol=1e-5, atol=1e-5)
    assert (masked - dense).abs().max() > 1e-3  # the mask reaches the output


@pytest.mark.parametrize("layer", [0, 2])
def test_neuron_mask_equals_deleting_the_neurons(tiny_opt, ids, layer):
    removed = [0, 5, 17, 31]
    masks = all_kept(tiny_opt, 2)
    masks.neurons[:, layer, removed] = False
    with torch.no_grad():
        with apply_masks(tiny_opt, masks):
            masked = tiny_opt(ids).logits
        deleted = delete_neurons(tiny_opt, layer, removed)(ids).logits
        dense = tiny_opt(ids).logits
    torch.testing.assert_close(masked, deleted, rtol=1e-5, atol=1e-5)
    assert (masked - dense).abs().max() > 1e-3


def test_each_example_gets_its_own_mask(tiny_opt, ids):
    gen = torch.Generator().manual_seed(1)
    masks = all_kept(tiny_opt, 2)
    masks.heads = torch.rand(masks.heads.shape, generator=gen) > 0.5
    masks.neurons = torch.rand(masks.neurons.shape, generator=gen) > 0.5
    with torch.no_grad():
        with apply_masks(tiny_opt, masks):
            together = tiny_opt(ids).logits
        for i in range(2):
            with apply_masks(tiny_opt, Masks(masks.heads[i:i + 1], masks.neurons[i:i + 1])):
                alone = tiny_opt(ids[i:i + 1]).logits
            torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_hooks_are_removed_even_on_error(tiny_opt, ids):
    masks = all_kept(tiny_opt, 2)
    masks.neurons[:] = False
    with pytest.raises(RuntimeError, match="boom"), apply_masks(tiny_opt, masks):
        raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks for m in tiny_opt.modules())


def test_per_token_masks_act_position_by_position(tiny_opt, ids):
    """Equal masks at every position equal a per-request mask; changing the last position's mask changes only
    the last position's output."""
    gen = torch.Generator().manual_seed(2)
    s, T = shape_of(tiny_opt), ids.shape[1]
    request = Masks(torch.rand(2, s.layers, s.heads, generator=gen) > 0.3,
                    torch.rand(2, s.layers, s.neurons, generator=gen) > 0.5)
    tokens = Masks(request.heads[:, None].repeat(1, T, 1, 1), request.neurons[:, None].repeat(1, T, 1, 1))
    with torch.no_grad():
        with apply_masks(tiny_opt, request):
            per_request = tiny_opt(ids).logits
        with apply_masks(tiny_opt, tokens):
            per_token = tiny_opt(ids).logits
        torch.testing.assert_close(per_token, per_request, rtol=1e-6, atol=1e-6)
        tokens.heads[:, -1] = ~tokens.heads[:, -1]
        tokens.neurons[:, -1] = ~tokens.neurons[:, -1]
        with apply_masks(tiny_opt, tokens):
            changed = tiny_opt(ids).logits
    torch.testing.assert_close(changed[:, :-1], per_request[:, :-1], rtol=1e-6, atol=1e-6)
    assert (changed[:, -1] - per_request[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["request", "token", "gate"])
def test_masks_at_some_positions_equal_per_token_masks_keeping_the_rest(tiny_opt, ids, kind):
    """``positions`` (GRIFFIN's order: the prompt whole, the tokens after it masked) equals per-token masks that keep
    every unit elsewhere; per request, per token, and for float gates."""
    gen = torch.Generator().manual_seed(3)
    s, T = shape_of(tiny_opt), ids.shape[1]
    masks = Masks(torch.rand(2, s.layers, s.heads, generator=gen) > 0.3,
                  torch.rand(2, s.layers, s.neurons, generator=gen) > 0.5)
    per_token = Masks(masks.heads[:, None].repeat(1, T, 1, 1), masks.neurons[:, None].repeat(1, T, 1, 1))
    if kind == "token":
        masks = per_token = Masks(torch.rand(2, T, s.layers, s.heads, generator=gen) > 0.3,
                                  torch.rand(2, T, s.layers, s.neurons, generator=gen) > 0.5)
    positions = torch.arange(T) >= torch.tensor([[4], [9]])  # each request's own context length
    if kind == "gate":
        masks = Masks(masks.heads.float(), masks.neurons.float())
    whole = Masks(per_token.heads | ~positions[..., None, None], per_token.neurons | ~positions[..., None, None])
    with torch.no_grad():
        with apply_masks(tiny_opt, masks, positions):
            got = tiny_opt(ids).logits
        with apply_masks(tiny_opt, whole):
            want = tiny_opt(ids).logits
        dense = tiny_opt(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[0, :4], dense[0, :4], rtol=1e-6, atol=1e-6)  # the context runs whole
    assert (got[0, 4:] - dense[0, 4:]).abs().max() > 1e-3
