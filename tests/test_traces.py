"""Importance traces against direct autograd, per example, with padding; the gate-gradient identity."""

from __future__ import annotations

import pytest
import torch
from helpers import layers_of, make_tiny_opt, shape_of

from shadow.criteria import get_criterion
from shadow.data import collate, encode
from shadow.masking import apply_masks
from shadow.policy import Masks
from shadow.traces import example_loss, layer_features, score_batch

PAIRS = [("The Congress shall", " make no law."), ("To be, or not to be, that is", " the question."),
         ("We the people of the United States, in order to form", " a more perfect union, establish justice.")]


@pytest.fixture
def examples(tokenizer):
    return [encode(c, x, tokenizer, 64) for c, x in PAIRS]


def captured_forward(model, ids, labels):
    """Loss of one unpadded example, with the out_proj and fc2 inputs kept for their gradients."""
    acts = {}

    def keep(name):
        def hook(module, args):
            args[0].retain_grad()
            acts[name] = args[0]
        return hook

    handles = [m.register_forward_pre_hook(keep((i, kind))) for i, layer in enumerate(layers_of(model))
               for kind, m in (("a", layer.self_attn.out_proj), ("z", layer.fc2))]
    try:
        loss = example_loss(model(input_ids=ids).logits, labels)[0]
    finally:
        for h in handles:
            h.remove()
    return loss, acts


def test_plainact_matches_autograd_per_example(tiny_opt, examples):
    shape = shape_of(tiny_opt)
    batch = collate(examples, pad_id=1)  # padded: the examples differ in length
    features, heads, neurons = score_batch(tiny_opt, batch, get_criterion("plainact", "textbook"), shape)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        loss, acts = captured_forward(tiny_opt, batch.input_ids[i:i + 1, :n], batch.labels[i:i + 1, :n])
        loss.backward()
        for layer in range(shape.layers):
            a, z = acts[(layer, "a")], acts[(layer, "z")]
            per_token = (a * a.grad).view(n, shape.heads, shape.head_dim).sum(-1)  # <a_t,h, g_t,h>
            torch.testing.assert_close(heads[i, layer], per_token.abs().sum(0), rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(neurons[i, layer], (z * z.grad).abs().sum(0), rtol=1e-4, atol=1e-7)
        for layer in range(shape.layers):
            torch.testing.assert_close(features[i, layer], acts[(layer, "a")][0, ex.context_len - 1].detach())
    assert heads.min() >= 0 and heads.sum() > 0 and neurons.sum() > 0


def test_scores_do_not_depend_on_the_rest_of_the_batch(tiny_opt, examples):
    shape = shape_of(tiny_opt)
    plainact = get_criterion("plainact", "textbook")
    _, heads_all, neurons_all = score_batch(tiny_opt, collate(examples, 1), plainact, shape)
    _, heads_one, neurons_one = score_batch(tiny_opt, collate(examples[1:2], 1), plainact, shape)
    torch.testing.assert_close(heads_all[1:2], heads_one, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(neurons_all[1:2], neurons_one, rtol=1e-4, atol=1e-7)


def test_scoring_leaves_weights_without_gradients(tiny_opt, examples):
    score_batch(tiny_opt, collate(examples, 1), get_criterion("plainact", "textbook"), shape_of(tiny_opt))
    assert all(p.grad is None and p.requires_grad for p in tiny_opt.parameters())


def test_gate_gradient_predicts_the_loss_change(examples):
    """Finite differences: d loss / d gate[l, h] = Σ_t <a_t,h, g_t,h>, the signed sum inside plainact."""
    model = make_tiny_opt(dtype=torch.float64)
    shape = shape_of(model)
    ex = examples[2]
    ids = torch.tensor([ex.input_ids])
    labels = collate([ex], 1).labels
    loss, acts = captured_forward(model, ids, labels)
    loss.backward()
    eps = 1e-5
    for layer, head in [(0, 1), (2, 3)]:
        a = acts[(layer, "a")]
        analytic = (a * a.grad).view(-1, shape.heads, shape.head_dim)[:, head].sum()

        def loss_at(gate: float, layer: int = layer, head: int = head) -> float:
            heads = torch.ones(1, shape.layers, shape.heads, dtype=torch.float64)
            heads[0, layer, head] = gate
            masks = Masks(heads, torch.ones(1, shape.layers, shape.neurons, dtype=torch.float64))
            with torch.no_grad(), apply_masks(model, masks):
                return example_loss(model(input_ids=ids).logits, labels)[0].item()

        numeric = (loss_at(1 + eps) - loss_at(1 - eps)) / (2 * eps)
        assert numeric == pytest.approx(analytic.item(), rel=1e-5, abs=1e-9)
        assert abs(loss_at(0.0) - loss.item()) > 0  # removing the head changes the loss


def test_layer_features_match_the_full_pass(tiny_opt, examples):
    batch = collate(examples, 1)
    full, _, _ = score_batch(tiny_opt, batch, get_criterion("plainact", "textbook"), shape_of(tiny_opt))
    feats = layer_features(tiny_opt, batch.input_ids, batch.attention_mask, batch.last_context, [1, 0])
    torch.testing.assert_close(feats, full[:, [1, 0]], rtol=1e-5, atol=1e-6)
    every = layer_features(tiny_opt, batch.input_ids, batch.attention_mask, None, [2])  # (B, T, 1, E)
    torch.testing.assert_close(every[torch.arange(3), batch.last_context], full[:, [2]], rtol=1e-5, atol=1e-6)


def test_layer_features_stop_after_the_last_layer_asked_for(tiny_opt, examples):
    batch = collate(examples, 1)
    reached = []
    handle = layers_of(tiny_opt)[1].fc1.register_forward_pre_hook(lambda m, a: reached.append(1))
    try:
        layer_features(tiny_opt, batch.input_ids, batch.attention_mask, batch.last_context, [0])
        assert not reached
        layer_features(tiny_opt, batch.input_ids, batch.attention_mask, batch.last_context, [1])
        assert not reached  # stops at layer 1's out_proj, before its FFN
        layer_features(tiny_opt, batch.input_ids, batch.attention_mask, batch.last_context, [2])
        assert reached
    finally:
        handle.remove()
