"""grad_norm: ‖g‖ of a head over tokens and dims; ‖∂L/∂W1[n, :]‖ of an FFN unit (its up-projection row).

reference: the same (ShadowLLM's code computed this form).
"""

from __future__ import annotations

from torch import Tensor

from shadow.criteria.base import Criterion, Needs, Units, register, token_norm, up_weight_grad


def gradient_norm(u: Units) -> Tensor:
    return token_norm(u.grad, u)


def weight_gradient_norm(u: Units) -> Tensor:
    return up_weight_grad(u).norm(dim=-1)


register(Criterion("grad_norm", gradient_norm, weight_gradient_norm, Needs.GRAD | Needs.FFN_INPUT | Needs.SLOPE),
         "textbook", "reference")
