"""Top-(1 − sparsity) selection: global, local, hybrid, and a dense first layer."""

from __future__ import annotations

import pytest
import torch

from shadow.errors import ConfigError
from shadow.policy import Policy, keep_top

SCORES = torch.tensor([[[9.0, 8.0, 7.0, 6.0], [1.0, 2.0, 0.5, 0.1]]])  # layer 0 dominates


def test_global_local_and_hybrid_on_a_dominant_layer():
    assert keep_top(SCORES, 0.5, "global").tolist() == [[[True] * 4, [False] * 4]]
    assert keep_top(SCORES, 0.5, "local").tolist() == [[[True, True, False, False], [True, True, False, False]]]
    # hybrid: one unit per layer reserved, the rest globally
    assert keep_top(SCORES, 0.5, "hybrid", minimum=1).tolist() == [[[True, True, True, False],
                                                                    [False, True, False, False]]]


@pytest.mark.parametrize("policy", ["global", "local", "hybrid"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7])
def test_kept_fraction_matches_sparsity(policy, sparsity):
    scores = torch.rand(3, 4, 64, generator=torch.Generator().manual_seed(0))
    mask = keep_top(scores, sparsity, policy, minimum=4)
    if policy == "local":
        assert (mask.sum(2) == round((1 - sparsity) * 64)).all()
    else:
        assert (mask.flatten(1).sum(1) == round((1 - sparsity) * 256)).all()
    if policy == "hybrid":
        assert (mask.sum(2) >= 4).all()
    if policy == "global" and sparsity > 0:  # every kept unit outscores every dropped one
        for b in range(3):
            assert scores[b][mask[b]].min() >= scores[b][~mask[b]].max()


def test_select_reports_achieved_sparsity():
    masks = Policy("local", 0.5, 0.25).select(torch.rand(2, 3, 4), torch.rand(2, 3, 8))
    assert masks.sparsity() == pytest.approx({"head_sparsity": 0.5, "neuron_sparsity": 0.25})
    heads, neurons, count = masks.kept_per_layer()
    assert heads.tolist() == [1.0, 1.0, 1.0] and neurons.tolist() == [1.5, 1.5, 1.5] and count == 2  # summed


def test_dense_first_layer_keeps_layer_zero_whole():
    masks = Policy("global", 0.5, 0.5, dense_first_layer=True).select(torch.rand(2, 3, 4), torch.rand(2, 3, 8))
    assert masks.heads[:, 0].all() and masks.neurons[:, 0].all()
    assert masks.heads[:, 1:].float().mean() == 0.5 and masks.neurons[:, 1:].float().mean() == 0.5


def test_policies_that_cannot_be_met_fail_early():
    Policy("global", 0.9, 0.99).check(layers=4, heads=4, neurons=16)
    with pytest.raises(ConfigError, match="head_sparsity=0.9 keeps no unit"):
        Policy("local", 0.9, 0.5).check(layers=4, heads=4, neurons=16)
    with pytest.raises(ConfigError, match="min_neurons=8 per layer needs 32 neurons but neuron_sparsity=0.9 keeps 6"):
        Policy("hybrid", 0.5, 0.9, min_heads=1, min_neurons=8).check(layers=4, heads=4, neurons=16)


def test_per_token_scores_give_one_mask_per_position():
    scores = torch.rand(2, 5, 3, 8, generator=torch.Generator().manual_seed(0))  # (B, T, L, U)
    masks = Policy("local", 0.5, 0.25).select(scores[..., :4], scores)
    assert masks.heads.shape == (2, 5, 3, 4) and masks.neurons.shape == (2, 5, 3, 8)
    assert (masks.heads.sum(-1) == 2).all() and (masks.neurons.sum(-1) == 6).all()
    assert torch.equal(masks.neurons[1, 3], keep_top(scores[1, 3][None], 0.25, "local")[0])
    assert masks.kept_per_layer()[2] == 10
