"""weight_magnitude, a static control: ‖W_V[h]‖·‖W_O[:, h]‖ for a head (its value-output path) and
‖W1[n, :]‖·‖W2[:, n]‖ for an FFN unit (its up row and down column)."""

from __future__ import annotations

from torch import Tensor

from shadow.criteria.base import Criterion, Needs, Units, register


def value_output_norms(u: Units) -> Tensor:
    H = u.act.shape[2]
    value = u.weights["value"].view(H, -1).norm(dim=-1)  # the rows of W_V that produce head h
    output = u.weights["output"].view(u.weights["output"].shape[0], H, -1).norm(dim=(0, 2))
    return (value * output)[None].expand(u.act.shape[0], H)


def up_down_norms(u: Units) -> Tensor:
    score = u.weights["up"].norm(dim=1) * u.weights["down"].norm(dim=0)
    return score[None].expand(u.act.shape[0], -1)


register(Criterion("weight_magnitude", value_output_norms, up_down_norms, Needs.WEIGHTS))
