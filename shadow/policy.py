"""From scores to masks: keep the top (1 − sparsity) heads and neurons of each example.

- ``global`` ranks units across all layers at once (heads and neurons separately);
- ``local`` keeps the same number in every layer;
- ``hybrid`` is global with a floor: at least ``min_heads`` heads and ``min_neurons`` neurons per layer.
``dense_first_layer`` keeps layer 0 whole (it feeds the predictor), as ShadowLLM's code did; the other layers
then carry the nominal sparsity, so the model as a whole is less sparse. Scores must be comparable across
layers for ``global`` and ``hybrid``: the predictor's targets are normalised per layer for that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from shadow.config import resolved_sparsities
from shadow.errors import ConfigError


@dataclass
class Masks:
    heads: Tensor  # (B, L, H) per request or (B, T, L, H) per token; bool, True = kept
    neurons: Tensor  # (B, L, F) or (B, T, L, F)

    def sparsity(self) -> dict[str, float]:
        return {"head_sparsity": 1 - self.heads.float().mean().item(),
                "neuron_sparsity": 1 - self.neurons.float().mean().item()}

    def kv_heads(self, count: int) -> Tensor:
        """(…, L, count) the key-value heads in use: with query-head units (more heads than ``count``), a key-value
        head is in use when any of its query heads is kept; otherwise the heads themselves."""
        heads = self.heads.shape[-1]
        return self.heads if heads == count else self.heads.unflatten(-1, (count, heads // count)).any(-1)

    def kept_per_layer(self, real: Tensor | None = None) -> tuple[Tensor, Tensor, float]:
        """(L,) kept fraction of heads and of neurons in each layer summed over the masks, and how many masks; with
        ``real``, per-token masks (B, T, L, U) count only at the (B, T) real tokens (padding counts nowhere)."""
        heads = self.heads.float().mean(-1).reshape(-1, self.heads.shape[-2])
        neurons = self.neurons.float().mean(-1).reshape(-1, self.neurons.shape[-2])
        weights = torch.ones(len(heads), device=heads.device) if real is None or self.heads.dim() == 3 else \
            real.reshape(-1).float().to(heads.device)
        return weights @ heads, weights @ neurons, weights.sum().item()

    def kv_per_layer(self, count: int, real: Tensor | None = None) -> Tensor:
        """(L,) share of the ``count`` key-value heads in use in each layer, summed as ``kept_per_layer`` sums."""
        kv = self.kv_heads(count).float().mean(-1).reshape(-1, self.heads.shape[-2])
        weights = torch.ones(len(kv), device=kv.device) if real is None or self.heads.dim() == 3 else \
            real.reshape(-1).float().to(kv.device)
        return weights @ kv


@dataclass
class SparsityMeter:
    """Achieved sparsity over many requests, overall and per layer, and the tokens they scored. With ``kv_heads``
    (the model's key-value heads), masks of query-head units also count the key-value heads in use
    (``kv_head_sparsity``)."""

    kv_heads: int | None = None
    heads: Tensor | None = None  # (L,) kept fractions summed over masks
    neurons: Tensor | None = None
    kv: Tensor | None = None
    requests: float = 0  # masks counted: requests, or real tokens with per-token masks
    scored: int = 0  # tokens scored, over every request (masked or not)

    def add(self, masks: Masks | None, real: Tensor | None = None, scored: int = 0) -> None:
        """Count ``masks`` (None: no masks, nothing to count), per-token ones at the (B, T) ``real`` tokens only,
        and ``scored`` tokens."""
        self.scored += scored
        if masks is None:
            return
        heads, neurons, count = masks.kept_per_layer(real)
        self.heads = heads if self.heads is None else self.heads + heads
        self.neurons = neurons if self.neurons is None else self.neurons + neurons
        self.requests += count
        if self.kv_heads is not None and masks.heads.shape[-1] != self.kv_heads:
            kv = masks.kv_per_layer(self.kv_heads, real)
            self.kv = kv if self.kv is None else self.kv + kv

    def per_layer(self) -> dict[str, list[float]]:
        if not self.requests:
            return {}
        kv = {} if self.kv is None else {"kv_head_sparsity": (1 - self.kv / self.requests).tolist()}
        return {"head_sparsity": (1 - self.heads / self.requests).tolist(),
                "neuron_sparsity": (1 - self.neurons / self.requests).tolist(), **kv}

    def overall(self) -> dict[str, float]:
        layers = self.per_layer()
        return {f"achieved_{key}": sum(values) / len(values) if values else 0.0
                for key, values in (("head_sparsity", layers.get("head_sparsity", [])),
                                    ("neuron_sparsity", layers.get("neuron_sparsity", [])))}


def kept_count(units: int, sparsity: float) -> int:
    return round((1 - sparsity) * units)


def keep_top(scores: Tensor, sparsity: float, policy: str, minimum: int = 0) -> Tensor:
    """Boolean mask of the (B, L, U) scores' top (1 − sparsity), per example."""
    B, L, U = scores.shape
    if policy == "local":
        return _top(scores, kept_count(U, sparsity))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    k = kept_count(L * U, sparsity)
    if policy == "hybrid" and minimum:
        mask = _top(scores, min(minimum, U))
        scores = scores.masked_fill(mask, float("-inf"))
        k -= L * min(minimum, U)
    return mask | _top(scores.reshape(B, L * U), k).reshape(B, L, U)


def _top(scores: Tensor, k: int) -> Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(-1, scores.topk(k, dim=-1, sorted=False).indices, True)  # order is irrelevant


@dataclass(frozen=True)
class Policy:
    name: str
    head_sparsity: float
    neuron_sparsity: float
    min_heads: int = 0  # hybrid only: the floor per layer (a job's comes from conf/config.yaml)
    min_neurons: int = 0
    dense_first_layer: bool = False

    @classmethod
    def configured(cls, cfg: Any, heads_only: bool, dense_attention: bool = False) -> Policy:
        """The job's rule: head and neuron sparsity default to ``sparsity`` (neurons: 0 for head-only criteria;
        heads: 0 with ``dense_attention``, a placement's default, unless head_sparsity is set)."""
        head, neuron = resolved_sparsities(cfg)
        if heads_only:
            neuron = 0.0
        if dense_attention and cfg.head_sparsity is None:
            head = 0.0
        return cls(cfg.policy, head, neuron, cfg.min_heads, cfg.min_neurons, cfg.dense_first_layer)

    def select(self, heads: Tensor, neurons: Tensor) -> Masks:
        """Masks for (..., L, H) head and (..., L, F) neuron scores: one per leading index."""
        return Masks(self._keep(heads, self.head_sparsity, self.min_heads),
                     self._keep(neurons, self.neuron_sparsity, self.min_neurons))

    def kept_counts(self, layers: int, units: int, sparsity: float) -> list[int] | None:
        """How many of its ``units`` each of ``layers`` layers keeps at ``sparsity``, where the policy fixes it
        (local); None where the scores decide (global, hybrid)."""
        if self.name != "local":
            return None
        first = 1 if self.dense_first_layer else 0
        return [units if layer < first else kept_count(units, sparsity) for layer in range(layers)]

    def _keep(self, scores: Tensor, sparsity: float, minimum: int) -> Tensor:
        flat = scores.reshape(-1, *scores.shape[-2:])
        first = 1 if self.dense_first_layer else 0
        mask = torch.ones_like(flat, dtype=torch.bool)
        mask[:, first:] = keep_top(flat[:, first:], sparsity, self.name, minimum)
        return mask.view(scores.shape)

    def check(self, layers: int, heads: int, neurons: int) -> None:
        """Fail before any work if the policy cannot be met on a model of this shape."""
        sparse_layers = layers - (1 if self.dense_first_layer else 0)
        for kind, key, units, sparsity, minimum in (
                ("heads", "head_sparsity", heads, self.head_sparsity, self.min_heads),
                ("neurons", "neuron_sparsity", neurons, self.neuron_sparsity, self.min_neurons)):
            if self.name == "local" and kept_count(units, sparsity) < 1:
                raise ConfigError(f"{key}={sparsity} keeps no unit of the {units} per layer under policy=local; "
                                  f"lower {key} below {1 - 0.5 / units:.4f} or use policy=global")
            floor = sparse_layers * min(minimum, units)
            if self.name == "hybrid" and floor > kept_count(sparse_layers * units, sparsity):
                raise ConfigError(f"min_{kind}={minimum} per layer needs {floor} {kind} but {key}={sparsity} keeps "
                                  f"{kept_count(sparse_layers * units, sparsity)}; lower min_{kind} or {key}")
