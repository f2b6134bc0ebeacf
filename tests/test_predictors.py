"""The ShadowLLM predictor: normalisation, Spearman ρ, learning, persistence and contextual masks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from scipy.stats import spearmanr

from shadow.config import PredictorConfig
from shadow.criteria import get_criterion
from shadow.data import Example, collate
from shadow.models import Shape
from shadow.policy import Policy
from shadow.predictors import (
    OracleMasks,
    PredictedMasks,
    Predictor,
    StaticMasks,
    fit_predictor,
    load_predictor,
    normalise_targets,
    placement_groups,
    quality,
    save_predictor,
    spearman,
    static_importance,
    top_recall,
)
from shadow.traces import score_batch

SHAPE = Shape(layers=3, heads=4, head_dim=4, neurons=32)


def test_spearman_matches_scipy():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(5, 40, generator=gen), torch.rand(5, 40, generator=gen)
    expected = [spearmanr(a[i], b[i]).statistic for i in range(5)]
    torch.testing.assert_close(spearman(a, b), torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_target_normalisation_per_layer_and_global():
    scores = torch.tensor([[[1.0, 3.0], [10.0, 30.0]]])
    assert normalise_targets(scores, "per_layer").tolist() == [[[0.0, 1.0], [0.0, 1.0]]]
    torch.testing.assert_close(normalise_targets(scores, "global"),
                               torch.tensor([[[0.0, 2 / 29], [9 / 29, 1.0]]]))


def test_static_importance_weighs_every_example_equally():
    traces = synthetic_traces(8)
    heads, neurons = static_importance(traces)
    assert heads.shape == (SHAPE.layers, SHAPE.heads) and neurons.shape == (SHAPE.layers, SHAPE.neurons)
    louder = {k: v.clone() for k, v in traces.items()}
    louder["heads"][0] *= 1000  # a long example's raw sums are larger; it must not dominate
    louder["neurons"][0] *= 1000
    torch.testing.assert_close(static_importance(louder)[0], heads)
    torch.testing.assert_close(static_importance(louder)[1], neurons)
    expected = normalise_targets(traces["heads"], "per_layer").mean(0)
    torch.testing.assert_close(heads, expected)


def synthetic_traces(n: int = 512, hidden: int = 16) -> dict:
    """Scores that are a fixed nonlinear function of the features: a predictor can learn them."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(n, hidden, generator=gen)
    features = base[:, None] + 0.01 * torch.randn(n, SHAPE.layers, hidden, generator=gen)  # (N, L, E)
    w_heads = torch.randn(hidden, SHAPE.layers * SHAPE.heads, generator=gen)
    w_neurons = torch.randn(hidden, SHAPE.layers * SHAPE.neurons, generator=gen)
    return {"features": features,
            "heads": torch.nn.functional.softplus(base @ w_heads).view(n, SHAPE.layers, SHAPE.heads),
            "neurons": torch.nn.functional.softplus(base @ w_neurons).view(n, SHAPE.layers, SHAPE.neurons)}


@pytest.fixture(scope="module")
def fitted():
    cfg = PredictorConfig(head_hidden=64, neuron_hidden=64, head_epochs=100, neuron_epochs=40)
    return fit_predictor(synthetic_traces(), SHAPE, cfg, seed=0)


def test_predictor_learns_held_out_rankings(fitted):
    _, report = fitted
    metrics, layers = report["metrics"], report["per_layer"]
    assert metrics["predictor/heads_val_spearman"] > 0.8
    assert metrics["predictor/neurons_val_spearman"] > 0.8
    assert metrics["predictor/neurons_val_recall50"] > 0.7
    assert len(layers["neurons_val_spearman"]) == SHAPE.layers and min(layers["neurons_val_spearman"]) > 0.5


def test_quality_metrics_on_known_rankings():
    target = torch.arange(16.0).view(1, 2, 8).repeat(2, 1, 1)  # (N=2, L=2, U=8), no ties
    overall, layers = quality(target.clone(), target)
    assert overall == {"val_spearman": pytest.approx(1.0), "val_recall50": 1.0}
    reversed_ = quality(-target, target)
    assert reversed_[0] == {"val_spearman": pytest.approx(-1.0), "val_recall50": 0.0}
    assert reversed_[1]["val_recall50"] == [0.0, 0.0] and reversed_[1]["val_spearman"] == pytest.approx([-1, -1])
    assert top_recall(torch.tensor([[4.0, 3, 2, 1]]), torch.tensor([[4.0, 1, 3, 2]])).item() == 0.5


def test_untrained_predictor_does_not_rank_well():
    predictor = Predictor(SHAPE, 16, placement_groups("shadow", SHAPE.layers), "mlp", 64, 64)
    traces = synthetic_traces()
    heads, _ = predictor(traces["features"][:, :1])
    target = normalise_targets(traces["heads"], "per_layer").flatten(1)
    assert spearman(heads.detach().flatten(1), target).mean() < 0.5


def test_save_and_load_give_the_same_predictions(fitted, tmp_path):
    predictor, _ = fitted
    meta = save_predictor(predictor, tmp_path)
    loaded = load_predictor(tmp_path, meta)
    x = torch.randn(3, 16)
    for a, b in zip(predictor(x), loaded(x), strict=True):
        assert torch.equal(a, b)


def test_masks_follow_the_prompt_only(tiny_opt, tokenizer):
    shape = Shape.of(tiny_opt.config)
    torch.manual_seed(0)
    predictor = Predictor(shape, 16, placement_groups("shadow", shape.layers), "mlp", 32, 32)
    masker = PredictedMasks(tiny_opt, predictor, Policy("global", 0.5, 0.5), pad_id=1)
    a = SimpleNamespace(prompt=tokenizer("The army marched north at dawn")["input_ids"])
    b = SimpleNamespace(prompt=tokenizer("Love is not love which alters when it alteration finds")["input_ids"])
    together = masker([a, b])
    alone = masker([b])
    assert torch.equal(together.heads[1], alone.heads[0]) and torch.equal(together.neurons[1], alone.neurons[0])
    assert not torch.equal(together.neurons[0], together.neurons[1])  # different contexts, different masks
    assert together.sparsity() == pytest.approx({"head_sparsity": 0.5, "neuron_sparsity": 0.5})


def test_static_masks_are_the_same_for_every_request():
    heads, neurons = static_importance(synthetic_traces(16))
    masker = StaticMasks(heads, neurons, Policy("global", 0.5, 0.75))
    masks = masker([SimpleNamespace(prompt=[2, 5]), SimpleNamespace(prompt=[2, 9, 9])])
    assert torch.equal(masks.heads[0], masks.heads[1]) and torch.equal(masks.neurons[0], masks.neurons[1])
    assert torch.equal(masks.heads[0], Policy("global", 0.5, 0.75).select(heads[None], neurons[None]).heads[0])
    assert masks.sparsity() == pytest.approx({"head_sparsity": 0.5, "neuron_sparsity": 0.75})


def test_oracle_masks_keep_the_criterions_own_top_units(tiny_opt, tokenizer):
    shape = Shape.of(tiny_opt.config)
    policy = Policy("local", 0.5, 0.5)
    tokens = tokenizer("Four score and seven years ago our fathers brought forth")["input_ids"]
    oracle = OracleMasks(tiny_opt, get_criterion("plainact"), shape, policy, "per_layer", pad_id=1, seed=0)
    masks = oracle([SimpleNamespace(prompt=tokens[:1], tokens=tokens)])
    _, heads, neurons = score_batch(tiny_opt, collate([Example(tuple(tokens), 1)], 1), get_criterion("plainact"),
                                    shape)
    assert torch.equal(masks.heads, policy.select(heads, neurons).heads)
    assert torch.equal(masks.neurons, policy.select(heads, neurons).neurons)


def test_placements():
    assert placement_groups("shadow", 3, layer=1) == ((1, (0, 1, 2)),)
    assert placement_groups("dejavu", 3) == ((0, (0,)), (1, (1,)), (2, (2,)))
    assert placement_groups("dejavu", 3, lookahead=True) == ((0, (0,)), (0, (1,)), (1, (2,)))


@pytest.mark.parametrize("name,arch,lookahead", [("dejavu", "mlp", False), ("dejavu", "lowrank", True),
                                                 ("shadow", "lowrank", False)])
def test_other_placements_and_architectures_learn(name, arch, lookahead):
    cfg = PredictorConfig(name=name, arch=arch, lookahead=lookahead, head_hidden=64, neuron_hidden=64,
                          head_epochs=60, neuron_epochs=20)
    predictor, report = fit_predictor(synthetic_traces(), SHAPE, cfg, seed=0)
    assert len(predictor.heads) == (SHAPE.layers if name == "dejavu" else 1)
    assert report["metrics"]["predictor/neurons_val_spearman"] > 0.6
    assert len(report["per_layer"]["heads_val_recall50"]) == SHAPE.layers


def test_per_token_masks_depend_only_on_the_tokens_so_far(tiny_opt, tokenizer):
    shape = Shape.of(tiny_opt.config)
    torch.manual_seed(0)
    predictor = Predictor(shape, 16, placement_groups("shadow", shape.layers), "mlp", 32, 32)
    masker = PredictedMasks(tiny_opt, predictor, Policy("global", 0.5, 0.5), pad_id=1, granularity="token")
    a = tokenizer("The army marched north at dawn and rested")["input_ids"]
    b = a[:5] + tokenizer(" sang loudly in the rain", add_special_tokens=False)["input_ids"]
    masks = masker([SimpleNamespace(tokens=a), SimpleNamespace(tokens=b)])
    assert masks.heads.shape == (2, max(len(a), len(b)) - 1, shape.layers, shape.heads)
    assert torch.equal(masks.neurons[0, :5], masks.neurons[1, :5])  # same tokens so far, same masks
    assert not torch.equal(masks.neurons[0, 5:len(b) - 1], masks.neurons[1, 5:len(b) - 1])
