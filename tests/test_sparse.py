"""Sparse execution equals the masked model: one forward, and generation with its KV cache."""

from __future__ import annotations

import pytest
import torch

from shadow.masking import apply_masks
from shadow.models import Shape
from shadow.policy import Masks, Policy
from shadow.sparse import pruned


def request_masks(model, seed: int, sparsity: float = 0.5) -> Masks:
    s = Shape.of(model.config)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(1, s.layers, s.heads, generator=gen), torch.rand(1, s.layers, s.neurons, generator=gen)
    return Policy("local", sparsity, sparsity).select(*scores)


@pytest.mark.parametrize("seed", [0, 1])
def test_pruned_forward_equals_masked_forward(tiny_opt, seed):
    ids = torch.randint(4, 8192, (1, 20), generator=torch.Generator().manual_seed(seed))
    masks = request_masks(tiny_opt, seed)
    with torch.no_grad():
        with apply_masks(tiny_opt, masks):
            masked = tiny_opt(ids).logits
        with pruned(tiny_opt, masks):
            sparse = tiny_opt(ids).logits
            assert tiny_opt.model.decoder.layers[0].fc1.out_features == 16  # half of the 32 neurons
        restored = tiny_opt(ids).logits
    torch.testing.assert_close(sparse, masked, rtol=1e-5, atol=1e-5)
    assert tiny_opt.model.decoder.layers[0].fc1.out_features == 32
    assert not torch.allclose(restored, masked)


def test_a_layer_without_heads_still_runs(tiny_opt):
    ids = torch.randint(4, 8192, (1, 12), generator=torch.Generator().manual_seed(3))
    masks = request_masks(tiny_opt, 3)
    masks.heads[0, 1] = False  # a global policy can empty a layer
    with torch.no_grad():
        with apply_masks(tiny_opt, masks):
            masked = tiny_opt(ids).logits
        with pruned(tiny_opt, masks):
            sparse = tiny_opt(ids).logits
    torch.testing.assert_close(sparse, masked, rtol=1e-5, atol=1e-5)


def test_generation_with_the_kv_cache_equals_masked_generation(tiny_opt):
    ids = torch.randint(4, 8192, (1, 10), generator=torch.Generator().manual_seed(4))
    masks = request_masks(tiny_opt, 4)
    settings = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 1}
    with torch.no_grad():
        with apply_masks(tiny_opt, masks):
            masked = tiny_opt.generate(ids, **settings)
        with pruned(tiny_opt, masks):
            sparse = tiny_opt.generate(ids, **settings)
    assert torch.equal(sparse, masked)


def test_pruned_takes_one_request():
    batch_of_two = Masks(torch.ones(2, 3, 4, dtype=torch.bool), torch.ones(2, 3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="one request's masks"), pruned(torch.nn.Module(), batch_of_two):
        pass
