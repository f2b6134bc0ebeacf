"""Top-(1 − sparsity) selection, globally and per layer."""

from __future__ import annotations

import pytest
import torch

from shadow.config import ConfigError
from shadow.policy import check_policy, keep_top, select


def test_global_keeps_the_top_units_across_layers():
    scores = torch.tensor([[[9.0, 8.0], [1.0, 2.0]]])  # layer 0 dominates
    assert keep_top(scores, 0.5, "global").tolist() == [[[True, True], [False, False]]]
    assert keep_top(scores, 0.5, "local").tolist() == [[[True, False], [False, True]]]


@pytest.mark.parametrize("policy", ["global", "local"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7])
def test_kept_fraction_matches_sparsity(policy, sparsity):
    scores = torch.rand(3, 4, 64, generator=torch.Generator().manual_seed(0))
    mask = keep_top(scores, sparsity, policy)
    if policy == "global":
        assert (mask.flatten(1).sum(1) == round((1 - sparsity) * 256)).all()
    else:
        assert (mask.sum(2) == round((1 - sparsity) * 64)).all()
    if policy == "global" and sparsity > 0:  # every kept unit outscores every dropped one
        for b in range(3):
            assert scores[b][mask[b]].min() >= scores[b][~mask[b]].max()


def test_select_reports_achieved_sparsity():
    masks = select(torch.rand(2, 3, 4), torch.rand(2, 3, 8), 0.5, 0.25, "local")
    assert masks.sparsity() == pytest.approx({"head_sparsity": 0.5, "neuron_sparsity": 0.25})


def test_local_policy_must_keep_a_unit_per_layer():
    check_policy("global", 4, 16, 0.9, 0.99)
    with pytest.raises(ConfigError, match="head_sparsity=0.9 keeps no unit"):
        check_policy("local", 4, 16, 0.9, 0.5)
