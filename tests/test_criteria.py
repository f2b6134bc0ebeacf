"""Every criterion against a direct computation on a tiny OPT, one unpadded example at a time.

The batched scores come from padded batches of three examples; the reference values from each example alone,
with autograd's own weight gradients, explicit loops, numpy and finite differences where they apply.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_opt

from shadow.criteria import CRITERIA, EPS, get_criterion
from shadow.data import collate, encode
from shadow.masking import apply_masks
from shadow.models import Shape, decoder_layers
from shadow.policy import Masks
from shadow.traces import example_loss, score_batch

PAIRS = [("The the cat and the dog and the cat", " sat on the mat."),
         ("To be, or not to be, that is", " the question, to be sure."),
         ("We the people of the United States, in order to form a more perfect", " union, the people")]


@pytest.fixture(scope="module")
def model():
    return make_tiny_opt(dtype=torch.float64)


@pytest.fixture(scope="module")
def examples(tokenizer):
    return [encode(c, x, tokenizer, 64) for c, x in PAIRS]


@pytest.fixture(scope="module")
def alone(model, examples):
    """Per example: activations, their gradients and fc1's weight gradient, from plain autograd."""
    out = []
    for ex in examples:
        batch = collate([ex], 1)
        acts, handles = {}, []

        def keep(name, output=False, acts=acts):
            def hook(module, *args):
                tensor = args[-1] if output else args[0][0]
                tensor.retain_grad()
                acts[name] = tensor
            return hook

        for i, layer in enumerate(decoder_layers(model)):
            handles += [layer.self_attn.out_proj.register_forward_pre_hook(keep(("a", i))),
                        layer.self_attn.out_proj.register_forward_hook(keep(("o", i), output=True)),
                        layer.fc1.register_forward_hook(keep(("u", i), output=True)),
                        layer.fc2.register_forward_pre_hook(keep(("z", i)))]
        model.zero_grad()
        loss = example_loss(model(input_ids=batch.input_ids).logits, batch.labels)[0]
        loss.backward()
        for h in handles:
            h.remove()
        w1_grads = [layer.fc1.weight.grad.clone() for layer in decoder_layers(model)]
        out.append({"acts": acts, "w1_grad": w1_grads, "ids": batch.input_ids[0]})
    model.zero_grad()
    return out


def heads_of(t: torch.Tensor, shape: Shape) -> torch.Tensor:
    return t.detach()[0].view(-1, shape.heads, shape.head_dim)  # (T, H, d)


def nwot_direct(codes: np.ndarray, with_codes: bool) -> float:
    """log det(I_T + K) with the kernel over tokens, K = C Cᵀ + (1 − C)(1 − C)ᵀ (without C Cᵀ: reference)."""
    kernel = (1 - codes) @ (1 - codes).T
    if with_codes:
        kernel += codes @ codes.T
    return np.linalg.slogdet(np.eye(len(codes)) + kernel)[1]


def expected(name: str, variant: str, kind: str, layer: int, unit: int, rec: dict, model, shape: Shape) -> float:
    a, o, z, u = (rec["acts"][(k, layer)] for k in ("a", "o", "z", "u"))
    if kind == "heads":
        act, grad = heads_of(a, shape)[:, unit], heads_of(a.grad, shape)[:, unit]  # (T, d)
    else:
        act, grad = z.detach()[:, unit:unit + 1], z.grad[:, unit:unit + 1]  # (T, 1)
    block = decoder_layers(model)[layer]
    w1, w1_grad = block.fc1.weight.detach(), rec["w1_grad"][layer]
    if name == "plainact" and variant == "reference" and kind == "neurons":
        return (w1[unit] * w1_grad[unit]).abs().sum().item()
    if name == "plainact":
        return sum(abs((act[t] * grad[t]).sum().item()) for t in range(len(act)))
    if name == "fisher":
        return ((act * grad) ** 2).mean(0).sum().item()
    if name == "grad_norm":
        return (w1_grad[unit] if kind == "neurons" else grad).norm().item()
    if name == "l2_norm":
        return act.norm().item()
    if name == "snip" and variant == "reference":
        if kind == "heads":
            return heads_of(o.grad, shape)[:, unit].abs().sum().item()
        return u.grad[:, unit].abs().sum().item()
    if name == "snip":
        return abs((act * grad).sum().item())
    if name == "nwot":
        return nwot_direct((act > 0).double().numpy(), with_codes=variant != "reference")
    reached = [t for t in range(len(grad)) if heads_of(a.grad, shape)[t].abs().sum() > 0]
    if name == "jacov":
        eig = np.abs(np.linalg.eigvalsh(np.corrcoef(grad[reached].numpy()))) + EPS
        return float(-(np.log(eig) + 1 / eig).sum())
    if name == "epenas":
        targets = rec["ids"][1:].tolist() + [-100]
        total = 0.0
        for token in set(targets) - {-100}:
            rows = [t for t, x in enumerate(targets) if x == token and t in reached]
            if len(rows) > 1:
                total += np.log(np.abs(np.corrcoef(grad[rows].numpy())) + EPS).mean()
        return total
    if name == "weight_magnitude":
        if kind == "neurons":
            return (block.fc1.weight[unit].norm() * block.fc2.weight[:, unit].norm()).item()
        d = shape.head_dim
        return (block.self_attn.v_proj.weight[unit * d:(unit + 1) * d].norm()
                * block.self_attn.out_proj.weight[:, unit * d:(unit + 1) * d].norm()).item()
    raise AssertionError(name)


CASES = [(name, variant) for name in sorted(CRITERIA) for variant in CRITERIA[name]
         if name not in ("grasp", "random")]


@pytest.mark.parametrize("name,variant", CASES)
def test_criterion_matches_direct_computation(model, examples, alone, name, variant):
    shape = Shape.of(model.config)
    criterion = get_criterion(name, variant)
    _, heads, neurons = score_batch(model, collate(examples, 1), criterion, shape)
    for i, rec in enumerate(alone):
        for layer in range(shape.layers):
            for unit in range(shape.heads):
                want = expected(name, variant, "heads", layer, unit, rec, model, shape)
                assert heads[i, layer, unit].item() == pytest.approx(want, rel=1e-4, abs=1e-6), (i, layer, unit)
            if criterion.heads_only:
                assert (neurons[i] == 0).all()
                continue
            for unit in range(0, shape.neurons, 5):
                want = expected(name, variant, "neurons", layer, unit, rec, model, shape)
                assert neurons[i, layer, unit].item() == pytest.approx(want, rel=1e-4, abs=1e-6), (i, layer, unit)


def test_grasp_matches_finite_differences_of_the_gate_gradient(model, examples):
    """−(H g) with g the gate gradient at 1: H g ≈ (∇L(1 + εg) − ∇L(1 − εg)) / 2ε, per example."""
    shape = Shape.of(model.config)
    batch = collate(examples, 1)
    _, heads, neurons = score_batch(model, batch, get_criterion("grasp"), shape)
    assert model.config._attn_implementation == "sdpa"  # restored after the double backward
    for i, ex in enumerate(examples):
        ids, labels = batch.input_ids[i:i + 1, :len(ex.input_ids)], batch.labels[i:i + 1, :len(ex.input_ids)]

        def gate_grad(gh: torch.Tensor, gn: torch.Tensor, ids=ids, labels=labels) -> tuple[torch.Tensor, ...]:
            gh, gn = gh.clone().requires_grad_(), gn.clone().requires_grad_()
            with apply_masks(model, Masks(gh, gn)):
                loss = example_loss(model(input_ids=ids).logits, labels)[0]
            return torch.autograd.grad(loss, [gh, gn])

        ones_h = torch.ones(1, shape.layers, shape.heads, dtype=torch.float64)
        ones_n = torch.ones(1, shape.layers, shape.neurons, dtype=torch.float64)
        gh, gn = gate_grad(ones_h, ones_n)
        eps = 1e-4
        plus = gate_grad(ones_h + eps * gh, ones_n + eps * gn)
        minus = gate_grad(ones_h - eps * gh, ones_n - eps * gn)
        hvp_h, hvp_n = ((p - m) / (2 * eps) for p, m in zip(plus, minus, strict=True))
        torch.testing.assert_close(heads[i:i + 1], -hvp_h.float(), rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(neurons[i:i + 1], -hvp_n.float(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_deterministic_under_a_seed(model, examples, name):
    shape = Shape.of(model.config)
    batch = collate(examples, 1)
    runs = [score_batch(model, batch, get_criterion(name), shape, torch.Generator().manual_seed(7))
            for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_random_control_follows_the_seed(model, examples):
    shape = Shape.of(model.config)
    batch = collate(examples, 1)
    one = score_batch(model, batch, get_criterion("random"), shape, torch.Generator().manual_seed(1))[1]
    two = score_batch(model, batch, get_criterion("random"), shape, torch.Generator().manual_seed(2))[1]
    assert not torch.equal(one, two) and one.min() >= 0 and one.max() < 1
