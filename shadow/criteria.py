"""Importance criteria: per-example scores of every attention head and FFN neuron.

A criterion scores the units of one layer from what the scoring pass captured there (``Units``). Heads and
neurons share one layout, ``(B, T, U, k)``: a head is a unit with k = d dimensions (its slice of the input of
``self_attn.out_proj``), a neuron a unit with k = 1 (its ReLU output, the input of ``fc2``). So most criteria
are one formula for both kinds. Gradients are of each example's own loss: one backward pass of the summed loss
gives them for the whole batch, since examples do not interact. Sums over tokens skip padding.

Definitions follow ShadowLLM (arXiv 2406.16635) and the papers it borrows from; where its reference code
computed something else, that computation is the ``reference`` variant (criterion.variant=reference).

Heads (per layer, head h; a, g: its slice and gradient) and neurons (per layer, neuron n; z, g):
- plainact: Σ_t |<a_t, g_t>| and Σ_t |z_t g_t|. reference: neurons by Σ_j |W1 ⊙ ∂L/∂W1|[n, j] (fc1 weights).
- fisher: Σ_dims mean_t (a g)² and mean_t (z g)².
- grad_norm: ‖g‖ over tokens and dims; neurons ‖∂L/∂W1[n, :]‖.
- l2_norm: ‖a‖ over tokens and dims and ‖z‖ over tokens; no gradient.
- snip: |Σ_t <a, g>| = |∂L/∂gate|, likewise for neurons. reference: Σ_t Σ_{e ∈ h} |∂L/∂o_t,e| (o: out_proj
  output) and Σ_t |∂L/∂u_t,n| (u: fc1 output).
- grasp: −(H g) at gate = 1, the Hessian-gradient product over all gates of the example.
- nwot: log det(I + UᵀU) with U = [c, 1 − c], c_t = 1[a_t > 0] ∈ {0,1}^k the unit's binary pattern at token t.
  reference: the (1 − c) term only.
- jacov (heads only): −Σ_i [log(|λ_i| + 1e-5) + 1/(|λ_i| + 1e-5)], λ the eigenvalues of the correlation matrix
  of the head's per-token gradient vectors.
- epenas (heads only): per-token gradients grouped by target token; Σ over groups of mean_ij log(|corr_ij| + 1e-5).
- random: uniform noise. weight_magnitude: ‖W_V[h]‖·‖W_O[:, h]‖ and ‖W1[n, :]‖·‖W2[:, n]‖, static.

jacov and epenas use only the tokens whose gradient is not zero: in late layers the context tokens cannot reach
the loss. nwot's identity keeps the log-determinant finite when a unit has fewer distinct patterns than tokens;
with k = 1 it is log(1 + active tokens) + log(1 + inactive tokens). Head-only criteria keep every neuron.
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
    out_grad: Tensor | None = None  # (B, T, U, k) ∂L/∂(out_proj output) in head chunks, heads only
    targets: Tensor | None = None  # (B, T) next-token ids (-100: none)
    generator: torch.Generator | None = None


Score = Callable[[Units], Tensor]  # → (B, U)


@dataclass(frozen=True)
class Criterion:
    name: str
    heads: Score | None  # None: scored by the gate Hessian (grasp)
    neurons: Score | None  # None: scored by the gate Hessian, or not at all (heads_only)
    needs: frozenset[str] = frozenset()  # grad, fc1_input, out_grad, targets, weights, hessian
    heads_only: bool = False  # no neuron definition: every neuron is kept


def _tokens(u: Units) -> Tensor:
    """(B, T, 1, 1): broadcasts the token mask over units and dims."""
    return u.valid[..., None, None]


def _plainact(u: Units) -> Tensor:
    return ((u.act * u.grad).sum(-1).abs() * u.valid[..., None]).sum(1)


def _fisher(u: Units) -> Tensor:
    count = u.valid.sum(1).clamp(min=1)[:, None]
    return ((u.act * u.grad) ** 2 * _tokens(u)).sum(1).sum(-1) / count


def _grad_norm(u: Units) -> Tensor:
    return (u.grad ** 2 * _tokens(u)).sum((1, 3)).sqrt()


def _l2_norm(u: Units) -> Tensor:
    return (u.act ** 2 * _tokens(u)).sum((1, 3)).sqrt()


def _snip(u: Units) -> Tensor:
    return ((u.act * u.grad).sum(-1) * u.valid[..., None]).sum(1).abs()


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


def _nwot(u: Units, terms: tuple[bool, bool]) -> Tensor:
    """log det(I + UᵀU) per (example, unit), U the unit's binary codes over valid tokens (and/or their complement)."""
    codes = (u.act > 0).to(u.act.dtype) * _tokens(u)
    parts = [codes] if terms[0] else []
    if terms[1]:
        parts.append((1 - (u.act > 0).to(u.act.dtype)) * _tokens(u))
    cat = torch.cat(parts, dim=-1).permute(0, 2, 1, 3)  # (B, U, T, m)
    gram = cat.transpose(-1, -2) @ cat
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.linalg.slogdet(eye + gram).logabsdet


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
    """Per head: eigenvalues of the correlation of its per-token gradient vectors (Mellor et al.)."""
    out = torch.zeros(u.act.shape[0], u.act.shape[2], dtype=u.act.dtype, device=u.act.device)
    reached = _reached(u)
    for b in range(u.act.shape[0]):
        grads = u.grad[b, reached[b]].transpose(0, 1)  # (U, T_b, k)
        eig = _eigvalsh(_correlations(grads)).abs() + EPS
        out[b] = -(eig.log() + 1 / eig).sum(-1)
    return out


def _epenas(u: Units) -> Tensor:
    """Per head: gradients grouped by target token; mean log-correlation within each group, summed (Lopes et al.)."""
    out = torch.zeros(u.act.shape[0], u.act.shape[2], dtype=u.act.dtype, device=u.act.device)
    reached = _reached(u)
    for b in range(u.act.shape[0]):
        keep = reached[b] & (u.targets[b] >= 0)
        grads, targets = u.grad[b, keep].transpose(0, 1), u.targets[b, keep]  # (U, T_b, k), (T_b,)
        for token in targets.unique():
            group = grads[:, targets == token]
            if group.shape[1] > 1:
                out[b] += (_correlations(group).abs() + EPS).log().mean((-1, -2))
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
CRITERIA: dict[str, dict[str, Criterion]] = {
    "plainact": {"textbook": Criterion("plainact", _plainact, _plainact, GRAD),
                 "reference": Criterion("plainact", _plainact, _plainact_weight,
                                        frozenset({"grad", "fc1_input", "weights"}))},
    "fisher": {"textbook": Criterion("fisher", _fisher, _fisher, GRAD)},
    "grad_norm": {"textbook": Criterion("grad_norm", _grad_norm, _grad_norm_weight,
                                        frozenset({"grad", "fc1_input"}))},
    "l2_norm": {"textbook": Criterion("l2_norm", _l2_norm, _l2_norm)},
    "snip": {"textbook": Criterion("snip", _snip, _snip, GRAD),
             "reference": Criterion("snip", _snip_reference_heads, _snip_reference_neurons,
                                    frozenset({"grad", "out_grad"}))},
    "grasp": {"textbook": Criterion("grasp", None, None, frozenset({"hessian"}))},
    "nwot": {"textbook": Criterion("nwot", lambda u: _nwot(u, (True, True)), lambda u: _nwot(u, (True, True))),
             "reference": Criterion("nwot", lambda u: _nwot(u, (False, True)), lambda u: _nwot(u, (False, True)))},
    "jacov": {"textbook": Criterion("jacov", _jacov, None, GRAD, heads_only=True)},
    "epenas": {"textbook": Criterion("epenas", _epenas, None, frozenset({"grad", "targets"}), heads_only=True)},
    "random": {"textbook": Criterion("random", _random, _random)},
    "weight_magnitude": {"textbook": Criterion("weight_magnitude", _weight_magnitude_heads,
                                               _weight_magnitude_neurons, frozenset({"weights"}))},
}


def get_criterion(name: str, variant: str = "textbook") -> Criterion:
    return CRITERIA[name][variant]
