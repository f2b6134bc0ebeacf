"""TEAL and CATS: thresholds calibrated to the asked share, applied where each method applies them (checked against
deleting the weights they skip), and their jobs."""

from __future__ import annotations

import pytest
import torch
from helpers import calibration_examples, layers_of, make_tiny_llama, make_tiny_opt

from shadow.arch import family_of
from shadow.thresholds import GREEDY_STEP, calibrate, greedy_shares, sites, thresholded

FAMILIES = {"opt": make_tiny_opt, "llama": make_tiny_llama}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["teal", "cats"])
@pytest.mark.parametrize("share", [0.55, 0.8])  # above the zeros ReLU makes on OPT (CATS zeroes those first)
def test_thresholds_zero_the_asked_share_of_the_calibration_activations(family, method, share):
    """Layer 0's first site sees the dense model's activations (nothing before it is thresholded): the share it
    zeroes on the calibration set is the asked one, to the histograms' resolution. Later sites see sparser inputs
    and land near it."""
    model = FAMILIES[family]()
    data = calibration_examples()
    found = sites(model, method)
    limits = calibrate(model, data, method, 4, 1).thresholds([share] * len(found))
    assert limits.shape == (len(found), len(layers_of(model))) and (limits > 0).all()
    with torch.no_grad(), thresholded(model, method, limits) as kept:
        model(torch.tensor([e.input_ids for e in data]))
    zeroed = 1 - kept.shares()
    assert zeroed[0, 0].item() == pytest.approx(share, abs=0.01)
    assert ((zeroed - share).abs() < 0.2).all(), zeroed


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["teal", "cats"])
def test_a_site_thresholded_whole_is_its_weights_deleted(family, method):
    """A threshold above every activation at one site, none elsewhere: the model equals the one whose weights
    that site's zeroed entries multiply are deleted (TEAL: the projections reading the site; CATS: the down
    projection, whose input the activation's zeros zero)."""
    model = FAMILIES[family]()
    fam = family_of(model.config)
    ids = torch.randint(4, 8192, (2, 9), generator=torch.Generator().manual_seed(2))
    for s, site in enumerate(sites(model, method)):
        limits = torch.zeros(len(sites(model, method)), len(layers_of(model)))
        limits[s] = float("inf")
        with torch.no_grad(), thresholded(model, method, limits) as kept:
            got = model(ids).logits
        assert (kept.shares()[s] == 0).all() and (kept.shares()[torch.arange(len(limits)) != s] == 1).all()
        deleted = FAMILIES[family]()
        with torch.no_grad():
            for layer in layers_of(deleted):
                for role in site.roles or fam.neuron_columns:
                    fam.module(layer, role).weight.zero_()
            torch.testing.assert_close(got, deleted(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_teal_at_one_token_is_the_kept_columns_alone(family):
    """One token, only layer 0's attention input thresholded: the model equals the one whose query, key and value
    columns of the zeroed channels are deleted."""
    model = FAMILIES[family]()
    fam = family_of(model.config)
    ids = torch.tensor([[17]])
    layer = layers_of(model)[0]
    seen = {}
    handle = fam.module(layer, "query").register_forward_pre_hook(lambda m, args: seen.update(x=args[0][0, 0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    limit = seen["x"].abs().median()
    limits = torch.zeros(4, len(layers_of(model)))
    limits[0, 0] = limit
    with torch.no_grad(), thresholded(model, "teal", limits):
        got = model(ids).logits
    deleted = FAMILIES[family]()
    zeroed = seen["x"].abs() < limit
    assert 0 < zeroed.sum() < len(zeroed)
    with torch.no_grad():
        for role in ("query", "key", "value"):
            fam.module(layers_of(deleted)[0], role).weight[:, zeroed] = 0
        torch.testing.assert_close(got, deleted(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_greedy_allocation_zeroes_first_what_changes_nothing(family):
    """With every output projection zeroed, no zero at the attention sites changes a layer's output: the greedy
    allocation zeroes them whole before any FFN site, and each layer reaches the asked parameter-weighted
    sparsity (to one step)."""
    model = FAMILIES[family]()
    fam = family_of(model.config)
    layers = layers_of(model)
    with torch.no_grad():
        for layer in layers:
            fam.module(layer, "output").weight.zero_()
    data = calibration_examples()
    histograms = calibrate(model, data, "teal", 4, 1)
    shares = greedy_shares(model, histograms, data, [0.5] * 4, 4, 1)
    weights = torch.tensor([[sum(fam.module(layer, role).weight.numel() for role in site.roles)
                             for layer in layers] for site in sites(model, "teal")], dtype=torch.float32)
    reached = (weights * shares).sum(0) / weights.sum(0)
    assert ((reached >= 0.5 - 1e-6) & (reached < 0.5 + GREEDY_STEP)).all(), reached
    attention = weights[:2].sum(0) / weights.sum(0)  # the most the attention sites can zero
    for index in range(len(layers)):
        if attention[index] >= 0.5:
            assert (shares[2:, index] == 0).all(), shares
        else:
            assert (shares[:2, index] == 1).all() and (shares[2:, index] > 0).any(), shares
