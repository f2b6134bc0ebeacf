"""The ShadowLLM predictor: normalisation, Spearman ρ, learning, persistence and contextual masks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import make_tiny_opt, settings, shape_of
from scipy.stats import spearmanr

from shadow.arch import Shape
from shadow.criteria import get_criterion
from shadow.data import Example, collate
from shadow.placements import PLACEMENTS
from shadow.policy import Policy
from shadow.predictors import (
    LayerScales,
    OracleMasks,
    PredictedMasks,
    Predictor,
    StaticMasks,
    average_ranks,
    fit_predictor,
    load_predictor,
    normalise_targets,
    per_example_quality,
    save_predictor,
    spearman,
    split_by_document,
    static_importance,
    top_recall,
)
from shadow.traces import TraceShards, score_batch

SHAPE = Shape(layers=3, query_heads=4, kv_heads=4, head_dim=4, neurons=32, attention_unit="kv_group")


def test_spearman_matches_scipy():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(5, 40, generator=gen), torch.rand(5, 40, generator=gen)
    expected = [spearmanr(a[i], b[i]).statistic for i in range(5)]
    torch.testing.assert_close(spearman(a, b), torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_spearman_gives_ties_their_average_rank_as_scipy_does():
    """Dead neurons all score 0: ranking them by position would invent an order that is not in the data."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, 4, (6, 30), generator=gen).float()  # many ties
    b = torch.rand(6, 30, generator=gen).round(decimals=1)
    b[:, :10] = 0
    expected = [spearmanr(a[i], b[i]).statistic for i in range(6)]
    torch.testing.assert_close(spearman(a, b), torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    assert spearman(torch.tensor([[0.0, 0, 0, 1]]), torch.tensor([[0.0, 0, 0, 1]])).item() == pytest.approx(1.0)
    ranks = average_ranks(torch.tensor([[3.0, 1, 3, 2, 1]]))
    torch.testing.assert_close(ranks, torch.tensor([[3.5, 0.5, 3.5, 2, 0.5]]))


def test_held_out_split_keeps_each_document_on_one_side():
    documents = [f"speech{i // 7}" for i in range(200)] + ["short"] * 3
    train, val, held = split_by_document(documents, 0.2, seed=0)
    assert sorted(train.tolist() + val.tolist()) == list(range(len(documents)))
    assert not {documents[i] for i in train} & {documents[i] for i in val}
    assert held == len({documents[i] for i in val}) and 0.2 <= len(val) / len(documents) < 0.25
    again = split_by_document(documents, 0.2, seed=0)
    assert torch.equal(again[1], val) and not torch.equal(split_by_document(documents, 0.2, seed=1)[1], val)
    assert len(split_by_document(["a"] * 9 + ["b"], 0.9, seed=0)[0]) > 0  # one document always trains
    with pytest.raises(ValueError, match="1 document"):
        split_by_document(["a"] * 10, 0.2, seed=0)


def test_target_normalisation_per_layer_and_global():
    scores = torch.tensor([[[1.0, 3.0], [10.0, 30.0]]])
    assert normalise_targets(scores, "per_layer").tolist() == [[[0.0, 1.0], [0.0, 1.0]]]
    torch.testing.assert_close(normalise_targets(scores, "global"),
                               torch.tensor([[[0.0, 2 / 29], [9 / 29, 1.0]]]))


def test_static_importance_weighs_every_example_equally():
    traces = synthetic_traces(8)
    heads, neurons = static_importance(TraceShards([traces]), "per_layer")
    assert heads.shape == (SHAPE.layers, SHAPE.heads) and neurons.shape == (SHAPE.layers, SHAPE.neurons)
    louder = {k: v.clone() for k, v in traces.items()}
    louder["heads"][0] *= 1000  # a long example's raw sums are larger; it must not dominate
    louder["neurons"][0] *= 1000
    torch.testing.assert_close(static_importance(TraceShards([louder]), "per_layer")[0], heads)
    torch.testing.assert_close(static_importance(TraceShards([louder]), "per_layer")[1], neurons)
    expected = normalise_targets(traces["heads"], "per_layer").mean(0)
    torch.testing.assert_close(heads, expected)


def scaled_traces(n: int = 16) -> dict:
    """Two layers whose scores differ only in scale: layer 1's are a tenth of layer 0's, so that every unit of
    layer 0 matters more than any of layer 1."""
    gen = torch.Generator().manual_seed(0)
    heads = 1 + torch.rand(n, 1, 3, generator=gen)  # three units a layer, as SmolLM2's key-value groups
    neurons = 1 + torch.rand(n, 1, 8, generator=gen)
    return {"features": torch.randn(n, 2, 4, generator=gen), "heads": torch.cat([heads, heads / 10], 1),
            "neurons": torch.cat([neurons, neurons / 10], 1)}


def test_global_ranking_compares_layers_on_their_calibrated_scale():
    """Scores normalised per layer hold a 0 and a 1 in every layer: ranked across layers as they are (ShadowLLM's
    code, ``layer_scale=none``), ties decide and layer 1 keeps units. Put back on one scale by the calibration
    set's ``LayerScales``, the global half is layer 0, whichever mask source ranks them."""
    traces = TraceShards([scaled_traces()])
    policy = Policy("global", 0.5, 0.5)
    today = StaticMasks(*static_importance(traces, "per_layer"), policy).masks
    assert today.heads[0, 1].any() and today.neurons[0, 1].any()
    scales = LayerScales.of(traces)
    restored = StaticMasks(*static_importance(traces, "per_layer", scales), policy).masks
    for kept in (restored.heads[0], restored.neurons[0]):
        assert kept[0].all() and not kept[1].any()
    predictor = Predictor(Shape(2, 3, 3, 1, 8, "kv_group"), 4, ((0, (0, 1)),), "mlp", 8, 8, heads_only=False)
    per_layer = [normalise_targets(traces.shards[0][kind][:1], "per_layer") for kind in ("heads", "neurons")]
    with torch.no_grad():  # a predictor that predicts the per-layer normalised targets exactly
        predictor.heads[0][-1].weight.zero_(), predictor.neurons[0][-1].weight.zero_()
        predictor.heads[0][-1].bias.copy_(per_layer[0].flatten()), predictor.neurons[0][-1].bias.copy_(
            per_layer[1].flatten())
    features = torch.randn(1, 1, 4)
    as_normalised = policy.select(*predictor(features))
    assert as_normalised.heads[0, 1].any() and as_normalised.neurons[0, 1].any()
    predicted = policy.select(*predictor.use_scales(scales)(features))
    assert predicted.heads[0, 0].all() and not predicted.heads[0, 1].any() and not predicted.neurons[0, 1].any()
    assert torch.equal(policy.select(*predictor.use_scales(None)(features)).heads, as_normalised.heads)


def test_an_examples_own_layer_scales_restore_its_global_normalisation():
    """offset + p · span on the example's own statistics is exactly the example's scores normalised over all
    layers: the oracle, which scores each request itself, ranks those."""
    one = {k: v[:1] for k, v in synthetic_traces(4).items()}
    scales = LayerScales.of(TraceShards([one]))
    heads, neurons = scales.restore(normalise_targets(one["heads"], "per_layer"),
                                    normalise_targets(one["neurons"], "per_layer"))
    torch.testing.assert_close(heads, normalise_targets(one["heads"], "global"))
    torch.testing.assert_close(neurons, normalise_targets(one["neurons"], "global"))


def documents(n: int = 512) -> list[str]:
    return [f"doc{i // 4}" for i in range(n)]


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


def fit(traces: TraceShards, docs: list[str], cfg, heads_only: bool = False):
    """``fit_predictor`` on SHAPE with the placement ``cfg`` names, seed 0, on the CPU."""
    groups = PLACEMENTS[cfg.name].groups(SHAPE.layers, cfg.layer, cfg.lookahead)
    return fit_predictor(traces, docs, SHAPE, groups, cfg, 0, heads_only, "cpu")


@pytest.fixture(scope="module")
def fitted():
    cfg = settings("predictor", head_hidden=64, neuron_hidden=64, head_epochs=100, neuron_epochs=40)
    return fit(TraceShards([synthetic_traces()]), documents(), cfg)


def test_predictor_learns_held_out_rankings(fitted):
    _, report = fitted
    metrics, layers = report["metrics"], report["per_layer"]
    assert metrics["predictor/heads_val_spearman"] > 0.8
    assert metrics["predictor/neurons_val_spearman"] > 0.8
    assert metrics["predictor/neurons_val_recall50"] > 0.7
    assert len(layers["neurons_val_spearman"]) == SHAPE.layers and min(layers["neurons_val_spearman"]) > 0.5
    assert metrics["predictor/heads_val_documents"] == round(512 * 0.2 / 4)


def test_head_only_criteria_train_no_neuron_predictor(tmp_path):
    cfg = settings("predictor", head_hidden=32, neuron_hidden=32, head_epochs=5, neuron_epochs=5)
    predictor, report = fit(TraceShards([synthetic_traces(64)]), documents(64), cfg, heads_only=True)
    assert len(predictor.neurons) == 0 and not any("neurons" in k for k in report["metrics"])
    assert not any(k.startswith("neurons") for k in report["per_layer"])
    loaded = load_predictor(tmp_path, save_predictor(predictor, tmp_path))
    x = torch.randn(2, 1, 16)
    heads, neurons = loaded(x)
    assert torch.equal(heads, predictor(x)[0])
    assert neurons.shape == (2, SHAPE.layers, SHAPE.neurons) and not neurons.any()
    assert Policy("global", 0.5, 0.0).select(heads, neurons).neurons.all()  # every neuron kept


def quality(pred: torch.Tensor, target: torch.Tensor) -> tuple[dict, dict]:
    """Per-example quality averaged over examples, as fit_predictor reports it."""
    values = per_example_quality(pred, target)
    return ({k: values[k].mean().item() for k in ("val_spearman", "val_recall50")},
            {k: values[f"layer_{k}"].mean(0).tolist() for k in ("val_spearman", "val_recall50")})


def test_quality_metrics_on_known_rankings():
    target = torch.arange(16.0).view(1, 2, 8).repeat(2, 1, 1)  # (N=2, L=2, U=8), no ties
    overall, layers = quality(target.clone(), target)
    assert overall == {"val_spearman": pytest.approx(1.0), "val_recall50": 1.0}
    reversed_ = quality(-target, target)
    assert reversed_[0] == {"val_spearman": pytest.approx(-1.0), "val_recall50": 0.0}
    assert reversed_[1]["val_recall50"] == [0.0, 0.0] and reversed_[1]["val_spearman"] == pytest.approx([-1, -1])
    assert top_recall(torch.tensor([[4.0, 3, 2, 1]]), torch.tensor([[4.0, 1, 3, 2]])).item() == 0.5


def test_untrained_predictor_does_not_rank_well():
    predictor = Predictor(SHAPE, 16, PLACEMENTS["shadow"].groups(SHAPE.layers, 0, False), "mlp", 64, 64, False)
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
    shape = shape_of(tiny_opt)
    torch.manual_seed(0)
    predictor = Predictor(shape, 16, PLACEMENTS["shadow"].groups(shape.layers, 0, False), "mlp", 32, 32, False)
    masker = PredictedMasks(tiny_opt, predictor, Policy("global", 0.5, 0.5), 1, "request")
    a = SimpleNamespace(prompt=tokenizer("The army marched north at dawn")["input_ids"])
    b = SimpleNamespace(prompt=tokenizer("Love is not love which alters when it alteration finds")["input_ids"])
    together = masker([a, b])
    alone = masker([b])
    assert torch.equal(together.heads[1], alone.heads[0]) and torch.equal(together.neurons[1], alone.neurons[0])
    assert not torch.equal(together.neurons[0], together.neurons[1])  # different contexts, different masks
    assert together.sparsity() == pytest.approx({"head_sparsity": 0.5, "neuron_sparsity": 0.5})


def test_static_masks_are_the_same_for_every_request():
    heads, neurons = static_importance(TraceShards([synthetic_traces(16)]), "per_layer")
    masker = StaticMasks(heads, neurons, Policy("global", 0.5, 0.75))
    masks = masker([SimpleNamespace(prompt=[2, 5]), SimpleNamespace(prompt=[2, 9, 9])])
    assert torch.equal(masks.heads[0], masks.heads[1]) and torch.equal(masks.neurons[0], masks.neurons[1])
    assert torch.equal(masks.heads[0], Policy("global", 0.5, 0.75).select(heads[None], neurons[None]).heads[0])
    assert masks.sparsity() == pytest.approx({"head_sparsity": 0.5, "neuron_sparsity": 0.75})


def test_oracle_masks_keep_the_criterions_own_top_units(tiny_opt, tokenizer):
    shape = shape_of(tiny_opt)
    policy = Policy("local", 0.5, 0.5)
    tokens = tokenizer("Four score and seven years ago our fathers brought forth")["input_ids"]
    oracle = OracleMasks(tiny_opt, get_criterion("plainact", "textbook"), shape, policy, "per_layer", pad_id=1, seed=0)
    masks = oracle([SimpleNamespace(prompt=tokens[:1], tokens=tokens, n_targets=len(tokens) - 1)])
    _, heads, neurons = score_batch(tiny_opt, collate([Example(tuple(tokens), 1)], 1),
                                    get_criterion("plainact", "textbook"), shape)
    assert torch.equal(masks.heads, policy.select(heads, neurons).heads)
    assert torch.equal(masks.neurons, policy.select(heads, neurons).neurons)


def test_the_oracle_scores_a_batch_once_for_every_job_of_a_sweep(tiny_opt, tokenizer, monkeypatch):
    """Another policy or sparsity on the same batch reuses its scores (the same masks as scoring anew); another
    criterion, seed or model scores again."""
    import shadow.predictors

    calls = []
    real = shadow.predictors.score_batch
    monkeypatch.setattr(shadow.predictors, "score_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    shape, plainact = shape_of(tiny_opt), get_criterion("plainact", "textbook")
    tokens = tokenizer("Four score and seven years ago our fathers brought forth")["input_ids"]
    requests = [SimpleNamespace(prompt=tokens[:1], tokens=tokens, n_targets=len(tokens) - 1)]
    masks = {}
    for policy in (Policy("local", 0.5, 0.5), Policy("global", 0.3, 0.7)):
        masks[policy] = OracleMasks(tiny_opt, plainact, shape, policy, "global", pad_id=1, seed=0)(requests)
    assert len(calls) == 1
    _, heads, neurons = real(tiny_opt, collate([Example(tuple(tokens), 1)], 1), plainact, shape)
    for policy, got in masks.items():
        want = policy.select(normalise_targets(heads, "global"), normalise_targets(neurons, "global"))
        assert torch.equal(got.heads, want.heads) and torch.equal(got.neurons, want.neurons)
    OracleMasks(tiny_opt, get_criterion("l2_norm", "textbook"), shape, Policy("local", 0.5, 0.5), "global", 1,
                0)(requests)
    OracleMasks(tiny_opt, plainact, shape, Policy("local", 0.5, 0.5), "global", 1, 1)(requests)
    assert len(calls) == 3


def test_oracle_reads_a_rolling_window_one_token_longer_than_the_model(tokenizer):
    """A word-perplexity window holds the model's whole context plus the last target: the oracle scores what the
    model reads, its loss on the scored tokens."""
    model = make_tiny_opt(positions=16)
    shape = shape_of(model)
    policy = Policy("global", 0.5, 0.5)
    tokens = tokenizer(" ".join(["the cat sat on the mat and then it ran away"] * 2))["input_ids"][:17]
    oracle = OracleMasks(model, get_criterion("plainact", "textbook"), shape, policy, "per_layer", pad_id=1, seed=0)
    masks = oracle([SimpleNamespace(prompt=tokens[:1], tokens=tokens, n_targets=12)])
    _, heads, neurons = score_batch(model, collate([Example(tuple(tokens[1:]), 4)], 1),
                                    get_criterion("plainact", "textbook"), shape)
    want = policy.select(normalise_targets(heads, "per_layer"), normalise_targets(neurons, "per_layer"))
    assert torch.equal(masks.heads, want.heads) and torch.equal(masks.neurons, want.neurons)


def test_placements():
    assert PLACEMENTS["shadow"].groups(3, 1, False) == ((1, (0, 1, 2)),)
    assert PLACEMENTS["dejavu"].groups(3, 0, False) == ((0, (0,)), (1, (1,)), (2, (2,)))
    assert PLACEMENTS["dejavu"].groups(3, 0, True) == ((0, (0,)), (0, (1,)), (1, (2,)))
    assert all(PLACEMENTS[name].groups(3, 0, False) == () for name in ("dense", "oracle", "static"))


@pytest.mark.parametrize("name,arch,lookahead", [("dejavu", "mlp", False), ("dejavu", "lowrank", True),
                                                 ("shadow", "lowrank", False)])
def test_other_placements_and_architectures_learn(name, arch, lookahead):
    cfg = settings("predictor", name=name, arch=arch, lookahead=lookahead, head_hidden=64, neuron_hidden=64,
                   head_epochs=60, neuron_epochs=20)
    predictor, report = fit(TraceShards([synthetic_traces()]), documents(), cfg)
    assert len(predictor.heads) == (SHAPE.layers if name == "dejavu" else 1)
    assert report["metrics"]["predictor/neurons_val_spearman"] > 0.6
    assert len(report["per_layer"]["heads_val_recall50"]) == SHAPE.layers


def test_per_token_masks_depend_only_on_the_tokens_so_far(tiny_opt, tokenizer):
    shape = shape_of(tiny_opt)
    torch.manual_seed(0)
    predictor = Predictor(shape, 16, PLACEMENTS["shadow"].groups(shape.layers, 0, False), "mlp", 32, 32, False)
    masker = PredictedMasks(tiny_opt, predictor, Policy("global", 0.5, 0.5), 1, "token")
    a = tokenizer("The army marched north at dawn and rested")["input_ids"]
    b = a[:5] + tokenizer(" sang loudly in the rain", add_special_tokens=False)["input_ids"]
    masks = masker([SimpleNamespace(tokens=a), SimpleNamespace(tokens=b)])
    assert masks.heads.shape == (2, max(len(a), len(b)) - 1, shape.layers, shape.heads)
    assert torch.equal(masks.neurons[0, :5], masks.neurons[1, :5])  # same tokens so far, same masks
    assert not torch.equal(masks.neurons[0, 5:len(b) - 1], masks.neurons[1, 5:len(b) - 1])


def test_training_streams_the_traces_in_blocks(tmp_path):
    """Traces in four shards: within the block budget they are shuffled as one block, exactly as one shard; beyond
    it, one block per shard, files or dicts alike, with the same quality."""
    from safetensors.torch import save_file

    traces = synthetic_traces()
    pieces = [{k: v[i:i + 128] for k, v in traces.items()} for i in range(0, 512, 128)]
    for i, piece in enumerate(pieces):
        save_file(piece, str(tmp_path / f"traces-{i:05d}.safetensors"))
    files, memory, whole = TraceShards.load(tmp_path), TraceShards(pieces), TraceShards([traces])
    assert files.sizes == [128] * 4 and files.offsets == [0, 128, 256, 384] and len(files) == 512
    for one, many in zip(static_importance(whole, "per_layer"), static_importance(files, "per_layer"), strict=True):
        torch.testing.assert_close(one, many)
    cfg = settings("predictor", head_hidden=64, neuron_hidden=64, head_epochs=30, neuron_epochs=10)
    assert fit(files, documents(), cfg)[1] == fit(whole, documents(), cfg)[1]
    cfg.block_gb = 1e-9  # every shard its own block
    from_files, report = fit(files, documents(), cfg)
    from_memory, again = fit(memory, documents(), cfg)
    assert report == again
    for a, b in zip(from_files.state_dict().values(), from_memory.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert report["metrics"]["predictor/heads_val_spearman"] > 0.8
    assert report["metrics"]["predictor/neurons_val_spearman"] > 0.7


def test_per_token_masks_are_the_same_in_chunks_of_positions(tiny_opt, tokenizer, monkeypatch):
    shape = shape_of(tiny_opt)
    torch.manual_seed(0)
    predictor = Predictor(shape, 16, PLACEMENTS["shadow"].groups(shape.layers, 0, False), "mlp", 32, 32, False)
    masker = PredictedMasks(tiny_opt, predictor, Policy("global", 0.5, 0.5), 1, "token")
    requests = [SimpleNamespace(tokens=tokenizer(text)["input_ids"]) for text in
                ("The army marched north at dawn and rested by the river", "Rain fell")]
    whole = masker(requests)
    monkeypatch.setattr("shadow.predictors.TOKEN_CHUNK", 3)
    chunked = masker(requests)
    assert torch.equal(chunked.heads, whole.heads) and torch.equal(chunked.neurons, whole.neurons)
    assert whole.heads.shape[1] > 3


@pytest.fixture(scope="module")
def fitted_low_rank():
    # the factored layer learns more slowly: three times the epochs reach the full layer's quality
    cfg = settings("predictor", head_hidden=64, neuron_hidden=64, head_epochs=100, neuron_epochs=120, neuron_rank=16)
    return fit(TraceShards([synthetic_traces()]), documents(), cfg), cfg


def test_a_low_rank_neuron_network_factors_its_output_layer_and_learns(fitted, fitted_low_rank, tmp_path):
    from shadow.run import predictor_parameters

    (predictor, report), cfg = fitted_low_rank
    rank, output = predictor.neurons[0][2], predictor.neurons[0][3]  # after Linear(16, 64), ReLU
    assert (rank.in_features, rank.out_features, rank.bias) == (64, 16, None)
    assert (output.in_features, output.out_features) == (16, SHAPE.layers * SHAPE.neurons)
    parameters = sum(p.numel() for p in predictor.parameters())  # weights and biases; not the layer scales
    assert predictor_parameters(SimpleNamespace(predictor=cfg), SHAPE, 16, False) == parameters
    full = fitted[1]["metrics"]["predictor/neurons_val_spearman"]
    assert report["metrics"]["predictor/neurons_val_spearman"] > full - 0.05, full  # targets: functions of 16 numbers
    loaded = load_predictor(tmp_path, save_predictor(predictor, tmp_path))
    x = torch.randn(2, 1, 16)
    assert loaded.neuron_rank == 16 and torch.equal(loaded(x)[1], predictor(x)[1])


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_a_predictor_run_in_int8_or_bfloat16_ranks_as_in_float32(fitted, dtype, tmp_path):
    """The conversion keeps the held-out quality within 0.02 of ρ and the scores near float32's; the report of
    the converted predictor is measured on it (its MSE moves)."""
    from shadow.predictors import held_out_report

    predictor, report = fitted
    cfg = settings("predictor", head_hidden=64, neuron_hidden=64, head_epochs=100, neuron_epochs=40)
    converted = load_predictor(tmp_path, save_predictor(predictor, tmp_path)).run_as(dtype)
    quantised = isinstance(converted.neurons[0][0], torch.ao.nn.quantized.dynamic.Linear)
    assert quantised == (dtype == "int8") and converted.device.type == "cpu"
    after = held_out_report(TraceShards([synthetic_traces()]), documents(), converted, cfg, 0)["metrics"]
    for kind in ("heads", "neurons"):
        assert after[f"predictor/{kind}_val_spearman"] == pytest.approx(
            report["metrics"][f"predictor/{kind}_val_spearman"], abs=0.02)
        assert after[f"predictor/{kind}_val_mse"] != report["metrics"][f"predictor/{kind}_val_mse"]
    x = torch.randn(4, 1, 16)
    heads, neurons = converted(x)
    assert heads.dtype == torch.float32
    torch.testing.assert_close(neurons, predictor(x)[1], rtol=0, atol=0.05 * predictor(x)[1].abs().max().item())
