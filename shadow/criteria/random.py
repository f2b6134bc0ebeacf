"""random, a control: uniform noise, reproducible from the job's seed."""

from __future__ import annotations

import torch
from torch import Tensor

from shadow.criteria.base import Criterion, Units, register


def uniform(u: Units) -> Tensor:
    shape = (u.act.shape[0], u.act.shape[2])
    return torch.rand(shape, generator=u.generator).to(u.act.device)


register(Criterion("random", uniform, uniform, seeded=True))
