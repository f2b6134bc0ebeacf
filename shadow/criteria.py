"""Importance criteria: per-example scores of every attention head and FFN neuron.

A criterion scores the units of one layer from what the scoring pass captured there (``Units``). Heads and
neurons share one layout, ``(B, T, U, k)``: a head is a unit with k = d dimensions (its slice of the input of
``self_attn.out_proj``), a neuron a unit with k = 1 (its ReLU output, the input of ``fc2``). So most criteria
are one formula for both kinds. Gradients are of each example's own loss: one backward pass of the summed loss
gives them for the whole batch, since examples do not interact. Sums over tokens skip padding. Higher scores
mean "keep": the policy keeps each example's top scores.

Definitions follow ShadowLLM (arXiv 2406.16635) and the papers it borrows from (``textbook``). What ShadowLLM's
reference code (abdelfattah-lab/shadow_llm, ``lm_eval/base.py``; batch size 1, so every token of an example)
computed is the ``reference`` variant (criterion.variant=reference), for every criterion that code had; where it
computed the textbook form, ``reference`` is the same Criterion.

Heads (per layer, head h; a, g: its slice and gradient) and neurons (per layer, neuron n; z, g; u: the fc1 output
before the ReLU, z = ReLU(u)); G = Σ_t <a_t, g_t> (Σ_t z_t g_t) is ∂L/∂gate of a multiplicative gate on the unit:
- plainact: Σ_t |<a_t, g_t>| and Σ_t |z_t g_t|. reference: neurons by Σ_j |W1 ⊙ ∂L/∂W1|[n, j] (fc1 weights).
- fisher: Fisher pruning (Theis et al. 2018): Δ = ½ G², the loss change estimated for removing the unit.
  reference: per element, Σ_dims mean_t (a g)² and mean_t (z g)² (the reference's (u ∂L/∂u)² equals (z g)²).
- grad_norm: ‖g‖ over tokens and dims; neurons ‖∂L/∂W1[n, :]‖. reference: same as textbook.
- l2_norm: ‖a‖ over tokens and dims and ‖z‖ over tokens; no gradient. reference: heads the same, neurons ‖u‖
  over tokens (before the ReLU, so negative pre-activations count too).
- snip: |G| = |∂L/∂gate|. reference: Σ_t Σ_{e ∈ h} |∂L/∂o_t,e| (o: out_proj output) and Σ_t |∂L/∂u_t,n|.
- grasp: +H g at gate θ = 1, H the Hessian of the example's loss over all its gates and g = ∂L/∂θ. GraSP
  (Wang et al. 2020) removes the units with the largest −θ ⊙ Hg, so keeping the highest +Hg drops those first.
  Computed by ``traces.gate_hessian_scores``; the reference's version was defective (see REFERENCE.md), none here.
- nwot: log det(I + UᵀU) with U = [c, 1 − c], c_t = 1[a_t > 0] ∈ {0,1}^k the unit's binary pattern at token t.
  reference: the per-example kernel of the reference's code, K = (1 − x)(1 − x)ᵀ over the batch, is 1 × 1 at its
  batch size 1: heads log(Σ_t,dims 1[a ≤ 0]) (−inf when the head has no non-positive entry, as its slogdet
  gives); neurons log(mean_t 1[u ≤ 0]), or 0 when the neuron is active on every token (the reference adds its
  −inf to the static score only, not to the per-example trace).
- jacov (heads only): −mean_i [log(λ_i + k) + 1/(λ_i + k)], k = 1e-5, over the non-null eigenvalues λ of the
  correlation matrix of the head's per-token gradient vectors (Mellor et al.). With T tokens and d dims the
  matrix has rank ≤ d − 1, so T − d + 1 of its eigenvalues are zero up to rounding: each would add ≈ 1/k = 1e5,
  making the textbook sum a token count. Eigenvalues at or below numpy.linalg.matrix_rank's tolerance,
  λ_max · max(T, d) · eps(dtype), are null; the mean (not the sum) keeps layers with different numbers of reached
  tokens comparable. No reference variant: the reference saved no per-example traces for it.
- epenas (heads only): EPE-NAS (Lopes et al. 2021) as its authors' ``eval_score_perclass``: the classes are the
  target token ids, so their number is the vocabulary (> 100) and the > 100 branch applies. Per class c with at
  least two member tokens (the code's ``len`` of a single member's 0-d correlation raises and skips it),
  e_c = Σ_ij log(|corr_c,ij| + k) / n_c over the correlations of its members' gradient vectors; score =
  Σ_c Σ_c' |e_c − e_c'| / C, C the number of classes scored (0 when none).
  reference: ShadowLLM's ``calculate_epenas`` on one example: the members are the gold continuation's targets
  only (gradient at position t grouped by the label at t + 1), classes need more than 4 members, s_c is not
  divided by n_c, a class whose correlation is NaN (a constant gradient vector) is skipped, and score =
  Σ_c Σ_c' |s_c − s_c'| without division. The reference pooled 10 examples into one static score; per example
  a continuation rarely repeats a token five times, so most examples score 0.
- random: uniform noise. weight_magnitude: ‖W_V[h]‖·‖W_O[:, h]‖ and ‖W1[n, :]‖·‖W2[:, n]‖, static.

jacov and textbook epenas use only the tokens whose gradient is not zero: in late layers the context tokens
cannot reach the loss. A constant gradient vector counts as uncorrelated with every vector there. nwot's identity
keeps the log-determinant finite when a unit has fewer distinct patterns than tokens; with k = 1 it is
log(1 + active tokens) + log(1 + inactive tokens). Head-only criteria keep every neuron.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

EPS = 1e-5


@dataclass
class Units:
    """What the scoring pass captured for one kind of unit in one layer."""

    act: Tensor  # (B, T, U, k)
    grad: Tensor | None  # (B, T, U, k): ∂L_b/∂act
    valid: Tensor  # (B, T): 1 at real tokens
    weights: dict[str, Tensor] = field(default_factory=dict)  # the layer's weights the criterion asked for
    fc1_input: Tensor | None = None  # (B, T, E), neurons only, for weight-gradient forms
    fc1_output: Tensor | None = None  # (B, T, F, 1) u, before the ReLU, neurons only
    out_grad: Tensor | None = None  # (B, T, U, k) ∂L/∂(out_proj output) in head chunks, heads only
    targets: Tensor | None = None  # (B, T) next-token ids (-100: none)
    labels: Tensor | None = None  # (B, T) next-token ids inside the gold continuation, the loss's (-100: none)
    generator: torch.Generator | None = None


Score = Callable[[Units], Tensor]  # → (B, U)


@dataclass(frozen=True)
class Criterion:
    name: str
    heads: Score | None  # None: scored by the gate Hessian (grasp)
    neurons: Score | None  # None: scored by the gate Hessian, or not at all (heads_only)
    needs: frozenset[str] = frozenset()  # grad, fc1_input, fc1_output, out_grad, targets, labels, weights, hessian
    heads_only: bool = False  # no neuron definition: every neuron is kept


def _tokens(u: Units) -> Tensor:
    """(B, T, 1, 1): broadcasts the token mask over units and dims."""
    return u.valid[..., None, None]


def _gate_grad(u: Units) -> Tensor:
    """(B, U) ∂L/∂gate of a multiplicative gate on each unit: Σ_t <act_t, grad_t> over valid tokens."""
    return ((u.act * u.grad).sum(-1) * u.valid[..., None]).sum(1)


def _plainact(u: Units) -> Tensor:
    return ((u.act * u.grad).sum(-1).abs() * u.valid[..., None]).sum(1)


def _fisher(u: Units) -> Tensor:
    return 0.5 * _gate_grad(u) ** 2


def _fisher_elementwise(u: Units) -> Tensor:
    count = u.valid.sum(1).clamp(min=1)[:, None]
    return ((u.act * u.grad) ** 2 * _tokens(u)).sum(1).sum(-1) / count


def _grad_norm(u: Units) -> Tensor:
    return (u.grad ** 2 * _tokens(u)).sum((1, 3)).sqrt()


def _token_norm(x: Tensor, u: Units) -> Tensor:
    """(B, U) norm of (B, T, U, k) ``x`` over valid tokens and dims."""
    return (x ** 2 * _tokens(u)).sum((1, 3)).sqrt()


def _l2_norm(u: Units) -> Tensor:
    return _token_norm(u.act, u)


def _l2_norm_pre_relu(u: Units) -> Tensor:
    return _token_norm(u.fc1_output, u)


def _snip(u: Units) -> Tensor:
    return _gate_grad(u).abs()


def _fc1_weight_grad(u: Units) -> Tensor:
    """(B, F, E) per-example ∂L/∂W1: Σ_t ∂L/∂u_t,n · x_t,j, with ∂L/∂u = ∂L/∂z · 1[z > 0] for ReLU."""
    grad_u = u.grad[..., 0] * (u.act[..., 0] > 0) * u.valid[..., None]
    return torch.einsum("btf,bte->bfe", grad_u, u.fc1_input)


def _plainact_weight(u: Units) -> Tensor:
    return (u.weights["fc1"][None] * _fc1_weight_grad(u)).abs().sum(-1)


def _grad_norm_weight(u: Units) -> Tensor:
    return _fc1_weight_grad(u).norm(dim=-1)


def _snip_reference_heads(u: Units) -> Tensor:
    return (u.out_grad.abs() * _tokens(u)).sum((1, 3))


def _snip_reference_neurons(u: Units) -> Tensor:
    return ((u.grad[..., 0] * (u.act[..., 0] > 0)).abs() * u.valid[..., None]).sum(1)


def _nwot(u: Units) -> Tensor:
    """log det(I + UᵀU) per (example, unit), U = [c, 1 − c] the unit's binary codes over valid tokens."""
    codes = (u.act > 0).to(u.act.dtype)
    cat = (torch.cat([codes, 1 - codes], dim=-1) * _tokens(u)).permute(0, 2, 1, 3)  # (B, U, T, 2k)
    gram = cat.transpose(-1, -2) @ cat
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.linalg.slogdet(eye + gram).logabsdet


def _inactive(x: Tensor, u: Units) -> Tensor:
    """(B, U) count of the valid entries of (B, T, U, k) ``x`` that are not positive."""
    return ((x <= 0) * _tokens(u)).sum((1, 3))


def _nwot_reference_heads(u: Units) -> Tensor:
    return _inactive(u.act, u).log()


def _nwot_reference_neurons(u: Units) -> Tensor:
    share = _inactive(u.act, u) / u.valid.sum(1, keepdim=True).clamp(min=1)
    return torch.where(share > 0, share.log(), torch.zeros_like(share))  # the reference's trace skips log 0


def _correlations(vectors: Tensor) -> Tensor:
    """(..., n, k) → (..., n, n) Pearson correlations between the n vectors (zero for constant vectors)."""
    centred = vectors - vectors.mean(-1, keepdim=True)
    normed = centred / centred.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return normed @ normed.transpose(-1, -2)


def _reached(u: Units) -> Tensor:
    """(B, T) tokens whose gradient is not identically zero: those from which the loss can be reached."""
    return (u.valid > 0) & (u.grad.abs().sum((2, 3)) > 0)


def _eigvalsh(matrices: Tensor) -> Tensor:
    """Batched symmetric eigenvalues. On the CPU, one thread: multithreaded LAPACK on many small matrices was
    measured 700× slower here (8 × 200 × 200: 12.6 s against 0.017 s)."""
    if matrices.device.type != "cpu":
        return torch.linalg.eigvalsh(matrices)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigvalsh(matrices)
    finally:
        torch.set_num_threads(threads)


def _jacov(u: Units) -> Tensor:
    """Per head: −mean [log(λ + k) + 1/(λ + k)] over the non-null eigenvalues of its gradient correlations."""
    out = torch.zeros(u.act.shape[0], u.act.shape[2], dtype=u.act.dtype, device=u.act.device)
    reached = _reached(u)
    for b in range(u.act.shape[0]):
        grads = u.grad[b, reached[b]].transpose(0, 1)  # (U, T_b, k)
        eig = _eigvalsh(_correlations(grads))  # ascending
        tolerance = eig[:, -1:] * max(grads.shape[1:]) * torch.finfo(eig.dtype).eps  # numpy's matrix_rank
        kept = eig > tolerance
        terms = torch.where(kept, (eig + EPS).log() + 1 / (eig + EPS), torch.zeros_like(eig))
        out[b] = -terms.sum(-1) / kept.sum(-1).clamp(min=1)
    return out


@dataclass
class _Class:
    log_corr: Tensor  # (U,) Σ_ij log(|corr_ij| + k) over the correlations of the members' vectors
    members: int
    constant: Tensor  # (U,) some member's vector is constant: numpy's correlation is NaN


def _classes(grads: Tensor, labels: Tensor, min_members: int) -> list[_Class]:
    """The classes of ``labels`` (n,) with at least ``min_members`` members, over grads (U, n, k)."""
    out = []
    for label in labels.unique():
        group = grads[:, labels == label]
        if group.shape[1] >= min_members:
            out.append(_Class((_correlations(group).abs() + EPS).log().sum((-1, -2)), group.shape[1],
                              (group == group[..., :1]).all(-1).any(-1)))
    return out


def _pairwise_spread(scores: Tensor, present: Tensor) -> Tensor:
    """Σ_c Σ_c' |s_c − s_c'| over the classes present for each unit: scores, present (C, U) → (U,)."""
    both = present[:, None] & present[None]
    return ((scores[:, None] - scores[None]).abs() * both).sum((0, 1))


def _epenas(u: Units) -> Tensor:
    """Per head: EPE-NAS over its reached tokens' gradients, classed by target token (> 100 classes branch)."""
    out = torch.zeros(u.act.shape[0], u.act.shape[2], dtype=u.act.dtype, device=u.act.device)
    reached = _reached(u)
    for b in range(u.act.shape[0]):
        keep = reached[b] & (u.targets[b] >= 0)
        classes = _classes(u.grad[b, keep].transpose(0, 1), u.targets[b, keep], min_members=2)
        if classes:
            scores = torch.stack([c.log_corr / c.members for c in classes])  # (C, U)
            out[b] = _pairwise_spread(scores, torch.ones_like(scores, dtype=torch.bool)) / len(classes)
    return out


def _epenas_reference(u: Units) -> Tensor:
    """Per head: ShadowLLM's calculate_epenas on one example (gold-continuation targets, > 4 members per class)."""
    out = torch.zeros(u.act.shape[0], u.act.shape[2], dtype=u.act.dtype, device=u.act.device)
    for b in range(u.act.shape[0]):
        keep = (u.labels[b] >= 0) & (u.valid[b] > 0)
        classes = _classes(u.grad[b, keep].transpose(0, 1), u.labels[b, keep], min_members=5)
        if classes:
            present = ~torch.stack([c.constant for c in classes])  # the reference skips NaN class scores
            out[b] = _pairwise_spread(torch.stack([c.log_corr for c in classes]), present)
    return out


def _random(u: Units) -> Tensor:
    shape = (u.act.shape[0], u.act.shape[2])
    return torch.rand(shape, generator=u.generator).to(u.act.device)


def _weight_magnitude_heads(u: Units) -> Tensor:
    H = u.act.shape[2]
    value = u.weights["v_proj"].view(H, -1).norm(dim=-1)  # rows of W_V that produce head h
    output = u.weights["out_proj"].view(u.weights["out_proj"].shape[0], H, -1).norm(dim=(0, 2))
    return (value * output)[None].expand(u.act.shape[0], H)


def _weight_magnitude_neurons(u: Units) -> Tensor:
    score = u.weights["fc1"].norm(dim=1) * u.weights["fc2"].norm(dim=0)
    return score[None].expand(u.act.shape[0], -1)


GRAD = frozenset({"grad"})
_GRAD_NORM = Criterion("grad_norm", _grad_norm, _grad_norm_weight, frozenset({"grad", "fc1_input"}))
CRITERIA: dict[str, dict[str, Criterion]] = {
    "plainact": {"textbook": Criterion("plainact", _plainact, _plainact, GRAD),
                 "reference": Criterion("plainact", _plainact, _plainact_weight,
                                        frozenset({"grad", "fc1_input", "weights"}))},
    "fisher": {"textbook": Criterion("fisher", _fisher, _fisher, GRAD),
               "reference": Criterion("fisher", _fisher_elementwise, _fisher_elementwise, GRAD)},
    "grad_norm": {"textbook": _GRAD_NORM, "reference": _GRAD_NORM},
    "l2_norm": {"textbook": Criterion("l2_norm", _l2_norm, _l2_norm),
                "reference": Criterion("l2_norm", _l2_norm, _l2_norm_pre_relu, frozenset({"fc1_output"}))},
    "snip": {"textbook": Criterion("snip", _snip, _snip, GRAD),
             "reference": Criterion("snip", _snip_reference_heads, _snip_reference_neurons,
                                    frozenset({"grad", "out_grad"}))},
    "grasp": {"textbook": Criterion("grasp", None, None, frozenset({"hessian"}))},
    "nwot": {"textbook": Criterion("nwot", _nwot, _nwot),
             "reference": Criterion("nwot", _nwot_reference_heads, _nwot_reference_neurons)},
    "jacov": {"textbook": Criterion("jacov", _jacov, None, GRAD, heads_only=True)},
    "epenas": {"textbook": Criterion("epenas", _epenas, None, frozenset({"grad", "targets"}), heads_only=True),
               "reference": Criterion("epenas", _epenas_reference, None, frozenset({"grad", "labels"}),
                                      heads_only=True)},
    "random": {"textbook": Criterion("random", _random, _random)},
    "weight_magnitude": {"textbook": Criterion("weight_magnitude", _weight_magnitude_heads,
                                               _weight_magnitude_neurons, frozenset({"weights"}))},
}


def get_criterion(name: str, variant: str = "textbook") -> Criterion:
    return CRITERIA[name][variant]
