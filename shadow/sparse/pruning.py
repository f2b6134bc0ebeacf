"""Per-request pruning: for the duration of a block, each layer's projections are swapped for smaller ones that
hold only the kept units' weights, gathered once: the query, key and value rows and the output projection's
columns of the kept key-value groups (so the KV cache holds only those), and the rows (gate, up) and columns
(down) of the kept FFN units; the model family names the projections of each role. Prefill and every decoding
step then run on the smaller layers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from shadow.arch import Shape, family_of
from shadow.kernels import unit_rows
from shadow.offload import resident
from shadow.policy import Masks


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A Linear holding these tensors; built on the meta device, so no throwaway initialisation runs."""
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias, requires_grad=False)
    return out


def _rows(layer: nn.Linear, index: Tensor) -> nn.Linear:
    bias = layer.bias.data.index_select(0, index) if layer.bias is not None else None
    return _linear(layer.weight.data.index_select(0, index), bias)


def _columns(layer: nn.Linear, index: Tensor) -> nn.Linear:
    """The kept columns, in the weight's own layout: a weight stored transposed (as the decoders store the ones they
    read by columns) gives contiguous rows of its storage, which a product reads as they are."""
    bias = layer.bias.data.clone() if layer.bias is not None else None
    weight = layer.weight.data
    if weight.t().is_contiguous():
        return _linear(weight.t().index_select(0, index).t(), bias)
    return _linear(weight.index_select(1, index).contiguous(), bias)


def pruned_groups(shape: Shape, heads: Tensor) -> tuple[Tensor, Tensor]:
    """A layer's kept query heads (a mask) under its (H,) head mask, and the key-value groups ``pruned`` keeps
    (indices): those with a kept query head, or group 0 alone when none has one."""
    query_kept = shape.query_mask(heads.bool())
    groups = query_kept.view(shape.kv_heads, shape.group_size).any(-1)
    if not groups.any():
        groups[0] = True
    return query_kept, groups.nonzero().flatten()


@contextmanager
def pruned(model: nn.Module, masks: Masks, shape: Shape) -> Iterator[None]:
    """Run the model with only the units kept by a single request's masks ((1, L, heads) and (1, L, F) in the
    units of ``shape``).

    Attention keeps whole key-value groups, those with a kept query head: their query, key and value rows and
    output columns (so the KV cache holds only those groups). A query head of a kept group that the mask removes
    (``attention_unit=query_head``) has its output columns zeroed; so has the one group a layer with no kept head
    keeps, so that the KV cache keeps its layout."""
    if masks.heads.dim() != 3 or masks.heads.shape[0] != 1:
        raise ValueError("pruned() takes one request's masks: heads (1, L, H), neurons (1, L, F)")
    family = family_of(model.config)
    saved = []
    try:
        for index, layer in enumerate(family.layers(model)):
            saved.append((layer, {role: family.module(layer, role) for role in family.paths}))
            with resident(layer):  # the copies live on the layer's execution device, offloaded or not
                device = family.head_output(layer).weight.device
                query_kept, groups = pruned_groups(shape, masks.heads[0, index].to(device))
                queries = unit_rows(groups, shape.group_size)  # every query head of the kept groups
                query_dims = unit_rows(queries, shape.head_dim)
                neurons = masks.neurons[0, index].nonzero().flatten().to(device)
                gathers = ((family.query_rows, _rows, query_dims),
                           (family.kv_rows, _rows, unit_rows(groups, shape.head_dim)),
                           (family.head_columns, _columns, query_dims),
                           (family.neuron_rows, _rows, neurons), (family.neuron_columns, _columns, neurons))
                for roles, gather, kept in gathers:
                    for role in roles:
                        family.replace(layer, role, gather(family.module(layer, role), kept))
                removed = ~query_kept[queries]
                if removed.any():
                    output = family.head_output(layer).weight.data
                    output.view(output.shape[0], len(queries), shape.head_dim)[:, removed] = 0
                family.set_head_count(layer, len(queries))
        yield
    finally:
        for layer, modules in saved:
            for role, module in modules.items():
                family.replace(layer, role, module)
            family.set_head_count(layer, shape.query_heads)
