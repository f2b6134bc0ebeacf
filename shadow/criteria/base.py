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
    FFN_INPUT = auto()  # the up projection's input (weight-gradient forms)
    PRE_ACTIVATION = auto()  # u, the up projection's output
    OUTPUT_GRAD = auto()  # ∂L/∂(attention output projection's output), in head chunks
    WEIGHTS = auto()  # the layer's weights by role: value, output, up, down
    HESSIAN = auto()  # scored by the gate Hessian (``traces.gate_hessian_scores``), not per unit
    SLOPE = auto()  # σ'(u) from the activation alone: only activations whose output determines it (ReLU)


@dataclass
class Units:
    """What the scoring pass captured for one kind of unit in one layer."""

    act: Tensor  # (B, T, U, k)
    grad: Tensor | None  # (B, T, U, k): ∂L_b/∂act
    valid: Tensor  # (B, T): 1 at real tokens
    activation: Activation  # the model family's FFN activation
    weights: dict[str, Tensor] = field(default_factory=dict)  # Needs.WEIGHTS: role → the layer's weight
    ffn_input: Tensor | None = None  # (B, T, E), FFN units only
    pre_activation: Tensor | None = None  # (B, T, F, 1) u, FFN units only
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


def up_weight_grad(u: Units) -> Tensor:
    """(B, F, E) per-example ∂L/∂W1: Σ_t ∂L/∂u_t,n · x_t,j, with ∂L/∂u = ∂L/∂z · σ'(u) (Needs.SLOPE)."""
    grad_u = u.grad[..., 0] * u.activation.slope(u.act[..., 0]) * u.valid[..., None]
    return torch.einsum("btf,bte->bfe", grad_u, u.ffn_input)


def correlations(vectors: Tensor) -> Tensor:
    """(..., n, k) → (..., n, n) Pearson correlations between the n vectors (zero for constant vectors)."""
    centred = vectors - vectors.mean(-1, keepdim=True)
    normed = centred / centred.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return normed @ normed.transpose(-1, -2)


def reached(u: Units) -> Tensor:
    """(B, T) tokens whose gradient is not identically zero: those from which the loss can be reached. jacov and
    textbook epenas use only these: in late layers the context tokens cannot reach the loss."""
    return (u.valid > 0) & (u.grad.abs().sum((2, 3)) > 0)
