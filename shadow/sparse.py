"""Sparse execution per request: the pruned units' weights are not read at all.

``pruned(model, masks)`` swaps, for the duration of a block, each layer's projections for smaller ones that hold
only the kept units' weights, gathered once: the q, k and v rows and the out_proj columns of the kept heads
(so the KV cache holds only those heads), and the fc1 rows and fc2 columns of the kept neurons. Prefill and
every decoding step then run on the smaller layers. The outputs equal the masked model's (tested).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from shadow.models import decoder_layers
from shadow.policy import Masks


def _rows(layer: nn.Linear, index: Tensor) -> nn.Linear:
    out = nn.Linear(layer.in_features, len(index), bias=layer.bias is not None, device=layer.weight.device,
                    dtype=layer.weight.dtype)
    out.weight.data = layer.weight.data.index_select(0, index)
    if layer.bias is not None:
        out.bias.data = layer.bias.data.index_select(0, index)
    return out


def _columns(layer: nn.Linear, index: Tensor) -> nn.Linear:
    out = nn.Linear(len(index), layer.out_features, bias=layer.bias is not None, device=layer.weight.device,
                    dtype=layer.weight.dtype)
    out.weight.data = layer.weight.data.index_select(1, index).contiguous()
    if layer.bias is not None:
        out.bias.data = layer.bias.data.clone()
    return out


@contextmanager
def pruned(model: nn.Module, masks: Masks) -> Iterator[None]:
    """Run the model with only the units kept by a single request's masks ((1, L, H) and (1, L, F))."""
    if masks.heads.dim() != 3 or masks.heads.shape[0] != 1:
        raise ValueError("pruned() takes one request's masks: heads (1, L, H), neurons (1, L, F)")
    saved = []
    try:
        for index, layer in enumerate(decoder_layers(model)):
            attn = layer.self_attn
            saved.append((layer, attn, attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, attn.num_heads,
                          layer.fc1, layer.fc2))
            device = attn.q_proj.weight.device
            heads = masks.heads[0, index].nonzero().flatten().to(device)
            empty = len(heads) == 0  # keep one head whose output is zeroed: the KV cache keeps its layout
            heads = heads if not empty else torch.zeros(1, dtype=torch.long, device=device)
            dims = (heads[:, None] * attn.head_dim + torch.arange(attn.head_dim, device=device)).flatten()
            attn.q_proj, attn.k_proj, attn.v_proj = (_rows(m, dims) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
            attn.out_proj = _columns(attn.out_proj, dims)
            if empty:
                attn.out_proj.weight.data.zero_()
            attn.num_heads = len(heads)
            neurons = masks.neurons[0, index].nonzero().flatten().to(layer.fc1.weight.device)
            layer.fc1, layer.fc2 = _rows(layer.fc1, neurons), _columns(layer.fc2, neurons)
        yield
    finally:
        for layer, attn, q, k, v, out, heads, fc1, fc2 in saved:
            attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, attn.num_heads = q, k, v, out, heads
            layer.fc1, layer.fc2 = fc1, fc2
