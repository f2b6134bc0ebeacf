"""fisher: Fisher pruning (Theis et al. 2018), Δ = ½ G², the loss change estimated for removing the unit.

reference: per element, Σ_dims mean_t (a g)² and mean_t (z g)² (the reference's (u ∂L/∂u)² equals (z g)² for
ReLU), as ShadowLLM's code did.
"""

from __future__ import annotations

from torch import Tensor

from shadow.criteria.base import Criterion, Needs, Units, gate_grad, register, tokens


def half_squared_gate_gradient(u: Units) -> Tensor:
    return 0.5 * gate_grad(u) ** 2


def elementwise(u: Units) -> Tensor:
    count = u.valid.sum(1).clamp(min=1)[:, None]
    return ((u.act * u.grad) ** 2 * tokens(u)).sum(1).sum(-1) / count


register(Criterion("fisher", half_squared_gate_gradient, half_squared_gate_gradient, Needs.GRAD))
register(Criterion("fisher", elementwise, elementwise, Needs.GRAD), "reference")
