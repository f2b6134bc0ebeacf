"""The one place where masks meet the model: forward pre-hooks on each layer's attention output projection and
FFN down projection (the family's ``head_output`` and ``ffn_output``).

A masked head's slice of the attention output is zeroed before the output projection, which is exactly what
deleting that head's columns of it does; a masked FFN unit's activation is zeroed before the down projection,
exactly what deleting its column does. Both reach the output. Each example of a batch has its own mask, for all its
positions (per request) or one per position (per token), or only at some of its positions (GRIFFIN's order: the
prompt runs on the whole model, the tokens after it on the kept units). Float masks are gates (GraSP differentiates
through them): they keep their dtype, and their product is cast back to the activation's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from shadow.arch import family_of
from shadow.policy import Masks


def _head_hook(keep: Tensor, whole: Tensor | None):
    """keep: (B, 1, H) per request or (B, T, H) per token. The output projection's input is (B, T, H·d)."""
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        B, T, E = x.shape
        return ((x.view(B, T, keep.shape[-1], -1) * _like(keep, whole, x)[..., None]).view(B, T, E).to(x.dtype),)
    return hook


def _neuron_hook(keep: Tensor, whole: Tensor | None):
    """keep: (B, 1, F) per request or (B, T, F) per token. The down projection's input may be flattened to
    (B·T, F)."""
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        mask = _like(keep, whole, x)
        return ((x.view(mask.shape[0], -1, x.shape[-1]) * mask).view(x.shape).to(x.dtype),)
    return hook


def _like(keep: Tensor, whole: Tensor | None, x: Tensor) -> Tensor:
    """The mask on the activation's device (a no-op once there: a layer's weights may be elsewhere, offloaded to
    the CPU or disk by accelerate, on ``meta`` until its forward; its activations never are), keeping every unit
    at the (B, T, 1) positions ``whole``: built here, as the layer runs, never (B, T, L, F) at once."""
    keep = keep.to(x.device)
    if whole is None:
        return keep
    whole = whole.to(x.device)
    return keep | whole if keep.dtype == torch.bool else torch.where(whole, 1, keep)


@contextmanager
def apply_masks(model: nn.Module, masks: Masks | None, positions: Tensor | None = None) -> Iterator[None]:
    """Run the model under ``masks`` (None: dense) inside the block; the hooks are always removed. ``positions``:
    (B, T) True where the masks apply; elsewhere every unit runs (by default the masks apply everywhere)."""
    handles = []
    whole = None if positions is None else ~positions.bool()[..., None]
    try:
        if masks is not None:
            family = family_of(model.config)
            for index, layer in enumerate(family.layers(model)):
                heads, neurons = masks.heads[..., index, :], masks.neurons[..., index, :]
                if heads.dim() == 2:  # per request: the same mask at every position
                    heads, neurons = heads[:, None], neurons[:, None]
                    if not heads.is_floating_point():  # small: cast once, not at every forward (float gates
                        heads, neurons = heads.to(model.dtype), neurons.to(model.dtype)  # keep their dtype)
                # per-token masks stay boolean: cast per layer as it runs, never (B, T, L, F) in the model's dtype
                handles.append(family.head_output(layer).register_forward_pre_hook(_head_hook(heads, whole)))
                handles.append(family.ffn_output(layer).register_forward_pre_hook(_neuron_hook(neurons, whole)))
        yield
    finally:
        for handle in handles:
            handle.remove()
