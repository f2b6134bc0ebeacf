"""Weights read per generated token: the axis on which sparsity methods of different kinds compare.

Methods skip different things (ShadowLLM and DejaVu attention heads and FFN units; others input or intermediate
channels), so their "50%" differ; what a decoding step costs at small batch sizes is the weights it reads. The
share of the dense step's parameters that a step reads under the masks applied:

- each layer's projections count by the share of their weight read, per role: rows of the kept query heads
  (query), of the key-value heads in use (key, value: with query-head units, those any kept query head reads),
  columns of the kept query heads (output), rows of the kept FFN units (gate, up) and their columns (down);
  averaged over the masks (one per request, or one per token); a projection's bias follows its rows (the
  output and down projections' biases are read whole);
- norms and every other parameter outside the projections count whole;
- an embedding table counts one row per token (the token's; on OPT also its position's), and the LM head whole:
  it reads its V × E matrix at every step, tied to the embeddings or not.

The predictors' own weights are not counted: their cost is reported apart (the latency table's predictor share).
"""

from __future__ import annotations

from torch import nn

from shadow.arch import family_of
from shadow.policy import Masks, SparsityMeter


def sparsity_meter(model: nn.Module) -> SparsityMeter:
    """A meter of the masks applied to ``model``, counting its key-value heads in use too."""
    return SparsityMeter(kv_heads=family_of(model.config).shape(model.config, "kv_group").kv_heads)


def unit_reads(model: nn.Module, per_layer: dict[str, list[float]]) -> dict[str, list[float]]:
    """Each projection role's (L,) share read, from the achieved sparsity per layer of heads, key-value heads
    (when reported: query-head units) and neurons, as ``SparsityMeter.per_layer`` gives it; {} for no masks."""
    family = family_of(model.config)
    if not per_layer:
        return {}
    heads = [1 - s for s in per_layer["head_sparsity"]]
    kv = [1 - s for s in per_layer.get("kv_head_sparsity", per_layer["head_sparsity"])]
    neurons = [1 - s for s in per_layer["neuron_sparsity"]]
    return {**{role: heads for role in family.query_rows + family.head_columns},
            **{role: kv for role in family.kv_rows},
            **{role: neurons for role in family.neuron_rows + family.neuron_columns}}


def weights_read(model: nn.Module, reads: dict[str, list[float]], rows: tuple[str, ...] | None = None) -> float:
    """The share of the dense decoding step's parameters read per token, given each projection role's (L,) share
    read in every layer (roles not given: whole). ``rows``: the roles whose share is of rows, whose bias goes with
    them (by default those whose rows belong to a head or unit); the others' is of columns, their bias read
    whole."""
    family = family_of(model.config)
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    head = model.get_output_embeddings()
    tied = head is not None and any(head.weight is m.weight for m in embeddings)
    dense = (sum(p.numel() for p in model.parameters()) - sum(m.weight.numel() for m in embeddings)
             + sum(m.weight.shape[1] for m in embeddings) + (head.weight.numel() if tied else 0))
    rows = family.query_rows + family.kv_rows + family.neuron_rows if rows is None else rows

    def size(projection: nn.Linear, role: str) -> int:  # what skipping all of it saves: a row's bias goes with it
        has_bias = role in rows and projection.bias is not None
        return projection.weight.numel() + (projection.bias.numel() if has_bias else 0)

    skipped = sum((1 - float(share)) * size(family.module(layer, role), role)
                  for role, shares in reads.items()
                  for layer, share in zip(family.layers(model), shares, strict=True))
    return (dense - skipped) / dense


def masks_read(model: nn.Module, masks: Masks | None) -> float:
    """The share of the dense step's parameters read per token under ``masks`` (any leading dimensions: requests,
    tokens), or under none."""
    meter = sparsity_meter(model)
    if masks is not None:
        meter.add(masks)
    return weights_read(model, unit_reads(model, meter.per_layer()))
