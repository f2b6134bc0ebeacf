"""What every criterion shares: the captured ``Units``, the typed ``Needs`` of the scoring pass, the registry
and the formulas several criteria use."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Flag, auto

import torch
from torch import Tensor

from shadow.arch import Activation

EPS = 1e-5


class Needs(Flag):
    """What the scoring pass must capture for a criterion, beyond the units' activations."""

    NOTHING = 0
    GRAD = auto()  # ∂L/∂act: one backward pass
    FFN_INPUT = auto()  # x, the FFN's input (weight-gradient forms)
    PRE_ACTIVATION = auto()  # the activation's input (u = up(x), or g = gate(x) in a gated FFN) and, gated, up(x)
    OUTPUT_GRAD = auto()  # ∂L/∂(attention output projection's output), in head chunks
    WEIGHTS = auto()  # the layer's weights by role: value, output, the FFN's row roles (up; gate, up), down
    HESSIAN = auto()  # scored by the gate Hessian (``traces.gate_hessian_scores``), not per unit


@dataclass
class Units:
    """What the scoring pass captured for one kind of unit in one layer. Heads are query heads, whatever the
    attention unit: the scoring pass sums a key-value group's scores. An FFN unit's activation ``act`` is the down
    projection's input: z = σ(u), or h = σ(g) · u in a gated FFN."""

    act: Tensor  # (B, T, U, k)
    grad: Tensor | None  # (B, T, U, k): ∂L_b/∂act
    valid: Tensor  # (B, T): 1 at real tokens
    activation: Activation  # the model family's FFN activation σ
    weights: dict[str, Tensor] = field(default_factory=dict)  # Needs.WEIGHTS: role → the layer's weight
    ffn_input: Tensor | None = None  # (B, T, E) x, FFN units only
    pre_activation: Tensor | None = None  # (B, T, F, 1) σ's input: u, or g in a gated FFN; FFN units only
    up: Tensor | None = None  # (B, T, F, 1) u = up(x) in a gated FFN, else None
    output_grad: Tensor | None = None  # (B, T, U, k), heads only
    targets: Tensor | None = None  # (B, T) next-token ids (-100: none)
    labels: Tensor | None = None  # (B, T) next-token ids inside the gold continuation, the loss's (-100: none)
    generator: torch.Generator | None = None


Score = Callable[[Units], Tensor]  # → (B, U)


@dataclass(frozen=True)
class Criterion:
    name: str
    heads: Score | None  # None: scored by the gate Hessian (Needs.HESSIAN)
    neurons: Score | None  # None: scored by the gate Hessian, or not at all (heads_only)
    needs: Needs = Needs.NOTHING
    heads_only: bool = False  # no FFN-unit definition: every unit is kept
    seeded: bool = False  # draws random numbers (the job's seed): its scores, and traces, differ per seed


CRITERIA: dict[str, dict[str, Criterion]] = {}  # name (conf/criterion/<name>.yaml) → variant → criterion


def register(criterion: Criterion, *variants: str) -> Criterion:
    """Make ``criterion`` the named variants (``textbook`` when none) of its name."""
    for variant in variants or ("textbook",):
        CRITERIA.setdefault(criterion.name, {})[variant] = criterion
    return criterion


def get_criterion(name: str, variant: str) -> Criterion:
    return CRITERIA[name][variant]


def tokens(u: Units) -> Tensor:
    """(B, T, 1, 1): broadcasts the token mask over units and dims."""
    return u.valid[..., None, None]


def gate_grad(u: Units) -> Tensor:
    """(B, U) ∂L/∂gate of a multiplicative gate on each unit: Σ_t <act_t, grad_t> over valid tokens."""
    return ((u.act * u.grad).sum(-1) * u.valid[..., None]).sum(1)


def token_norm(x: Tensor, u: Units) -> Tensor:
    """(B, U) norm of (B, T, U, k) ``x`` over valid tokens and dims."""
    return (x ** 2 * tokens(u)).sum((1, 3)).sqrt()


def row_output_grads(u: Units) -> dict[str, Tensor]:
    """(B, T, F) per token, ∂L/∂ of each FFN row projection's output at valid tokens, by role (Needs.GRAD |
    PRE_ACTIVATION): up: ∂L/∂z · σ'(u); gated: gate: ∂L/∂h · u · σ'(g), up: ∂L/∂h · σ(g)."""
    grad = u.grad[..., 0] * u.valid[..., None]
    pre = u.pre_activation[..., 0]
    if u.up is None:
        return {"up": grad * u.activation.derivative(pre)}
    return {"gate": grad * u.up[..., 0] * u.activation.derivative(pre), "up": grad * u.activation(pre)}


def row_weight_grads(u: Units) -> dict[str, Tensor]:
    """(B, F, E) per example, ∂L/∂W of each FFN row projection by role: Σ_t ∂L/∂(W x_t)_n · x_t,j (Needs.GRAD |
    PRE_ACTIVATION | FFN_INPUT)."""
    return {role: torch.einsum("btf,bte->bfe", grad, u.ffn_input) for role, grad in row_output_grads(u).items()}


def correlations(vectors: Tensor) -> Tensor:
    """(..., n, k) → (..., n, n) Pearson correlations between the n vectors (zero for constant vectors)."""
    centred = vectors - vectors.mean(-1, keepdim=True)
    normed = centred / centred.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return normed @ normed.transpose(-1, -2)


def reached(u: Units) -> Tensor:
    """(B, T) tokens whose gradient is not identically zero: those from which the loss can be reached. jacov and
    textbook epenas use only these: in late layers the context tokens cannot reach the loss."""
    return (u.valid > 0) & (u.grad.abs().sum((2, 3)) > 0)
