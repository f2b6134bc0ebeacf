"""TEAL and CATS: thresholds calibrated to the asked share, applied where each method applies them (checked against
deleting the weights they skip), what they count as dropped, and TEAL's greedy allocation as its greedyopt runs."""

from __future__ import annotations

import pytest
import torch
from helpers import calibration_examples, layers_of, make_tiny_llama, make_tiny_opt

from shadow.arch import family_of
from shadow.data import Example
from shadow.thresholds import (
    calibrate,
    greedy_path,
    greedy_shares,
    layer_error,
    projection_weights,
    site_index,
    sites,
    tail_positions,
    thresholded,
)
from shadow.weights_read import InputCounter

FAMILIES = {"opt": make_tiny_opt, "llama": make_tiny_llama}


def test_teal_thresholds_every_projection_and_cats_the_activation():
    """TEAL: one site per projection, the projections that share an input sharing its histogram; WINA: one site
    per projection, each its own histogram; CATS: one."""
    assert [s.name for s in sites(make_tiny_llama(), "teal")] == ["query", "key", "value", "output", "gate", "up",
                                                                 "down"]
    assert [(s.name, s.input) for s in sites(make_tiny_opt(), "teal")] == [
        ("query", "attention"), ("key", "attention"), ("value", "attention"), ("output", "output"), ("up", "ffn"),
        ("down", "down")]
    assert [s.name for s in sites(make_tiny_opt(), "cats")] == ["activation"]
    assert [(s.name, s.input) for s in sites(make_tiny_opt(), "wina")] == [
        ("query", "query"), ("key", "key"), ("value", "value"), ("output", "output"), ("up", "up"), ("down", "down")]


@pytest.mark.parametrize("family", FAMILIES)
def test_wina_keeps_the_channels_whose_magnitude_times_column_norm_is_largest(family):
    """One token, only layer 0's query site thresholded: WINA zeroes exactly the channels whose |x_j| · ‖W_q[:, j]‖
    is below the threshold (a column made 100× larger is kept however small its input), and the model equals the
    one whose query columns of those channels are deleted; the key and value read the whole input."""
    model = FAMILIES[family]()
    fam = family_of(model.config)
    query = fam.module(layers_of(model)[0], "query")
    ids = torch.tensor([[17]])
    seen = {}
    handle = query.register_forward_pre_hook(lambda m, args: seen.update(x=args[0][0, 0]))
    with torch.no_grad():
        model(ids)
        small = seen["x"].abs().argmin()
        query.weight[:, small] *= 100  # its input is the smallest, its column now the largest
    handle.remove()
    norms = query.weight.detach().norm(dim=0)
    score = seen["x"].abs() * norms
    limit = score.median()
    found = site_index(model, "wina")
    limits = torch.zeros(len(found), len(layers_of(model)))
    limits[found["query"], 0] = limit
    with torch.no_grad(), thresholded(model, "wina", limits) as kept:
        got = model(ids).logits
    zeroed = score < limit
    assert 0 < zeroed.sum() < len(zeroed) and not zeroed[small]
    assert (seen["x"].abs()[~zeroed].min() < seen["x"].abs()[zeroed].max())  # not TEAL's choice by magnitude
    assert kept.shares()[found["query"], 0].item() == pytest.approx(1 - zeroed.float().mean().item())
    deleted = FAMILIES[family]()
    with torch.no_grad():
        fam.module(layers_of(deleted)[0], "query").weight[:, small] *= 100
        fam.module(layers_of(deleted)[0], "query").weight[:, zeroed] = 0
        torch.testing.assert_close(got, deleted(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["teal", "wina", "cats"])
@pytest.mark.parametrize("share", [0.55, 0.8])  # above the zeros ReLU makes on OPT (CATS zeroes those first)
def test_thresholds_zero_the_asked_share_of_the_calibration_activations(family, method, share):
    """Layer 0's first site sees the dense model's activations (nothing before it is thresholded): the share of its
    input that is zero under the thresholds, seen where the projection reads it, is the asked one, to the
    histograms' resolution. Later sites see sparser inputs and land near it."""
    model = FAMILIES[family]()
    data = calibration_examples()
    found = sites(model, method)
    limits = calibrate(model, data, method, 4, 1).thresholds([share] * len(found))
    assert limits.shape == (len(found), len(layers_of(model))) and (limits > 0).all()
    with torch.no_grad(), thresholded(model, method, limits), InputCounter(model) as inputs, inputs.counting():
        model(torch.tensor([e.input_ids for e in data]))
    nonzero = inputs.shares()
    zeroed = torch.tensor([[1 - v for v in nonzero[site.roles[0] if site.roles else "down"]] for site in found])
    assert zeroed[0, 0].item() == pytest.approx(share, abs=0.01)
    assert ((zeroed - share).abs() < 0.2).all(), zeroed


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["teal", "wina", "cats"])
def test_a_site_thresholded_whole_is_its_weights_deleted(family, method):
    """A threshold above every activation at one site, none elsewhere: the model equals the one whose weights that
    site's zeroed entries multiply are deleted (TEAL: the projection reading the site; CATS: the down projection,
    whose input the activation's zeros zero). The site drops every entry that was not exactly zero already."""
    model = FAMILIES[family]()
    fam = family_of(model.config)
    ids = torch.randint(4, 8192, (2, 9), generator=torch.Generator().manual_seed(2))
    for s, site in enumerate(sites(model, method)):
        limits = torch.zeros(len(sites(model, method)), len(layers_of(model)))
        limits[s] = float("inf")
        with (torch.no_grad(), thresholded(model, method, limits) as kept, InputCounter(model) as inputs,
              inputs.counting()):
            got = model(ids).logits
        shares = kept.shares()
        already_zero = torch.tensor(inputs.shares()[site.roles[0] if site.roles else "down"])  # now all zero: 0
        assert (shares[torch.arange(len(limits)) != s] == 1).all() and (already_zero == 0).all()
        assert ((shares[s] == 0) if family == "llama" else (shares[s] < 1)).all()  # OPT's ReLU zeros stay read
        deleted = FAMILIES[family]()
        with torch.no_grad():
            for layer in layers_of(deleted):
                for role in site.roles or fam.neuron_columns:
                    fam.module(layer, role).weight.zero_()
            torch.testing.assert_close(got, deleted(ids).logits)


def test_exact_zeros_and_padding_are_not_counted_as_dropped():
    """On OPT the down projection's input is ReLU's output, mostly exact zeros: a threshold just above zero drops
    nothing, and an infinite one drops exactly the nonzero entries. Padded positions count nowhere: a batch padded
    with a second, shorter request counts what the two requests alone count."""
    model = make_tiny_opt()
    down = site_index(model, "teal")["down"]
    ids = torch.randint(4, 8192, (1, 12), generator=torch.Generator().manual_seed(3))
    limits = torch.zeros(len(sites(model, "teal")), len(layers_of(model)))
    limits[down] = 1e-30
    with torch.no_grad(), thresholded(model, "teal", limits) as kept, InputCounter(model) as inputs, inputs.counting():
        model(ids)
    assert (kept.shares() == 1).all() and max(inputs.shares()["down"]) < 0.9  # ReLU zeroed some: not dropped
    limits[down, 0] = float("inf")  # layer 0 sees the inputs it saw above
    with torch.no_grad(), thresholded(model, "teal", limits) as kept:
        model(ids)
    zeros = 1 - inputs.shares()["down"][0]  # ReLU's, read: only the nonzero entries are dropped
    assert kept.shares()[down, 0].item() == pytest.approx(zeros, abs=1e-9) and 0 < zeros < 1
    short = torch.randint(4, 8192, (1, 5), generator=torch.Generator().manual_seed(4))
    padded = torch.cat([short, torch.ones(1, 7, dtype=torch.long)], 1)
    batch, mask = torch.cat([ids, padded]), torch.tensor([[1] * 12, [1] * 5 + [0] * 7])
    counted = []
    for inputs_ in ((batch, mask), (ids, None), (short, None)):
        with torch.no_grad(), thresholded(model, "teal", limits) as kept:
            model(input_ids=inputs_[0], attention_mask=inputs_[1])
        counted.append((kept.dropped.clone(), kept.seen.clone()))
    torch.testing.assert_close(counted[0][0], counted[1][0] + counted[2][0])
    torch.testing.assert_close(counted[0][1], counted[1][1] + counted[2][1])


@pytest.mark.parametrize("family", FAMILIES)
def test_teal_at_one_token_is_the_kept_columns_alone(family):
    """One token, only layer 0's query, key and value inputs thresholded: the model equals the one whose query, key
    and value columns of the zeroed channels are deleted."""
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
    found = site_index(model, "teal")
    limits = torch.zeros(len(found), len(layers_of(model)))
    limits[[found["query"], found["key"], found["value"]], 0] = limit
    with torch.no_grad(), thresholded(model, "teal", limits):
        got = model(ids).logits
    deleted = FAMILIES[family]()
    zeroed = seen["x"].abs() < limit
    assert 0 < zeroed.sum() < len(zeroed)
    with torch.no_grad():
        for role in ("query", "key", "value"):
            fam.module(layers_of(deleted)[0], role).weight[:, zeroed] = 0
        torch.testing.assert_close(got, deleted(ids).logits)


def test_teals_error_is_the_l2_norm_over_the_last_quarter_of_each_sequences_real_tokens():
    real = torch.tensor([[1] * 8, [1] * 5 + [0] * 3]).bool()
    tails = tail_positions(real)
    assert tails.tolist() == [[False] * 6 + [True] * 2, [False] * 3 + [True] * 2 + [False] * 3]
    dense = torch.zeros(2, 8, 3)
    new = torch.zeros(2, 8, 3)
    new[0, 7] = torch.tensor([3.0, 0, 0])
    new[0, 6] = torch.tensor([4.0, 0, 0])
    new[0, 0] = 100.0  # before the tail: not measured
    new[1, 6] = 100.0  # padding: not measured
    new[1, 4] = torch.tensor([0, 2.0, 0])
    # per sequence and channel: sequence 0 channel 0: √(9 + 16) = 5; sequence 1 channel 1: 2; mean over 6 cells
    assert layer_error([new], [dense], [tails]) == pytest.approx(7 / 6)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_greedy_path_zeroes_first_what_changes_nothing(family):
    """TEAL's greedyopt on the tiny models: each step raises one projection's share by base / w_p, so the
    parameter-weighted sparsity grows by base / Σ w a step. With every output projection zeroed, no zero at the
    attention sites changes a layer's output: the path zeroes them whole before any FFN site. A job's target picks
    the row nearest it in each layer."""
    model = FAMILIES[family]()
    fam = family_of(model.config)
    with torch.no_grad():
        for layer in layers_of(model):
            fam.module(layer, "output").weight.zero_()
    data = calibration_examples(count=4)
    weights = projection_weights(model, "teal")
    assert weights[0] == 1 and weights.tolist() == [
        fam.module(layers_of(model)[0], site.roles[0]).weight.numel() / fam.module(layers_of(model)[0], "query")
        .weight.numel() for site in sites(model, "teal")]
    path, reached = greedy_path(model, calibrate(model, data, "teal", 4, 1), data, 4, 1, limit=0.6)
    steps = len(path) - 1
    assert path.shape == (steps + 1, len(weights), len(layers_of(model))) and (path[0] == 0).all()
    raised = ((path[1:] - path[:-1]) > 0).sum(1)
    assert (raised == 1).all()  # one projection a step
    unclamped = (path[1:] < 1) & (path[1:] > path[:-1])
    step = (path[1:] - path[:-1])[unclamped] * weights[:, None].expand(-1, path.shape[2])[None].expand(
        steps, -1, -1)[unclamped]
    torch.testing.assert_close(step, torch.full_like(step, 0.05))  # base / w_p, in parameters of the query's
    assert reached[-1].min() >= 0.6 - 1e-6
    attention = [s for s, site in enumerate(sites(model, "teal")) if site.share == "head"]
    ffn = [s for s, site in enumerate(sites(model, "teal")) if site.share == "neuron"]
    for row in path:
        for index in range(path.shape[2]):
            assert (row[ffn, index] == 0).all() or (row[attention, index] == 1).all(), row
    shares = greedy_shares(path, reached, 0.3)
    for index in range(path.shape[2]):
        picked = (weights @ shares[:, index].double()) / weights.sum()
        assert (reached[:, index] - 0.3).abs().min().item() == pytest.approx(abs(picked.item() - 0.3), abs=1e-6)


def test_the_greedy_allocation_is_measured_on_real_tokens_only():
    """A short example padded in a batch with a long one gives the path it gives in a batch of its own."""
    model = make_tiny_llama()
    data = calibration_examples(count=2)
    examples = [Example(data[0].input_ids[:9], 1), data[1]]
    histograms = calibrate(model, data, "teal", 4, 1)
    batched = greedy_path(model, histograms, examples, 2, 1, limit=0.3)[0]
    assert torch.equal(batched, greedy_path(model, histograms, examples, 1, 1, limit=0.3)[0])
