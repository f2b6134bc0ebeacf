"""epenas (heads only): EPE-NAS (Lopes et al. 2021) as its authors' ``eval_score_perclass``.

The classes are the target token ids, so their number is the vocabulary (> 100) and the > 100 branch applies.
Per class c with at least two member tokens (the code's ``len`` of a single member's 0-d correlation raises and
skips it), e_c = Σ_ij log(|corr_c,ij| + k) / n_c over the correlations of its members' gradient vectors; score =
Σ_c Σ_c' |e_c − e_c'| / C, C the number of classes scored (0 when none). Only reached tokens count
(``base.reached``); a constant gradient vector counts as uncorrelated with every vector.

reference: ShadowLLM's ``calculate_epenas`` on one example: the members are the gold continuation's targets only
(gradient at position t grouped by the label at t + 1), classes need more than 4 members, s_c is not divided by
n_c, a class whose correlation is NaN (a constant gradient vector) is skipped, and score = Σ_c Σ_c' |s_c − s_c'|
without division. The reference pooled 10 examples into one static score; per example a continuation rarely
repeats a token five times, so most examples score 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from shadow.criteria.base import EPS, Criterion, Needs, Units, correlations, reached, register


@dataclass
class _Class:
    log_corr: Tensor  # (U,) Σ_ij log(|corr_ij| + k) over the correlations of the members' vectors
    members: int
    constant: Tensor  # (U,) some member's vector is constant: numpy's correlation is NaN


def _classes(grads: Tensor, labels: Tensor, min_members: int) -> list[_Class]:
    """The classes of ``labels`` (n,) with at least ``min_members`` members, over grads (U, n, k)."""
    out = []
    for label in labels.unique():
        group = grads[:, labels == label]
        if group.shape[1] >= min_members:
            out.append(_Class((correlations(group).abs() + EPS).log().sum((-1, -2)), group.shape[1],
                              (group == group[..., :1]).all(-1).any(-1)))
    return out


def _pairwise_spread(scores: Tensor, present: Tensor) -> Tensor:
    """Σ_c Σ_c' |s_c − s_c'| over the classes present for each unit: scores, present (C, U) → (U,)."""
    both = present[:, None] & present[None]
    return ((scores[:, None] - scores[None]).abs() * both).sum((0, 1))


def per_class_spread(u: Units) -> Tensor:
    """Per head: EPE-NAS over its reached tokens' gradients, classed by target token (> 100 classes branch)."""
    out = torch.zeros(u.act.shape[0], u.act.shape[2], dtype=u.act.dtype, device=u.act.device)
    kept_tokens = reached(u)
    for b in range(u.act.shape[0]):
        keep = kept_tokens[b] & (u.targets[b] >= 0)
        classes = _classes(u.grad[b, keep].transpose(0, 1), u.targets[b, keep], min_members=2)
        if classes:
            scores = torch.stack([c.log_corr / c.members for c in classes])  # (C, U)
            out[b] = _pairwise_spread(scores, torch.ones_like(scores, dtype=torch.bool)) / len(classes)
    return out


def reference_spread(u: Units) -> Tensor:
    """Per head: ShadowLLM's calculate_epenas on one example (gold-continuation targets, > 4 members per class)."""
    out = torch.zeros(u.act.shape[0], u.act.shape[2], dtype=u.act.dtype, device=u.act.device)
    for b in range(u.act.shape[0]):
        keep = (u.labels[b] >= 0) & (u.valid[b] > 0)
        classes = _classes(u.grad[b, keep].transpose(0, 1), u.labels[b, keep], min_members=5)
        if classes:
            present = ~torch.stack([c.constant for c in classes])  # the reference skips NaN class scores
            out[b] = _pairwise_spread(torch.stack([c.log_corr for c in classes]), present)
    return out


register(Criterion("epenas", per_class_spread, None, Needs.GRAD, heads_only=True))
register(Criterion("epenas", reference_spread, None, Needs.GRAD, heads_only=True), "reference")
