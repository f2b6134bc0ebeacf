"""Every criterion against a direct computation on a tiny OPT and a tiny Llama (grouped-query attention, gated
FFN), one unpadded example at a time.

The batched scores come from padded batches of the examples; the reference values from each example alone,
with autograd's own weight gradients, explicit loops, numpy and finite differences where they apply. EPE-NAS and
ShadowLLM's reference forms are ported line by line in numpy from their authors' code (``epe_nas_code``,
``shadow_llm_epenas``, ``shadow_llm_nwot_*``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    ALL_CASES,
    HALF_AGREEMENT,
    layers_of,
    make_tiny_llama,
    make_tiny_opt,
    per_layer_agreement,
    settings,
    shape_of,
)

from shadow.arch import Activation, Shape, family_of
from shadow.criteria import CRITERIA, EPS, Units, get_criterion
from shadow.data import Example, collate, encode
from shadow.masking import apply_masks
from shadow.policy import Masks, Policy
from shadow.traces import example_loss, score_batch

PAIRS = [("The the cat and the dog and the cat", " sat on the mat."),
         ("To be, or not to be, that is", " the question, to be sure."),
         ("We the people of the United States, in order to form a more perfect", " union, the people"),
         # " the" and "," are the targets of six and five continuation tokens: classes of ShadowLLM's epenas
         ("One morning the old man walked down to the river with his dog", " the sky, the sea, the sun, the cat, "
                                                                          "the dog, the end")]


@pytest.fixture(scope="module", params=["opt", "llama"])
def model(request):
    """Head size 4 in both; the Llama's 4 query heads share 2 key-value heads and its FFN is gated."""
    if request.param == "opt":
        return make_tiny_opt(dtype=torch.float64)
    return make_tiny_llama(hidden=16, ffn=32, dtype=torch.float64)


@pytest.fixture(scope="module")
def tiny_opt64():
    return make_tiny_opt(dtype=torch.float64)


@pytest.fixture(scope="module")
def examples(tokenizer):
    return [encode(c, x, tokenizer, 64) for c, x in PAIRS]


def autograd_record(model, ex: Example) -> dict:
    """One example alone, from plain autograd: per layer the heads' outputs a and the output projection's output o,
    the activation's input (pre: OPT's u, a gated FFN's g), the up projection's output of a gated FFN, the FFN units'
    activations z (the down projection's input), their gradients, and the FFN row projections' weight gradients."""
    batch = collate([ex], 1)
    acts, handles = {}, []
    family = family_of(model.config)

    def keep(name, output=False):
        def hook(module, *args):
            tensor = args[-1] if output else args[0][0]
            tensor.retain_grad()
            acts[name] = tensor
        return hook

    for i, layer in enumerate(layers_of(model)):
        handles += [family.head_output(layer).register_forward_pre_hook(keep(("a", i))),
                    family.head_output(layer).register_forward_hook(keep(("o", i), output=True)),
                    family.ffn_input(layer).register_forward_hook(keep(("pre", i), output=True)),
                    family.ffn_output(layer).register_forward_pre_hook(keep(("z", i)))]
        if family.gated:
            handles.append(family.module(layer, "up").register_forward_hook(keep(("up", i), output=True)))
    model.zero_grad()
    try:
        example_loss(model(input_ids=batch.input_ids).logits, batch.labels)[0].backward()
    finally:
        for h in handles:
            h.remove()
    row_grads = [{role: family.module(layer, role).weight.grad.clone() for role in family.neuron_rows}
                 for layer in layers_of(model)]
    model.zero_grad()
    return {"acts": acts, "row_grads": row_grads, "ids": batch.input_ids[0], "labels": batch.labels[0]}


@pytest.fixture(scope="module")
def alone(model, examples):
    return [autograd_record(model, ex) for ex in examples]


def heads_of(t: torch.Tensor, shape: Shape) -> torch.Tensor:
    return t.detach()[0].view(-1, shape.query_heads, t.shape[-1] // shape.query_heads)  # (T, H, chunk)


def nwot_direct(codes: np.ndarray) -> float:
    """log det(I_T + K) with the kernel over tokens, K = C Cᵀ + (1 − C)(1 − C)ᵀ."""
    kernel = codes @ codes.T + (1 - codes) @ (1 - codes).T
    return np.linalg.slogdet(np.eye(len(codes)) + kernel)[1]


def shadow_llm_nwot_head(act: np.ndarray) -> float:
    """ShadowLLM's calculate_nwot for one head at batch size 1: x the (1, T·d) flattened pattern."""
    x = (act > 0).astype(float).reshape(1, -1)
    return np.linalg.slogdet((1 - x) @ (1 - x).T)[1]


def shadow_llm_nwot_neuron(pre: np.ndarray) -> float:
    """ShadowLLM's calculate_nwot for one fc1 neuron (gated: its gate) at batch size 1 (its per-example trace, which
    skips log 0)."""
    x = (pre > 0).astype(float)  # (T, 1)
    value = np.diag((1 - x).T @ (1 - x))[0] / len(x)
    return np.log(value) if value > 0 else 0.0


def epe_nas_code(jacobs: np.ndarray, labels: list[int], n_classes: int) -> float:
    """EPE-NAS's eval_score_perclass (VascoLopes/EPE-NAS, search.py), in the same steps."""
    per_class: dict[int, np.ndarray] = {}
    for row, label in zip(jacobs, labels, strict=True):
        per_class[label] = np.vstack((per_class[label], row)) if label in per_class else row
    scores = {}
    for label, rows in per_class.items():
        try:
            corrs = np.array(np.corrcoef(rows))
            s = np.sum(np.log(np.abs(corrs) + EPS))
            if n_classes > 100:
                s /= len(corrs)  # a single member's 0-d correlation has no len: skipped, as in the original
        except TypeError:
            continue
        scores[label] = s
    if n_classes <= 100:
        return float(sum(abs(s) for s in scores.values()))
    spread = sum(abs(scores[c] - scores[cj]) for c in scores for cj in scores)
    return float(spread / len(scores)) if scores else 0.0


def shadow_llm_epenas(grad: np.ndarray, labels: list[int]) -> float:
    """ShadowLLM's calculate_epenas for one head on one example: labels[i] is the loss's target of position i − 1."""
    per_class: dict[int, list[np.ndarray]] = {}
    for index, label in enumerate(labels):
        if label != -100:
            per_class.setdefault(label, []).append(grad[index - 1])
    scores = {}
    for label, rows in per_class.items():
        if len(rows) > 4:
            with np.errstate(invalid="ignore", divide="ignore"):
                s = np.sum(np.log(np.abs(np.corrcoef(np.array(rows))) + 1e-5))
            if not np.isnan(s):
                scores[label] = s
    return float(sum(abs(scores[c] - scores[cj]) for c in scores for cj in scores))


def jacov_direct(grads: np.ndarray) -> float:
    """−mean [log(λ + k) + 1/(λ + k)] over the eigenvalues of np.corrcoef above matrix_rank's tolerance."""
    eig = np.linalg.eigvalsh(np.atleast_2d(np.corrcoef(grads)))
    kept = eig[eig > eig.max() * max(grads.shape) * np.finfo(eig.dtype).eps]
    return float(-np.mean(np.log(kept + EPS) + 1 / (kept + EPS))) if len(kept) else 0.0


def reached_tokens(a_grad: torch.Tensor, shape: Shape) -> list[int]:
    grad = heads_of(a_grad, shape)
    return [t for t in range(len(grad)) if grad[t].abs().sum() > 0]


def expected(name: str, variant: str, kind: str, layer: int, unit: int, rec: dict, model, shape: Shape) -> float:
    """The score of one query head or FFN unit, from its definition."""
    family = family_of(model.config)
    a, o = rec["acts"][("a", layer)], rec["acts"][("o", layer)]
    z, pre, *ups = ((x.detach().view(-1, x.shape[-1]), x.grad.view(-1, x.shape[-1]))  # (T, F): OPT flattens
                    for x in (rec["acts"][(k, layer)] for k in ("z", "pre", "up") if (k, layer) in rec["acts"]))
    row_outputs = [pre, *ups]  # the gate's and the up projection's outputs, or OPT's up
    if kind == "heads":
        act, grad = heads_of(a, shape)[:, unit], heads_of(a.grad, shape)[:, unit]  # (T, d)
    else:
        act, grad = z[0][:, unit:unit + 1], z[1][:, unit:unit + 1]  # (T, 1)
    block = layers_of(model)[layer]
    rows = {role: family.module(block, role).weight.detach()[unit] for role in family.neuron_rows}
    row_grads = {role: grad[unit] for role, grad in rec["row_grads"][layer].items()}
    if name == "plainact" and variant == "reference" and kind == "neurons":
        return sum((rows[role] * row_grads[role]).abs().sum().item() for role in rows)
    if name == "plainact":
        return sum(abs((act[t] * grad[t]).sum().item()) for t in range(len(act)))
    if name == "fisher" and variant == "reference":
        return ((act * grad) ** 2).mean(0).sum().item()
    if name == "fisher":
        return 0.5 * sum((act[t] * grad[t]).sum().item() for t in range(len(act))) ** 2
    if name == "grad_norm":
        return torch.cat(list(row_grads.values())).norm().item() if kind == "neurons" else grad.norm().item()
    if name == "l2_norm" and variant == "reference" and kind == "neurons":
        return pre[0][:, unit].norm().item()
    if name == "l2_norm":
        return act.norm().item()
    if name == "snip" and variant == "reference":
        if kind == "heads":
            return heads_of(o.grad, shape)[:, unit].abs().sum().item()
        return sum(grad[:, unit].abs().sum().item() for _, grad in row_outputs)
    if name == "snip":
        return abs((act * grad).sum().item())
    if name == "nwot" and variant == "reference":
        if kind == "heads":
            return shadow_llm_nwot_head(act.numpy())
        return shadow_llm_nwot_neuron(pre[0][:, unit:unit + 1].numpy())
    if name == "nwot":
        passing = pre[0][:, unit:unit + 1] if kind == "neurons" and family.gated else act  # ReLU: z > 0
        return nwot_direct((passing > 0).double().numpy())
    if name == "jacov":
        return jacov_direct(grad[reached_tokens(a.grad, shape)].numpy())
    if name == "epenas" and variant == "reference":
        return shadow_llm_epenas(grad.numpy(), rec["labels"].tolist())
    if name == "epenas":
        reached = reached_tokens(a.grad, shape)
        rows = [t for t in reached if t + 1 < len(rec["ids"])]  # a target exists: every token but the last
        return epe_nas_code(grad[rows].numpy(), rec["ids"][[t + 1 for t in rows]].tolist(), model.config.vocab_size)
    if name == "weight_magnitude":
        if kind == "neurons":
            return (torch.cat(list(rows.values())).norm() * family.ffn_output(block).weight[:, unit].norm()).item()
        d, kv = shape.head_dim, unit // shape.group_size  # the key-value head the query head reads
        return (family.module(block, "value").weight[kv * d:(kv + 1) * d].norm()
                * family.head_output(block).weight[:, unit * d:(unit + 1) * d].norm()).item()
    raise AssertionError(name)


CASES = [(name, variant) for name in sorted(CRITERIA) for variant in CRITERIA[name]
         if name not in ("grasp", "random")]


@pytest.mark.parametrize("name,variant", CASES)
def test_criterion_matches_direct_computation(model, examples, alone, name, variant):
    check_against_direct(model, examples, alone, name, variant, neuron_step=5)


@pytest.fixture(scope="module")
def qwen2_mha(examples):
    """A tiny Qwen2: biased query, key and value projections, and as many key-value heads as query heads."""
    model = make_tiny_llama("qwen2", kv_heads=4, hidden=16, ffn=32, dtype=torch.float64)
    return model, examples, [autograd_record(model, ex) for ex in examples]


@pytest.mark.parametrize("name,variant", CASES)
def test_criterion_matches_direct_computation_with_biases_and_without_grouping(qwen2_mha, name, variant):
    check_against_direct(*qwen2_mha, name, variant, neuron_step=5)


@pytest.fixture(scope="module")
def llama_mini():
    """The trained llama-mini in float64 and one example in its own tokenizer, with its autograd record."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shadow.llama_mini import MODEL_DIR

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float64).eval()
    examples = [encode(*PAIRS[3], AutoTokenizer.from_pretrained(MODEL_DIR), 64)]
    return model, examples, [autograd_record(model, examples[0])]


@pytest.mark.parametrize("name,variant", CASES)
def test_criterion_matches_direct_computation_on_llama_mini(llama_mini, name, variant):
    check_against_direct(*llama_mini, name, variant, neuron_step=37)


def check_against_direct(model, examples, alone, name, variant, neuron_step: int) -> None:
    """Every query head's score and every ``neuron_step``-th FFN unit's, batched, against ``expected``."""
    shape = shape_of(model, "query_head")
    criterion = get_criterion(name, variant)
    _, heads, neurons = score_batch(model, collate(examples, 1), criterion, shape)
    assert heads.abs().sum() > 0  # not vacuous: every criterion scores some head of these examples
    for i, rec in enumerate(alone):
        for layer in range(shape.layers):
            for unit in range(shape.query_heads):
                want = expected(name, variant, "heads", layer, unit, rec, model, shape)
                assert heads[i, layer, unit].item() == pytest.approx(want, rel=1e-4, abs=1e-6), (i, layer, unit)
            if criterion.heads_only:
                assert (neurons[i] == 0).all()
                continue
            for unit in range(0, shape.neurons, neuron_step):
                want = expected(name, variant, "neurons", layer, unit, rec, model, shape)
                assert neurons[i, layer, unit].item() == pytest.approx(want, rel=1e-4, abs=1e-6), (i, layer, unit)


@pytest.mark.parametrize("name", ["plainact", "l2_norm", "weight_magnitude"])
def test_a_key_value_group_scores_the_sum_of_its_query_heads(model, examples, name):
    criterion = get_criterion(name, "textbook")
    batch = collate(examples, 1)
    _, per_query_head, neurons = score_batch(model, batch, criterion, shape_of(model, "query_head"))
    group = shape_of(model, "kv_group")
    _, per_group, same_neurons = score_batch(model, batch, criterion, group)
    assert per_group.shape[-1] == group.kv_heads
    torch.testing.assert_close(per_group, per_query_head.view(*per_group.shape, group.group_size).sum(-1))
    assert torch.equal(neurons, same_neurons)


def test_every_reference_criterion_has_a_reference_variant():
    """criterion.variant=reference exists for every criterion ShadowLLM's code had, and only for those."""
    assert {name for name in CRITERIA if "reference" in CRITERIA[name]} == {
        "plainact", "fisher", "grad_norm", "l2_norm", "snip", "nwot", "epenas"}
    assert get_criterion("grad_norm", "reference") is get_criterion("grad_norm", "textbook")  # the reference's own form


def test_reference_epenas_skips_a_class_with_a_constant_gradient():
    """ShadowLLM's epenas drops a class whose numpy correlation is NaN: here class 7 holds a zero gradient vector."""
    targets = torch.tensor([7, 7, 7, 7, 7, 9, 9, 9, 9, 9, 9, 3, 3, 3, 3, 3, -100], dtype=torch.long)
    labels = [-100] + targets[:-1].tolist()  # the reference's layout: the label of position t sits at t + 1
    grad = torch.randn(1, len(targets), 1, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scores = []
    for row in (torch.zeros(4, dtype=torch.float64), grad[0, 2, 0].clone()):
        grad[0, 2, 0] = row
        units = Units(act=torch.zeros_like(grad), grad=grad, valid=torch.ones(1, len(targets)),
                      activation=Activation("relu"), labels=targets[None])
        scores.append(get_criterion("epenas", "reference").heads(units)[0, 0].item())
        assert scores[-1] == pytest.approx(shadow_llm_epenas(grad[0, :, 0].numpy(), labels), rel=1e-6)
    assert 0 < scores[0] != pytest.approx(scores[1])  # two classes left, then all three


@pytest.fixture(scope="module")
def grasp_fd(model, examples):
    """Per example: GraSP's scores from score_batch and H g by finite differences of the gate gradient g at 1, on
    the five-point stencil H g ≈ (−∇L(1 + 2εg) + 8∇L(1 + εg) − 8∇L(1 − εg) + ∇L(1 − 2εg)) / 12ε. OPT computes in
    float64 throughout but its ReLU has kinks that a large step would cross: ε = 1e-4. Llama is smooth but its
    RMSNorm computes in float32 even in a float64 model, so its gradients carry float32 rounding: ε = 1e-2 keeps both
    that rounding over ε and the stencil's O(ε⁴) error near 1e-5."""
    shape = shape_of(model)
    batch = collate(examples, 1)
    _, heads, neurons = score_batch(model, batch, get_criterion("grasp", "textbook"), shape)
    assert model.config._attn_implementation == "sdpa"  # restored after the double backward
    out = []
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
        eps = 1e-2 if family_of(model.config).gated else 1e-4
        at = {k: gate_grad(ones_h + k * eps * gh, ones_n + k * eps * gn) for k in (-2, -1, 1, 2)}
        hvp_h, hvp_n = ((-at[2][i] + 8 * at[1][i] - 8 * at[-1][i] + at[-2][i]) / (12 * eps) for i in range(2))
        out.append({"heads": heads[i:i + 1], "neurons": neurons[i:i + 1], "hvp_h": hvp_h, "hvp_n": hvp_n})
    return out


def test_grasp_matches_finite_differences_of_the_gate_gradient(grasp_fd):
    """The score is +θ ⊙ Hg = +Hg at θ = 1."""
    for rec in grasp_fd:
        torch.testing.assert_close(rec["heads"], rec["hvp_h"].float(), rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(rec["neurons"], rec["hvp_n"].float(), rtol=1e-3, atol=1e-6)


def test_grasp_policy_drops_what_grasp_removes_first(model, grasp_fd):
    """GraSP removes the unit with the largest −θ ⊙ Hg (finite differences); dropping one unit per layer, the policy
    drops exactly that one. The former score −Hg would have dropped the unit with the smallest −θ ⊙ Hg."""
    shape = shape_of(model)
    policy = Policy("local", head_sparsity=1 / shape.heads, neuron_sparsity=1 / shape.neurons)
    for rec in grasp_fd:
        masks = policy.select(rec["heads"], rec["neurons"])
        for kept, hvp in ((masks.heads, rec["hvp_h"]), (masks.neurons, rec["hvp_n"])):
            removal = -hvp[0]  # (L, U): GraSP's removal priority
            first = removal.argmax(-1)
            assert (first != removal.argmin(-1)).all()  # the direction decides which unit goes
            assert (~kept[0]).sum(-1).tolist() == [1] * shape.layers
            assert (~kept[0][torch.arange(shape.layers), first]).all()


JACOV_PAIRS = [("One morning the old man walked down to the river with his dog and sat by the water", " to fish."),
               ("We the people of the United States, in order to form a more perfect union, establish", " justice."),
               ("To be, or not to be, that is the question: whether it is nobler in the mind to", " suffer")]


def test_jacov_is_comparable_across_layers(tiny_opt64, tokenizer):
    """Examples of ~20 tokens whose continuation has at most d − 1 = 3 tokens, on heads of d = 4 dims: the last layer
    reaches only the continuation's tokens (no null eigenvalue), the others ~20 (~17 null eigenvalues). The former
    sum over all eigenvalues scored ≈ −1e5 per null eigenvalue, so the layers differed by ~1e5× (checked below with
    numpy); the mean over the non-null spectrum keeps the per-layer median |score| within 10×."""
    model = tiny_opt64
    shape = shape_of(model)
    assert shape.head_dim == 4
    examples = [encode(c, x, tokenizer, 64) for c, x in JACOV_PAIRS]
    assert all(len(ex.input_ids) >= 18 and len(ex.input_ids) - ex.context_len <= 3 for ex in examples)
    _, heads, _ = score_batch(model, collate(examples, 1), get_criterion("jacov", "textbook"), shape)
    medians = heads.abs().transpose(0, 1).reshape(shape.layers, -1).median(-1).values  # over examples and heads
    assert medians.min() > 0 and medians.max() / medians.min() < 10

    def summed(grads: np.ndarray) -> float:
        eig = np.abs(np.linalg.eigvalsh(np.atleast_2d(np.corrcoef(grads)))) + EPS
        return float(-(np.log(eig) + 1 / eig).sum())

    old = np.zeros((len(examples), shape.layers, shape.heads))
    for i, ex in enumerate(examples):
        rec = autograd_record(model, ex)
        for layer in range(shape.layers):
            a_grad = rec["acts"][("a", layer)].grad
            grads = heads_of(a_grad, shape)[reached_tokens(a_grad, shape)]
            old[i, layer] = [summed(grads[:, h].numpy()) for h in range(shape.heads)]
    old_medians = np.median(np.abs(old).transpose(1, 0, 2).reshape(shape.layers, -1), axis=-1)
    assert old_medians.max() / old_medians.min() > 1e3


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_deterministic_under_a_seed(model, examples, name):
    shape = shape_of(model)
    batch = collate(examples, 1)
    runs = [score_batch(model, batch, get_criterion(name, "textbook"), shape, torch.Generator().manual_seed(7))
            for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_random_control_follows_the_seed(model, examples):
    shape = shape_of(model)
    batch = collate(examples, 1)
    one = score_batch(model, batch, get_criterion("random", "textbook"), shape, torch.Generator().manual_seed(1))[1]
    two = score_batch(model, batch, get_criterion("random", "textbook"), shape, torch.Generator().manual_seed(2))[1]
    per_unit = shape.heads_per_unit  # a key-value group sums its query heads' uniform scores
    assert not torch.equal(one, two) and one.min() >= 0 and one.max() < per_unit and two.max() < per_unit




@pytest.fixture(scope="module")
def opt_mini_batch(tokenizer):
    from shadow.data import load_calibration

    return collate(load_calibration(settings("calibration", limit=4), tokenizer, 512)[:4], 1)


@pytest.fixture(scope="module")
def opt_mini_in():
    from transformers import AutoModelForCausalLM

    from shadow.opt_mini import MODEL_DIR

    return {dtype: AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=dtype).eval()
            for dtype in (torch.float32, torch.bfloat16)}


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bfloat16")])
@pytest.mark.parametrize("name,variant", ALL_CASES)
def test_half_precision_ranks_units_as_float32(opt_mini_in, opt_mini_batch, name, variant, dtype):
    """Every criterion on opt-mini in bfloat16 ranks each layer's units as float32 does (scores are accumulated in
    float32; GraSP's gates are float32). float16, which jobs refuse on the CPU, is checked on CUDA (test_gpu.py),
    with its loss-scaled gradients."""
    criterion = get_criterion(name, variant)
    shape = shape_of(opt_mini_in[torch.float32])
    _, full_heads, full_neurons = score_batch(opt_mini_in[torch.float32], opt_mini_batch, criterion, shape)
    _, heads, neurons = score_batch(opt_mini_in[dtype], opt_mini_batch, criterion, shape)
    assert heads.dtype == neurons.dtype == torch.float32 and heads.isfinite().all()
    floor = HALF_AGREEMENT.get(name, 0.95)
    assert per_layer_agreement(heads, full_heads).mean() >= floor
    if not criterion.heads_only:
        assert per_layer_agreement(neurons, full_neurons).mean() >= floor


def test_float16_loss_scaling_recovers_underflowing_gradients():
    """Gradients below float16's smallest subnormal (6e-8) are lost without loss scaling, kept with it; an overflow
    reruns the pass at a smaller scale."""
    from shadow.traces import LossScaling

    grad = torch.full((4,), 1e-8)
    assert LossScaling(torch.float32).unscale(grad.half()).eq(0).all()  # an unscaled float16 backward's gradient
    scaling = LossScaling(torch.float16)
    for scale in scaling:
        kept = scaling.unscale((grad * scale).half())
    assert scale == 2.0 ** 16 and kept.dtype == torch.float32
    assert kept == pytest.approx(grad, rel=1e-3)
    scales = []
    for scale in scaling:  # the first pass overflows
        scales.append(scale)
        scaling.unscale(torch.full((4,), float("inf") if len(scales) == 1 else 1.0).half())
    assert scales == [2.0 ** 16, 2.0 ** 8]
