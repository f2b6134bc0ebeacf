"""snip: |G| = |∂L/∂gate| of a multiplicative gate on the unit.

reference: Σ_t Σ_{e ∈ h} |∂L/∂o_t,e| (o: the attention output projection's output, in head-sized chunks) and
Σ_t |∂L/∂u_t,n|, as ShadowLLM's code did; gated, Σ_t |∂L/∂g_t,n| + |∂L/∂u_t,n| over both rows' outputs.
"""

from __future__ import annotations

from torch import Tensor

from shadow.criteria.base import Criterion, Needs, Units, gate_grad, register, row_output_grads, tokens


def gate_gradient(u: Units) -> Tensor:
    return gate_grad(u).abs()


def output_gradient(u: Units) -> Tensor:
    return (u.output_grad.abs() * tokens(u)).sum((1, 3))


def pre_activation_gradient(u: Units) -> Tensor:
    return sum(grad.abs().sum(1) for grad in row_output_grads(u).values())


register(Criterion("snip", gate_gradient, gate_gradient, Needs.GRAD))
register(Criterion("snip", output_gradient, pre_activation_gradient,
                   Needs.GRAD | Needs.OUTPUT_GRAD | Needs.PRE_ACTIVATION), "reference")
