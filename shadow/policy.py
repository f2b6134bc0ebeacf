"""From scores to masks: keep the top (1 − sparsity) heads and neurons of each example.

``global`` ranks units across all layers at once (heads and neurons separately); ``local`` keeps the same
number in every layer. Scores must be comparable across layers for ``global``: the predictor's targets are
normalised per layer for that reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from shadow.config import ConfigError


@dataclass
class Masks:
    heads: Tensor  # (B, L, H) bool, True = kept
    neurons: Tensor  # (B, L, F) bool

    def sparsity(self) -> dict[str, float]:
        return {"head_sparsity": 1 - self.heads.float().mean().item(),
                "neuron_sparsity": 1 - self.neurons.float().mean().item()}


def kept_count(units: int, sparsity: float) -> int:
    return round((1 - sparsity) * units)


def keep_top(scores: Tensor, sparsity: float, policy: str) -> Tensor:
    """Boolean mask of the (B, L, U) scores' top (1 − sparsity), per example, globally or per layer."""
    B, L, U = scores.shape
    flat = scores.reshape(B, L * U) if policy == "global" else scores
    k = kept_count(flat.shape[-1], sparsity)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(-1, flat.topk(k, dim=-1).indices, True)
    return mask.reshape(B, L, U)


def check_policy(policy: str, heads: int, neurons: int, head_sparsity: float, neuron_sparsity: float) -> None:
    """A local policy must keep at least one unit per layer."""
    if policy != "local":
        return
    for key, units, sparsity in (("head_sparsity", heads, head_sparsity),
                                 ("neuron_sparsity", neurons, neuron_sparsity)):
        if kept_count(units, sparsity) < 1:
            raise ConfigError(f"{key}={sparsity} keeps no unit of the {units} per layer under policy=local; "
                              f"lower {key} below {1 - 0.5 / units:.4f} or use policy=global")


def select(head_scores: Tensor, neuron_scores: Tensor, head_sparsity: float, neuron_sparsity: float,
           policy: str) -> Masks:
    return Masks(keep_top(head_scores, head_sparsity, policy), keep_top(neuron_scores, neuron_sparsity, policy))
