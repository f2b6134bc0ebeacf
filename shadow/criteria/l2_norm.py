"""l2_norm, activation magnitude without a gradient (the DejaVu-style baseline): ‖a‖ over tokens and dims, ‖z‖
over tokens.

reference: heads the same; FFN units ‖u‖ over tokens (before the activation, so negative pre-activations count
too), as ShadowLLM's code did; gated, the gate's ‖g‖.
"""

from __future__ import annotations

from torch import Tensor

from shadow.criteria.base import Criterion, Needs, Units, register, token_norm


def activation_norm(u: Units) -> Tensor:
    return token_norm(u.act, u)


def pre_activation_norm(u: Units) -> Tensor:
    return token_norm(u.pre_activation, u)


register(Criterion("l2_norm", activation_norm, activation_norm))
register(Criterion("l2_norm", activation_norm, pre_activation_norm, Needs.PRE_ACTIVATION), "reference")
