"""What shadow needs to know about a kind of decoder, behind one ``Family`` object per model type.

Masking, criteria, the predictor's features, pruning and per-token decoding never name a model's submodules:
they ask the family for a layer's projections by role.

- A query head is ``head_dim`` rows of the query projection and the same columns of the output projection, whose
  input holds the heads' outputs. Query heads share key-value heads in groups of ``query_heads // kv_heads``
  consecutive heads (one head each without grouped-query attention); a key-value head is ``head_dim`` rows of the
  key and value projections.
- An attention unit, the unit that head masks keep or remove, is a query head (``attention_unit=query_head``) or
  a key-value group (``kv_group``): its query heads, its key and value rows and its part of the KV cache. A
  group's query heads are consecutive, so in the output projection's input a unit is always one contiguous block.
- An FFN unit is a row of each ``neuron_rows`` projection (the gate and the up projection of a gated FFN) and a
  column of ``down``, whose input holds the units' activations: act(u) or, gated, act(g) · u.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

FAMILIES: dict[str, Family] = {}  # config.model_type → its family


@dataclass(frozen=True)
class Shape:
    """The units of a decoder: layers; query heads, key-value heads and head size per layer; the attention unit
    that head masks address; FFN units per layer."""

    layers: int
    query_heads: int
    kv_heads: int
    head_dim: int
    neurons: int
    attention_unit: str  # one of config.ATTENTION_UNITS

    @property
    def heads(self) -> int:
        """Attention units per layer: the width of a layer's head mask and head scores."""
        return self.kv_heads if self.attention_unit == "kv_group" else self.query_heads

    @property
    def attention_width(self) -> int:
        """The output projection's input: every query head's output, the predictors' feature."""
        return self.query_heads * self.head_dim

    @property
    def heads_per_unit(self) -> int:
        """Query heads per attention unit."""
        return self.query_heads // self.heads

    @property
    def group_size(self) -> int:
        """Query heads per key-value head."""
        return self.query_heads // self.kv_heads

    def query_mask(self, keep: Tensor) -> Tensor:
        """(…, units) → (…, query heads): each unit's value repeated over its query heads."""
        return keep.repeat_interleave(self.heads_per_unit, dim=-1)

    def unit_scores(self, scores: Tensor) -> Tensor:
        """(…, query heads) → (…, units): a key-value group's score is the sum of its query heads' scores."""
        return scores.unflatten(-1, (self.heads, self.heads_per_unit)).sum(-1)


@dataclass(frozen=True)
class Activation:
    """The FFN activation σ, by its transformers name (``relu``, ``silu``, ``gelu_pytorch_tanh`` …)."""

    name: str

    def __call__(self, x: Tensor) -> Tensor:
        from transformers.activations import ACT2FN

        return ACT2FN[self.name](x)

    def derivative(self, x: Tensor) -> Tensor:
        """σ'(x), elementwise, by autograd: one definition for every activation (ReLU's is 1[x > 0])."""
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            (slope,) = torch.autograd.grad(self(x).sum(), x)
        return slope


Attention = Callable[[int, Tensor], Tensor]  # (layer index, normalised inputs (B, E)) → attention outputs (B, E)
FFN = Callable[[int, Tensor], Tensor]  # (layer index, normalised inputs (B, E)) → FFN outputs (B, E)
Fetch = Callable[[int], AbstractContextManager]  # layer index → its weights made resident for the block


class Family(ABC):
    """One model family: a subclass sets the class attributes and implements the abstract methods; defining it
    registers it under its ``model_type``."""

    model_type: ClassVar[str]
    paths: ClassVar[dict[str, str]]  # role → submodule path inside a decoder layer
    query_rows: ClassVar[tuple[str, ...]] = ("query",)  # roles whose rows belong to a query head
    kv_rows: ClassVar[tuple[str, ...]] = ("key", "value")  # roles whose rows belong to a key-value head
    head_columns: ClassVar[tuple[str, ...]] = ("output",)
    neuron_rows: ClassVar[tuple[str, ...]]  # roles whose rows belong to an FFN unit: ("up",) or ("gate", "up")
    neuron_columns: ClassVar[tuple[str, ...]] = ("down",)
    activation_path: ClassVar[str]  # the FFN activation module inside a decoder layer
    architectures: ClassVar[dict[str, dict]]  # released sizes by name → config fields (the latency bench's arch)
    rotary: ClassVar[bool] = False  # queries and keys are rotated by position (``rotate``)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        FAMILIES[cls.model_type] = cls()

    @abstractmethod
    def shape(self, config, attention_unit: str) -> Shape:
        """Layers, heads, key-value heads, head size and FFN units, from the model's config."""

    @abstractmethod
    def activation(self, config) -> Activation:
        """The FFN activation."""

    @abstractmethod
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, in order."""

    @abstractmethod
    def backbone(self, model: nn.Module) -> nn.Module:
        """The decoder without the LM head, called with ``input_ids`` and ``attention_mask``."""

    @abstractmethod
    def set_head_count(self, layer: nn.Module, count: int) -> None:
        """Make the attention compute ``count`` query heads, its projections gathered to whole key-value groups
        (``pruned`` shrinks them, then restores them)."""

    @abstractmethod
    def scaling(self, layer: nn.Module) -> float:
        """The factor on queries before the dot product with keys."""

    @abstractmethod
    def parameter_count(self, config) -> int:
        """The model's parameters, from its config alone."""

    @abstractmethod
    def config(self, architecture: str):
        """The config of a released size, for random-weight models (latency)."""

    def rotate(self, model: nn.Module, layer: nn.Module, role: str, states: Tensor, positions: Tensor,
               table: Tensor | None = None) -> Tensor:
        """Queries or keys (``role``), (heads, positions, head_dim) straight from their projection, as attention
        reads them at ``positions``: a ``rotary`` family rotates them here, by ``rotary_table``'s rows where one is
        given. Without: unchanged (positions enter with the input)."""
        return states

    def head_norm(self, layer: nn.Module, role: str) -> tuple[Tensor, float] | None:
        """The weight and epsilon of the RMSNorm a ``rotary`` family applies to each query or key head (``role``)
        before rotating it, where it has one (Qwen3's)."""
        return None

    def rotary_table(self, model: nn.Module, positions: int, device: torch.device, dtype: torch.dtype
                     ) -> Tensor | None:
        """A ``rotary`` family's (2, positions, head_dim) cosines and sines of positions [0, positions), built once
        for a generation so that a step only indexes them; None without rotation."""
        return None

    def sliding_window(self, config) -> int | None:
        """The attention span, where a sliding window limits it."""
        return None

    @abstractmethod
    def decode_step(self, model: nn.Module, tokens: Tensor, position: Tensor, attention: Attention, ffn: FFN,
                    fetch: Fetch) -> Tensor:
        """One token per request (a (B,) tensor, left on the device) through the decoder at ``position`` (a 0-d
        tensor on the device, read there): each layer's attention is ``attention(index, h)`` and its FFN
        ``ffn(index, h)`` on their (B, E) normalised inputs (the decoder reads the weights they need through
        ``shadow.kernels``); the family adds the norms, residuals, embeddings and LM head. Each layer runs inside
        ``fetch(index)`` on its own device. Returns the float32 logits (B, V)."""

    def module(self, layer: nn.Module, role: str) -> nn.Linear:
        return layer.get_submodule(self.paths[role])

    def replace(self, layer: nn.Module, role: str, module: nn.Linear) -> None:
        layer.set_submodule(self.paths[role], module)

    def head_output(self, layer: nn.Module) -> nn.Linear:
        """The projection whose input is the heads' outputs, (…, heads · head_dim)."""
        return self.module(layer, "output")

    def ffn_output(self, layer: nn.Module) -> nn.Linear:
        """The projection whose input is the FFN units' activations, (…, units)."""
        return self.module(layer, "down")

    @property
    def gated(self) -> bool:
        """The FFN is down(act(gate(x)) ⊙ up(x)) rather than down(act(up(x)))."""
        return "gate" in self.paths

    def ffn_input(self, layer: nn.Module) -> nn.Linear:
        """The projection whose input is the FFN's input and whose output the activation reads: the gate of a
        gated FFN, else up."""
        return self.module(layer, "gate" if self.gated else "up")

    def weight_bytes(self, config, dtype: torch.dtype) -> int:
        return self.parameter_count(config) * dtype.itemsize
