"""What a generated token reads: the axis on which sparsity methods of different kinds compare.

Methods skip different things (ShadowLLM and DejaVu attention heads and FFN units; TEAL input channels; CATS
intermediate channels), so their "50%" differ; what a decoding step costs at small batch sizes is what it reads.
Every method is counted by the same rules, as shares of the dense step's parameters:

- each layer's projections count by the share of their weight read, per role: rows of the kept query heads
  (query), of the key-value heads in use (key, value: with query-head units, those any kept query head reads),
  columns of the kept query heads (output), rows of the kept FFN units (gate, up) and their columns (down); TEAL
  the columns of the input channels above its thresholds, CATS the up rows and down columns of the units above
  its; averaged over the real tokens (padding counts nowhere) or the masks (one per request); a projection's bias
  follows its rows (the output and down projections' biases are read whole);
- norms and every other parameter outside the projections count whole; an embedding table one row per token (on
  OPT also its position's), and the LM head whole: it reads its V × E matrix at every step, tied or not;
- a layer whose mask is known only after it ran is read whole up to there: with per-token masks, the layer a
  predictor reads computes every head's query, key and value first (ShadowLLM's layer 0; every layer of
  DejaVu-style without lookahead), and a layer predicted from a later one runs whole;
- the predictors: their parameters at every token (per-token masks), or once per request, amortised over the
  tokens the request scores (per-request masks); ``predictor_read`` gives that share alone.

Two readings of zeros, the same for every method:
- ``weights_read`` (structural): an input entry that is exactly zero without the method (ReLU's zeros on OPT)
  is read, as a dense kernel reads it; the method is credited only with what it decides to skip;
- ``weights_read_effective``: every projection read by columns also skips the columns of its input entries that
  are exactly zero at that token, as a kernel that tests its input for zero does (measured at each projection's
  input by ``InputCounter``); projections read by rows stay as structural.

``kv_read`` is reported apart: the share of the dense model's key-value cache that a generated token reads (the
key-value heads in use; every head of a layer computed whole, and under TEAL, CATS or no masks).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager

from torch import Tensor, nn

from shadow.arch import family_of
from shadow.policy import Masks, SparsityMeter


def sparsity_meter(model: nn.Module) -> SparsityMeter:
    """A meter of the masks applied to ``model``, counting its key-value heads in use too."""
    return SparsityMeter(kv_heads=family_of(model.config).shape(model.config, "kv_group").kv_heads)


def step_parameters(model: nn.Module) -> int:
    """The parameters a dense decoding step reads: every one, but one row of each embedding table, and the LM head
    whole (tied to the embeddings or not)."""
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    head = model.get_output_embeddings()
    tied = head is not None and any(head.weight is m.weight for m in embeddings)
    return (sum(p.numel() for p in model.parameters()) - sum(m.weight.numel() for m in embeddings)
            + sum(m.weight.shape[1] for m in embeddings) + (head.weight.numel() if tied else 0))


def unit_reads(model: nn.Module, per_layer: dict[str, list[float]]) -> dict[str, list[float]]:
    """Each projection role's (L,) share read, from the achieved sparsity per layer of heads, key-value heads
    (when reported: query-head units) and neurons, as ``SparsityMeter.per_layer`` gives it; {} for no masks."""
    family = family_of(model.config)
    if not per_layer:
        return {}
    heads = [1 - s for s in per_layer["head_sparsity"]]
    neurons = [1 - s for s in per_layer["neuron_sparsity"]]
    return {**{role: heads for role in family.query_rows + family.head_columns},
            **{role: kv_shares(per_layer) for role in family.kv_rows},
            **{role: neurons for role in family.neuron_rows + family.neuron_columns}}


def kv_shares(per_layer: dict[str, list[float]]) -> list[float]:
    """(L,) share of each layer's key-value heads in use under unit masks (``SparsityMeter.per_layer``)."""
    return [1 - s for s in per_layer.get("kv_head_sparsity", per_layer["head_sparsity"])]


def read_whole(model: nn.Module, reads: dict[str, list[float]], kv: list[float], qkv_layers: Iterable[int],
               whole_layers: Iterable[int]) -> tuple[dict[str, list[float]], list[float]]:
    """``reads`` and the key-value shares ``kv`` with ``qkv_layers``' query, key and value projections (and their
    cache) read whole, and every projection of ``whole_layers``."""
    family = family_of(model.config)
    count = len(family.layers(model))
    reads, kv = {role: list(reads.get(role, [1.0] * count)) for role in family.paths}, list(kv)
    for layer in qkv_layers:
        for role in family.query_rows + family.kv_rows:
            reads[role][layer] = 1.0
        kv[layer] = 1.0
    for layer in whole_layers:
        for shares in reads.values():
            shares[layer] = 1.0
        kv[layer] = 1.0
    return reads, kv


def weights_read(model: nn.Module, reads: dict[str, list[float]], rows: tuple[str, ...] | None = None) -> float:
    """The share of the dense decoding step's parameters read per token, given each projection role's (L,) share
    read in every layer (roles not given: whole). ``rows``: the roles whose share is of rows, whose bias goes with
    them (by default those whose rows belong to a head or unit); the others' is of columns, their bias read
    whole."""
    family = family_of(model.config)
    dense = step_parameters(model)
    rows = row_roles(model) if rows is None else rows

    def size(projection: nn.Linear, role: str) -> int:  # what skipping all of it saves: a row's bias goes with it
        has_bias = role in rows and projection.bias is not None
        return projection.weight.numel() + (projection.bias.numel() if has_bias else 0)

    skipped = sum((1 - float(share)) * size(family.module(layer, role), role)
                  for role, shares in reads.items()
                  for layer, share in zip(family.layers(model), shares, strict=True))
    return (dense - skipped) / dense


def row_roles(model: nn.Module) -> tuple[str, ...]:
    """The roles unit masks read by rows: the query, key and value projections and the FFN's gate and up."""
    family = family_of(model.config)
    return family.query_rows + family.kv_rows + family.neuron_rows


def masks_read(model: nn.Module, masks: Masks | None, whole: tuple[str, ...] = ()) -> float:
    """The share of the dense step's parameters read per token under ``masks`` (any leading dimensions: requests,
    tokens), or under none: the layers' weights alone (structural; no predictor); the projections of the roles
    ``whole`` read whole whatever the masks (key and value projections computed for every head)."""
    meter = sparsity_meter(model)
    if masks is not None:
        meter.add(masks)
    reads = unit_reads(model, meter.per_layer())
    layers = len(family_of(model.config).layers(model))
    return weights_read(model, {**reads, **{role: [1.0] * layers for role in whole}})


class RealTokens:
    """The real tokens of the model's current forward: its attention mask (padding is 0), captured by a pre-hook
    on the model; every token when it is called without one."""

    def __init__(self, model: nn.Module):
        self.mask: Tensor | None = None
        self.handle = model.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self.mask = None if mask is None or mask.dim() != 2 else mask.bool()

    def count(self, hits: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor | int]:
        """How many of the boolean ``hits`` (B, T, channels) or flattened (B·T, channels) lie at real tokens (of
        those, at the (B, T) ``positions`` where given), and how many entries lie there: counted on the device, no
        host read."""
        rows = hits.reshape(-1, hits.shape[-1])
        mask = self.mask if positions is None or self.mask is None else self.mask & positions.to(self.mask.device)
        if mask is None or mask.numel() != len(rows):
            return rows.sum(), rows.numel()
        real = mask.flatten().to(hits.device)[:, None]
        return (rows & real).sum(), real.sum() * rows.shape[1]

    def remove(self) -> None:
        self.handle.remove()


class InputCounter(AbstractContextManager):
    """Inside the block, counts the nonzero entries at real tokens in the input of every projection of every layer,
    as the projection sees it (after masks and thresholds), in the forwards run inside ``counting()`` (the
    evaluated ones, not those that compute masks): what ``weights_read_effective`` reads. Counts stay on the
    device until ``shares`` reads them."""

    def __init__(self, model: nn.Module):
        self.model, self.family = model, family_of(model.config)
        self.counts: dict[tuple[str, int], list] = {}  # (role, layer) → [nonzero, seen]
        self.handles: list = []
        self.active = False
        self.positions: Tensor | None = None

    @contextmanager
    def counting(self, positions: Tensor | None = None) -> Iterator[None]:
        """Count the forwards run inside the block, at their (B, T) ``positions`` where given (those run under
        masks: GRIFFIN's context runs whole, as its prompt does) and at every real token otherwise."""
        self.active, self.positions = True, positions
        try:
            yield
        finally:
            self.active, self.positions = False, None

    def __enter__(self) -> InputCounter:
        tokens = RealTokens(self.model)
        self.handles.append(tokens)
        for role in self.family.paths:
            for index, layer in enumerate(self.family.layers(self.model)):
                def count(module: nn.Module, args: tuple, out: Tensor, key=(role, index)) -> None:
                    if not self.active:
                        return
                    nonzero, seen = tokens.count(args[0] != 0, self.positions)
                    totals = self.counts.setdefault(key, [0, 0])
                    totals[0], totals[1] = totals[0] + nonzero, totals[1] + seen
                self.handles.append(self.family.module(layer, role).register_forward_hook(count))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def shares(self) -> dict[str, list[float]]:
        """Each role's (L,) share of nonzero input entries (1 where none was seen)."""
        layers = range(len(self.family.layers(self.model)))

        def share(key: tuple[str, int]) -> float:
            nonzero, seen = (float(v) for v in self.counts.get(key, (1, 1)))
            return nonzero / seen if seen else 1.0
        return {role: [share((role, index)) for index in layers] for role in self.family.paths}


def token_reads(model: nn.Module, reads: dict[str, list[float]], rows: tuple[str, ...], nonzero: dict[str, list[float]],
                kv: list[float], predictor: float) -> dict[str, float]:
    """A job's metrics of what a token reads: ``weights_read`` (structural ``reads`` with ``rows`` read by rows, and
    the ``predictor`` share), ``weights_read_effective`` (the projections read by columns reading only their
    ``nonzero`` input entries), ``predictor_read`` and ``kv_read`` (the mean of the (L,) key-value shares)."""
    columns = [role for role in nonzero if role not in rows]
    effective = {**reads, **{role: [min(a, b) for a, b in zip(reads.get(role, nonzero[role]), nonzero[role],
                                                               strict=True)] for role in columns}}
    return {"weights_read": weights_read(model, reads, rows) + predictor,
            "weights_read_effective": weights_read(model, effective, rows) + predictor,
            "predictor_read": predictor, "kv_read": sum(kv) / len(kv)}
