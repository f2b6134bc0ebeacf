"""Importance criteria: per-example scores of every attention head and FFN neuron.

A criterion maps one layer's captured activation and its loss gradient to one score per unit and example:
  heads(a, g, valid)    a, g: (B, T, H, d) head slices of the input of self_attn.out_proj  -> (B, H)
  neurons(z, g, valid)  z, g: (B, T, F) input of fc2 (the ReLU output)                      -> (B, F)
``valid`` is (B, T) with 1 at real tokens and 0 at padding. Gradients are of example b's own loss (one backward
pass of the summed loss gives them for the whole batch: examples do not interact). Definitions follow
ShadowLLM (arXiv 2406.16635); conf/criterion/<name>.yaml selects one by its registry name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

Scorer = Callable[[Tensor, Tensor | None, Tensor], Tensor]


@dataclass(frozen=True)
class Criterion:
    name: str
    needs_grad: bool
    heads: Scorer
    neurons: Scorer


def _plainact_heads(a: Tensor, g: Tensor, valid: Tensor) -> Tensor:
    """Σ_t |<a[t,h], g[t,h]>|: first-order Taylor estimate of the loss change from removing head h."""
    return ((a * g).sum(-1).abs() * valid[..., None]).sum(1)


def _plainact_neurons(z: Tensor, g: Tensor, valid: Tensor) -> Tensor:
    """Σ_t |z[t,n] · ∂L/∂z[t,n]|."""
    return ((z * g).abs() * valid[..., None]).sum(1)


CRITERIA: dict[str, Criterion] = {
    "plainact": Criterion("plainact", needs_grad=True, heads=_plainact_heads, neurons=_plainact_neurons),
}
