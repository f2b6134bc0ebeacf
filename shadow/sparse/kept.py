"""What a decoding step keeps: the units of a request's fixed masks, the units a predictor selects at every token,
or the channels TEAL's or CATS' thresholds keep. A step asks one of these objects and reads only what it names."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from shadow.arch import Shape, family_of
from shadow.offload import input_device
from shadow.policy import Masks, Policy
from shadow.predictors import Predictor
from shadow.thresholds import channel_scales, scored, site_index, sites


@dataclass
class UnitSet:
    """One layer's mask at one decoding step, and the sorted indices the kernels read. Their lengths are known on
    the host before the mask is (static) under a local policy, so that nothing is read back from the device."""

    heads: Tensor  # (H,) bool, in attention units
    neurons: Tensor  # (F,) bool
    queries: Tensor  # the kept query heads
    kv_heads: Tensor  # the key-value heads to compute: every one a kept query head reads, and perhaps more
    units: Tensor  # the kept FFN units
    whole: bool = False  # every unit kept for the whole generation (a fixed mask): the dense products serve


def _leading(masks: Tensor, counts: list[int]) -> list[Tensor]:
    """Row i's first ``counts[i]`` units when a (n, U) mask's kept units are put first, in order (a stable sort):
    the kept units when ``counts[i]`` is how many row i keeps, padded with removed ones when it is more."""
    order = masks.to(torch.int8).sort(dim=-1, descending=True, stable=True).indices
    return [order[i, :count] for i, count in enumerate(counts)]


def unit_sets(shape: Shape, heads: Tensor, neurons: Tensor, counts: tuple[list[int], list[int]] | None
              ) -> list[UnitSet]:
    """The unit sets of n layers from their (n, H) head masks (in attention units) and (n, F) neuron masks.
    ``counts``: how many heads and neurons each layer keeps, where the host knows (a local policy); else the masks
    are read for them, once for all n layers. With query-head units and grouped-query attention under known
    counts, as many key-value groups are computed as query heads are kept (at most all), those in use first."""
    n = len(heads)
    queries = shape.query_mask(heads)
    groups = queries.view(n, shape.kv_heads, shape.group_size).any(-1)
    padded = False
    if counts is not None:
        head_counts, neuron_counts = counts
        query_counts = [count * shape.heads_per_unit for count in head_counts]
        padded = shape.attention_unit == "query_head" and shape.group_size > 1
        group_counts = [min(count, shape.kv_heads) for count in head_counts] if padded else head_counts
    else:  # one read of every count
        query_counts, group_counts, neuron_counts = torch.stack(
            [queries.sum(-1), groups.sum(-1), neurons.sum(-1)]).tolist()
    return [UnitSet(heads[i], neurons[i], q, g.sort().values if padded else g, u)
            for i, (q, g, u) in enumerate(zip(_leading(queries, query_counts), _leading(groups, group_counts),
                                              _leading(neurons, neuron_counts), strict=True))]


class FixedUnits:
    """The units of one mask for the whole generation (a request's, or the union of a batch's): every layer's set
    known before the first step, its sizes read once."""

    feature_layers: frozenset[int] = frozenset()  # no predictor runs in a step

    def __init__(self, shape: Shape, masks: Masks, device: torch.device):
        """``masks``: heads (1, L, H) and neurons (1, L, F) in ``shape``'s units."""
        sets = unit_sets(shape, masks.heads[0].to(device), masks.neurons[0].to(device), None)
        self.sets = {index: replace(kept, whole=len(kept.queries) == shape.query_heads
                                    and len(kept.units) == shape.neurons) for index, kept in enumerate(sets)}

    def at_step(self) -> dict[int, UnitSet]:
        """The sets known as a step starts, by layer: all of them."""
        return dict(self.sets)

    def varying(self, requests: int) -> str | None:
        """Why the sets' sizes are not known in advance for a batch of ``requests``: they always are."""
        return None

    def devices(self) -> set[str]:
        """Devices besides the model's that choosing the units runs on."""
        return set()


class PredictedUnits:
    """The units a predictor selects at every token from the step's own features, under a policy; a batch keeps
    the union of its requests' masks, whose size the scores decide."""

    def __init__(self, shape: Shape, predictor: Predictor, policy: Policy):
        self.shape, self.predictor, self.policy = shape, predictor, policy
        self.groups_at = {layer: [g for g, (f, _) in enumerate(predictor.groups) if f == layer]
                          for layer in predictor.feature_layers}
        self.feature_layers = frozenset(self.groups_at)

    def at_step(self) -> dict[int, UnitSet]:
        """None known as a step starts: each predictor adds its layers' when its features appear."""
        return {}

    def varying(self, requests: int) -> str | None:
        if self.policy.name != "local":
            return f"under policy={self.policy.name} the scores decide how many units a layer keeps; use policy=local"
        if requests > 1:
            return f"a batch of {requests} keeps the union of its masks, of varying size; decode one request at a time"
        return None

    def devices(self) -> set[str]:
        return {str(self.predictor.device)}

    def predict(self, layer: int, feature: Tensor, kept: dict[int, UnitSet]) -> None:
        """Run the predictors that read ``layer``'s (B, E) features and add their target layers' sets to ``kept``."""
        for group in self.groups_at[layer]:
            targets = self.predictor.groups[group][1]
            policy = replace(self.policy, dense_first_layer=self.policy.dense_first_layer and targets[0] == 0)
            masks = policy.select(*self.predictor.group_scores(group, feature.to(self.predictor.device)))
            n = len(targets)
            head_counts = policy.kept_counts(n, self.shape.heads, policy.head_sparsity) if len(feature) == 1 else None
            counts = None if head_counts is None else (
                head_counts, policy.kept_counts(n, self.shape.neurons, policy.neuron_sparsity))
            # a batch keeps the union of its requests' masks, whose size the scores decide
            sets = unit_sets(self.shape, masks.heads.any(0), masks.neurons.any(0), counts)
            kept.update(zip(targets, sets, strict=True))


class ThresholdedChannels:
    """The channels TEAL's, WINA's or CATS' thresholds keep at each site of each layer, the sites addressed by
    name."""

    def __init__(self, model: nn.Module, method: str, thresholds: Tensor):
        """``thresholds``: (sites, L), as ``Histograms.thresholds`` gives them for ``method`` (teal, wina or cats)."""
        self.method, self.sites = method, sites(model, method)
        layers = len(family_of(model.config).layers(model))
        if thresholds.shape != (len(self.sites), layers):
            raise ValueError(f"thresholds of shape {tuple(thresholds.shape)} for method={method}; it has "
                             f"{len(self.sites)} sites in each of {layers} layers: calibrate them with "
                             "shadow.thresholds.calibrate on this model")
        # on the model's device once: a captured step may not copy from the host
        self.thresholds, self.row = thresholds.to(input_device(model)), site_index(model, method)
        dtype = next(model.parameters()).dtype  # cast once: the step compares in the model's dtype
        self.scales = [[scale.to(self.thresholds.device, dtype) for scale in site] for site in scales] \
            if (scales := channel_scales(model, method)) else None

    def keep(self, site: str, layer: int, x: Tensor, read: Tensor) -> tuple[Tensor, Tensor]:
        """A site's (B, channels) entries with those below its threshold zeroed, and the (channels,) mask of those
        some request keeps, whose share goes to ``read`` (sites, L): on the device, nothing read back."""
        row = self.row[site]
        keep = scored(x, self.scales and self.scales[row][layer]) >= self.thresholds[row, layer].to(x.device, x.dtype)
        channels = keep.any(0)
        read[row, layer] = channels.float().mean()
        return x * keep, channels
