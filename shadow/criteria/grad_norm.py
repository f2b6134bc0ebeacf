"""grad_norm: ‖g‖ of a head over tokens and dims; the norm of ∂L/∂ of an FFN unit's rows, ‖∂L/∂W_up[n, :]‖, or
gated (‖∂L/∂W_gate[n, :]‖² + ‖∂L/∂W_up[n, :]‖²)^½.

reference: the same (ShadowLLM's code computed this form).
"""

from __future__ import annotations

from torch import Tensor

from shadow.criteria.base import Criterion, Needs, Units, register, row_weight_grads, token_norm


def gradient_norm(u: Units) -> Tensor:
    return token_norm(u.grad, u)


def weight_gradient_norm(u: Units) -> Tensor:
    return sum(grad.square().sum(-1) for grad in row_weight_grads(u).values()).sqrt()


register(Criterion("grad_norm", gradient_norm, weight_gradient_norm,
                   Needs.GRAD | Needs.FFN_INPUT | Needs.PRE_ACTIVATION), "textbook", "reference")
