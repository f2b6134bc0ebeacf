"""nwot: log det(I + UᵀU) with U = [c, 1 − c], c_t ∈ {0,1}^k the unit's binary pattern at token t: c = 1[a > 0]
for a head's output; for an FFN unit, whether its activation passes its input, c = 1[u > 0] (ReLU's zero set,
where z > 0 exactly when u > 0), and in a gated FFN the gate's sign, c = 1[g > 0]. The identity keeps the
log-determinant finite when a unit has fewer distinct patterns than tokens; with k = 1 it is
log(1 + active tokens) + log(1 + inactive tokens).

reference: the per-example kernel of the reference's code, K = (1 − x)(1 − x)ᵀ over the batch, is 1 × 1 at its
batch size 1: heads log(Σ_t,dims 1[a ≤ 0]) (−inf when the head has no non-positive entry, as its slogdet gives);
FFN units log(mean_t 1[u ≤ 0]) (gated: g ≤ 0), or 0 when the unit is active on every token (the reference adds
its −inf to the static score only, not to the per-example trace).
"""

from __future__ import annotations

import torch
from torch import Tensor

from shadow.criteria.base import Criterion, Needs, Units, register, tokens


def pattern_log_det(u: Units) -> Tensor:
    """log det(I + UᵀU) per (example, unit), U = [c, 1 − c] the unit's binary codes over valid tokens."""
    codes = (_passing(u) > 0).to(u.act.dtype)
    cat = (torch.cat([codes, 1 - codes], dim=-1) * tokens(u)).permute(0, 2, 1, 3)  # (B, U, T, 2k)
    gram = cat.transpose(-1, -2) @ cat
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.linalg.slogdet(eye + gram).logabsdet


def _passing(u: Units) -> Tensor:
    """What the pattern's sign is read from: a head's output, an FFN unit's activation input."""
    return u.act if u.pre_activation is None else u.pre_activation


def inactive(x: Tensor, u: Units) -> Tensor:
    """(B, U) count of the valid entries of (B, T, U, k) ``x`` that are not positive."""
    return ((x <= 0) * tokens(u)).sum((1, 3))


def log_inactive(u: Units) -> Tensor:
    return inactive(u.act, u).log()


def log_inactive_share(u: Units) -> Tensor:
    share = inactive(u.pre_activation, u) / u.valid.sum(1, keepdim=True).clamp(min=1)
    return torch.where(share > 0, share.log(), torch.zeros_like(share))  # the reference's trace skips log 0


register(Criterion("nwot", pattern_log_det, pattern_log_det, Needs.PRE_ACTIVATION))
register(Criterion("nwot", log_inactive, log_inactive_share, Needs.PRE_ACTIVATION), "reference")
