"""plainact, ShadowLLM's headline criterion: Σ_t |<a_t, g_t>| for a head and Σ_t |z_t g_t| for an FFN unit (z:
the down projection's input; h = σ(g) · u in a gated FFN).

reference: FFN units by Σ_j |W_up ⊙ ∂L/∂W_up|[n, j] (their up-projection weights), as ShadowLLM's code did;
gated, the same sum over the gate's and the up projection's rows.
"""

from __future__ import annotations

from torch import Tensor

from shadow.criteria.base import Criterion, Needs, Units, register, row_weight_grads


def activation_times_gradient(u: Units) -> Tensor:
    return ((u.act * u.grad).sum(-1).abs() * u.valid[..., None]).sum(1)


def weight_times_gradient(u: Units) -> Tensor:
    return sum((u.weights[role][None] * grad).abs().sum(-1) for role, grad in row_weight_grads(u).items())


register(Criterion("plainact", activation_times_gradient, activation_times_gradient, Needs.GRAD))
register(Criterion("plainact", activation_times_gradient, weight_times_gradient,
                   Needs.GRAD | Needs.FFN_INPUT | Needs.WEIGHTS | Needs.PRE_ACTIVATION), "reference")
