"""What a token reads: against the weights that deleting the same units leaves, per kind of unit, and by hand for
every placement and baseline (predictors, layers computed before their mask, exact zeros, the key-value cache)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_llama, make_tiny_opt, request_masks, settings, shape_of

from shadow.arch import family_of
from shadow.compose import compose_config
from shadow.policy import Masks, SparsityMeter
from shadow.sparse import pruned
from shadow.weights_read import sparsity_meter, step_parameters, unit_reads, weights_read


def parameters_left(model) -> int:
    """What a dense decoding step of the model as it stands reads: every parameter, but one row of each
    embedding table, and the LM head whole."""
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
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
        left = parameters_left(model)
    assert read == pytest.approx(left / parameters_left(model), rel=1e-9) and step_parameters(model) == \
        parameters_left(model)
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


def hand_model():
    """Small enough a vocabulary that the layers matter: 3 layers of 4 query heads (2 key-value heads) of 8, FFN 48."""
    return make_tiny_llama(layers=3, heads=4, kv_heads=2, hidden=32, ffn=48, vocab=64)


PER_LAYER = {"head_sparsity": [0.5, 0.5, 0.0], "neuron_sparsity": [0.5, 0.25, 0.5]}
DOWN_NONZERO = [0.4, 0.5, 0.3]  # the down projection's input entries that are not exactly zero


def hand_counts(model, placement: str, granularity: str = "request", lookahead: bool = False) -> dict[str, float]:
    """What a token reads, counted by hand from the projections' sizes: the kept heads' query, key, value rows and
    output columns, the kept units' gate and up rows and down columns; the predictor's parameters as built; with
    per-token masks, the layers whose query, key and value run for every head before the predictor reads them."""
    from shadow.placements import PLACEMENTS
    from shadow.predictors import Predictor

    dense = step_parameters(model)
    q, k, v, o = 32 * 32, 16 * 32, 16 * 32, 32 * 32
    ffn = 3 * 48 * 32
    heads = [1 - s for s in PER_LAYER["head_sparsity"]]
    units = [1 - s for s in PER_LAYER["neuron_sparsity"]]
    whole_qkv = set()
    cfg = settings("predictor=" + placement, granularity=granularity, lookahead=lookahead)
    groups = PLACEMENTS[placement].groups(3, 0, lookahead)
    if granularity == "token":
        whole_qkv = {feature for feature, targets in groups if feature in targets}
    network = Predictor.configured(shape_of(model), 32, groups, cfg, heads_only=False)
    params = sum(p.numel() for p in network.parameters())
    runs = 1.0 if granularity == "token" else 4 / 100  # 4 requests scoring 100 tokens
    predictor = params * runs / dense if PLACEMENTS[placement].trains else 0.0
    read = effective = 0.0
    kv = []
    for layer in range(3):
        attention_rows = 1.0 if layer in whole_qkv else heads[layer]
        read += attention_rows * (q + k + v) + heads[layer] * o + units[layer] * ffn
        effective += attention_rows * (q + k + v) + heads[layer] * o + units[layer] * 2 * 48 * 32 + min(
            units[layer], DOWN_NONZERO[layer]) * 48 * 32
        kv.append(1.0 if layer in whole_qkv else heads[layer])
    rest = dense - 3 * (q + k + v + o + ffn)
    return {"weights_read": (rest + read) / dense + predictor, "weights_read_effective": (rest + effective) / dense
            + predictor, "predictor_read": predictor, "kv_read": sum(kv) / 3}


@pytest.mark.parametrize("placement,granularity,lookahead", [
    ("static", "request", False), ("shadow", "request", False), ("shadow", "token", False),
    ("dejavu", "request", False), ("dejavu", "token", False), ("dejavu", "token", True)])
def test_a_token_reads_the_kept_units_the_predictor_and_what_runs_before_it(placement, granularity, lookahead):
    """ShadowLLM's one network and DejaVu-style's per-layer ones count at every token (per-token masks) or once per
    request over the tokens it scores; per token, ShadowLLM computes layer 0's every head before predicting, and
    DejaVu-style without lookahead every layer's (with lookahead: layer 0's); static masks read no predictor."""
    from shadow.run import reads_per_token

    model = hand_model()
    cfg = compose_config("+criterion=plainact", f"predictor={placement}", f"predictor.granularity={granularity}",
                         f"predictor.lookahead={lookahead}")
    nonzero = {role: [1.0] * 3 for role in family_of(model.config).paths} | {"down": DOWN_NONZERO}
    meter = SparsityMeter(requests=4, scored=100)
    got = reads_per_token(cfg, model, shape_of(model), PER_LAYER, None, nonzero, meter, heads_only=False)
    assert got == pytest.approx(hand_counts(model, placement, granularity, lookahead), rel=1e-9)


@pytest.mark.parametrize("method", ["teal", "wina", "cats"])
def test_teal_reads_the_kept_columns_and_cats_the_kept_up_rows_and_down_columns(method):
    """TEAL and WINA: each projection the columns of its kept input channels; CATS: the gate whole, the kept units'
    up rows and down columns. All read every key and value of the cache, and no predictor."""
    from shadow.run import reads_per_token
    from shadow.thresholds import sites

    model = hand_model()
    found = sites(model, method)
    kept = torch.linspace(0.3, 0.9, len(found) * 3).view(len(found), 3)
    nonzero = {role: [1.0] * 3 for role in family_of(model.config).paths} | {"down": [0.2] * 3}
    got = reads_per_token(compose_config("+criterion=plainact", f"predictor={method}"), model, shape_of(model), {},
                          kept, nonzero, SparsityMeter(), heads_only=False)
    size = {"query": 32 * 32, "key": 16 * 32, "value": 16 * 32, "output": 32 * 32, "gate": 48 * 32, "up": 48 * 32,
            "down": 48 * 32}
    dense = step_parameters(model)
    if method in ("teal", "wina"):  # WINA reads as TEAL: the columns of the channels kept
        shares = {site.name: kept[s] for s, site in enumerate(found)}
    else:
        shares = {"up": kept[0], "down": kept[0]}
    skipped = sum(((1 - share) * size[role]).sum().item() for role, share in shares.items())
    effective = skipped + sum(max(0.0, min(1.0, float(shares["down"][layer])) - 0.2) * size["down"]
                              for layer in range(3))
    assert got == pytest.approx({"weights_read": 1 - skipped / dense, "weights_read_effective": 1 - effective / dense,
                                 "predictor_read": 0.0, "kv_read": 1.0}, rel=1e-6)


def test_per_token_masks_count_real_tokens_only():
    """Padding counts nowhere: a batch whose second request is padded counts what its real tokens' masks keep."""
    model = hand_model()
    s = shape_of(model)
    gen = torch.Generator().manual_seed(0)
    masks = Masks(torch.rand(2, 5, s.layers, s.heads, generator=gen) > 0.5,
                  torch.rand(2, 5, s.layers, s.neurons, generator=gen) > 0.5)
    real = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]).bool()
    meter = SparsityMeter()
    meter.add(masks, real, scored=7)
    expected = 1 - masks.neurons[real].float().mean(-1).mean(0)
    torch.testing.assert_close(torch.tensor(meter.per_layer()["neuron_sparsity"]), expected)
    assert meter.requests == 7 and meter.scored == 7


def test_effective_reads_count_the_scored_forwards_not_those_that_compute_masks(tiny_opt, tokenizer):
    """A mask source that runs the model densely (as the oracle and the predictors' feature pass do) must not
    count: the down projection's nonzero inputs are at most the half of the units the masks keep."""
    from shadow.evaluate.perplexity import evaluate_perplexity, load_eval_data
    from shadow.weights_read import InputCounter

    cfg = settings("eval", limit=2, seq_len=32, protocols=["token"])
    masks = request_masks(tiny_opt, seed=0, sparsity=0.5)

    def mask_fn(requests):
        with torch.no_grad():
            tiny_opt(torch.tensor([r.prompt[-1:] for r in requests]))  # a dense pass, as a mask source's
        return Masks(masks.heads.expand(len(requests), -1, -1), masks.neurons.expand(len(requests), -1, -1))

    with InputCounter(tiny_opt) as inputs:
        tiny_opt(torch.tensor([[5, 6, 7]]))  # outside the evaluation: not counted either
        evaluate_perplexity(tiny_opt, tokenizer, mask_fn, cfg, load_eval_data(cfg), inputs=inputs)
    down = inputs.shares()["down"]
    assert all(0 < share <= 0.5 for share in down), down  # ReLU zeroes some of the kept half too
    assert all(share == pytest.approx(1) for share in inputs.shares()["query"])
