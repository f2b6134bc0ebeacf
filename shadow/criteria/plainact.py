"""plainact, ShadowLLM's headline criterion: Σ_t |<a_t, g_t>| for a head and Σ_t |z_t g_t| for an FFN unit.

reference: FFN units by Σ_j |W1 ⊙ ∂L/∂W1|[n, j] (their up-projection weights), as ShadowLLM's code did.
"""

from __future__ import annotations

from torch import Tensor

from shadow.criteria.base import Criterion, Needs, Units, register, up_weight_grad


def activation_times_gradient(u: Units) -> Tensor:
    return ((u.act * u.grad).sum(-1).abs() * u.valid[..., None]).sum(1)


def weight_times_gradient(u: Units) -> Tensor:
    return (u.weights["up"][None] * up_weight_grad(u)).abs().sum(-1)


register(Criterion("plainact", activation_times_gradient, activation_times_gradient, Needs.GRAD))
register(Criterion("plainact", activation_times_gradient, weight_times_gradient,
                   Needs.GRAD | Needs.FFN_INPUT | Needs.WEIGHTS | Needs.SLOPE), "reference")
