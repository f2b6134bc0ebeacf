"""What shadow needs to know about a kind of decoder, behind one ``Family`` object per model type.

Masking, criteria, the predictor's features, pruning and per-token decoding never name a model's submodules:
they ask the family for a layer's projections by role. A head is ``head_dim`` rows of the query, key and value
projections and the same columns of the output projection, whose input holds the heads' outputs; an FFN unit is
a row of each ``neuron_rows`` projection and a column of ``down``, whose input holds the units' activations.
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
    """The units of a decoder: layers, query heads and key-value heads per layer, head size, FFN units per layer."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    neurons: int


@dataclass(frozen=True)
class Activation:
    """The FFN activation's facts that criteria rely on. ``zero_below``: the output is exactly 0 for every
    input ≤ 0 and positive above (ReLU), so the output alone gives the derivative, 1[output > 0]."""

    name: str
    zero_below: bool

    def slope(self, output: Tensor) -> Tensor:
        """σ'(u) from σ(u), where the output determines it."""
        if not self.zero_below:
            raise ValueError(f"the {self.name} activation's derivative is not a function of its output")
        return (output > 0).to(output.dtype)


Attention = Callable[[int, Tensor], Tensor]  # (layer index, normalised input (E,)) → attention output (E,)
Kept = Callable[[int], Tensor]  # layer index → the indices of its kept FFN units
Fetch = Callable[[int], AbstractContextManager]  # layer index → its weights made resident for the block


class Family(ABC):
    """One model family: a subclass sets the class attributes and implements the abstract methods; defining it
    registers it under its ``model_type``."""

    model_type: ClassVar[str]
    activation: ClassVar[Activation]
    paths: ClassVar[dict[str, str]]  # role → submodule path inside a decoder layer
    head_rows: ClassVar[tuple[str, ...]] = ("query", "key", "value")  # roles whose rows belong to a head
    head_columns: ClassVar[tuple[str, ...]] = ("output",)
    neuron_rows: ClassVar[tuple[str, ...]]  # roles whose rows belong to an FFN unit
    neuron_columns: ClassVar[tuple[str, ...]] = ("down",)
    architectures: ClassVar[dict[str, dict]]  # released sizes by name → config fields (the latency bench's arch)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        FAMILIES[cls.model_type] = cls()

    @abstractmethod
    def shape(self, config) -> Shape:
        """Layers, heads, key-value heads, head size and FFN units, from the model's config."""

    @abstractmethod
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, in order."""

    @abstractmethod
    def backbone(self, model: nn.Module) -> nn.Module:
        """The decoder without the LM head, called with ``input_ids`` and ``attention_mask``."""

    @abstractmethod
    def head_count(self, layer: nn.Module) -> int:
        """The query heads the layer's attention computes."""

    @abstractmethod
    def set_head_count(self, layer: nn.Module, count: int) -> None:
        """Make the attention compute ``count`` heads (``pruned`` shrinks them, then restores them)."""

    @abstractmethod
    def scaling(self, layer: nn.Module) -> float:
        """The factor on queries before the dot product with keys."""

    @abstractmethod
    def parameter_count(self, config) -> int:
        """The model's parameters, from its config alone."""

    @abstractmethod
    def config(self, architecture: str):
        """The config of a released size, for random-weight models (latency)."""

    @abstractmethod
    def decode_step(self, model: nn.Module, token: int, position: int, attention: Attention, kept: Kept,
                    fetch: Fetch) -> Tensor:
        """One token through the decoder at ``position``: each layer's attention is ``attention(index, h)``, its
        FFN reads only the units ``kept(index)`` (asked after the attention) through ``shadow.kernels``; each
        layer runs inside ``fetch(index)`` on its own device. Returns the float32 logits (V,)."""

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

    def ffn_input(self, layer: nn.Module) -> nn.Linear:
        """The projection whose input is the FFN's input and whose output is the units' pre-activations."""
        return self.module(layer, "up")

    def weight_bytes(self, config, dtype: torch.dtype) -> int:
        return self.parameter_count(config) * dtype.itemsize
