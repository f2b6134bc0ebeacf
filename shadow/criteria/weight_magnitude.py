"""weight_magnitude, a static control: ‖W_V[h]‖·‖W_O[:, h]‖ for a query head (its value-output path; W_V[h]: the
rows of its key-value head) and ‖W_rows[n]‖·‖W_down[:, n]‖ for an FFN unit: its up row, or gated its gate and up
rows together, and its down column."""

from __future__ import annotations

from torch import Tensor

from shadow.criteria.base import Criterion, Needs, Units, register


def value_output_norms(u: Units) -> Tensor:
    H, D = u.act.shape[2], u.act.shape[3]
    value = u.weights["value"].view(-1, D, u.weights["value"].shape[1]).norm(dim=(1, 2))  # per key-value head
    value = value.repeat_interleave(H // len(value))  # grouped-query attention: a group's query heads share it
    output = u.weights["output"].view(u.weights["output"].shape[0], H, -1).norm(dim=(0, 2))
    return (value * output)[None].expand(u.act.shape[0], H)


def up_down_norms(u: Units) -> Tensor:
    rows = sum(u.weights[role].square().sum(1) for role in u.weights if role in ("gate", "up")).sqrt()
    score = rows * u.weights["down"].norm(dim=0)
    return score[None].expand(u.act.shape[0], -1)


register(Criterion("weight_magnitude", value_output_norms, up_down_norms, Needs.WEIGHTS))
