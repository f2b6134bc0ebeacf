"""Predictors and the mask sources built on them (``shadow.placements`` says which placement uses which).

A predictor is one network per group (a feature layer and the layers it predicts) for heads and one for FFN
units. Each is an MLP (Linear → ReLU → Linear, the paper's, hidden sizes from conf/predictor/shadow.yaml) or
DejaVu's low-rank linear map (``predictor.arch=lowrank``, rank = the hidden size). Inputs are min–max normalised
per example; targets are the criterion's per-example scores, min–max normalised per layer (the paper's better
variant) or over all layers; training is MSE with AdamW and a cosine schedule, on a held-out split per kind.
Masks are per request (one from the prompt) or per token (``predictor.granularity=token``: position t's mask
from the features at t, recomputed at every step as DejaVu does).

Two options cut what a predictor costs where it runs at every token: ``predictor.neuron_rank`` factors the neuron
network's output layer (hidden × L·F weights, most of the predictor) through a rank, trained as such; and
``predictor.dtype`` runs the trained float32 networks in float16/bfloat16 or, on the CPU, int8 (torch's dynamic
quantisation: int8 weights per output channel, activations quantised per call). docs/benchmarks.md (the predictor's
cost) has their measured effect on held-out ρ and perplexity.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from shadow.arch import Shape, family_of
from shadow.config import PredictorConfig
from shadow.criteria import Criterion
from shadow.data import Example, collate, pad
from shadow.offload import input_device
from shadow.policy import Masks, Policy
from shadow.traces import TraceShards, layer_features, score_batch

log = logging.getLogger(__name__)
EPS = 1e-12
TOKEN_CHUNK = 128  # positions scored at once by per-token masks: OPT-1.3B, batch 8 → 0.8 GB of float32 scores


def minmax(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    return (x - lo) / (hi - lo).clamp(min=EPS)


def normalise_inputs(features: Tensor) -> Tensor:
    """A predictor's input: each attention output min–max normalised over its features."""
    return minmax(features.float(), (-1,))


def normalise_targets(scores: Tensor, how: str) -> Tensor:
    """(N, L, U) scores → [0, 1] per example and layer (``per_layer``) or per example (``global``)."""
    return minmax(scores, (2,) if how == "per_layer" else (1, 2))


def example_scales(scores: Tensor) -> tuple[Tensor, Tensor]:
    """(N, L, U) scores → each layer's (N, L) offset and span on its example's whole scale: where the layer's minimum
    and its range sit within the example's overall [min, max], so that offset + p · span maps a per-layer normalised
    score p back to the example's globally normalised one exactly."""
    low, high = scores.amin(2), scores.amax(2)
    bottom = low.amin(1, keepdim=True)
    width = (high.amax(1, keepdim=True) - bottom).clamp(min=EPS)
    return (low - bottom) / width, (high - low) / width


@dataclass(frozen=True)
class LayerScales:
    """Where each layer's per-layer normalised scores sit on a scale shared by every layer: (2, L) offsets and
    spans, heads then FFN units, the mean over calibration examples of each example's own (``example_scales``).

    Per-layer normalisation (the paper's better target) leaves every layer of every example holding a 0 and a 1,
    so ranking such scores across layers (a global or hybrid policy) compares shapes, not importance: with a few
    units per layer (key-value groups) the choice falls to ties. ``restore`` puts them back on one scale; within a
    layer it keeps their order, so a local policy's masks do not change."""

    offset: Tensor
    span: Tensor

    @classmethod
    def identity(cls, layers: int) -> LayerScales:
        """Scores left as they are."""
        return cls(torch.zeros(2, layers), torch.ones(2, layers))

    @classmethod
    def of(cls, traces: TraceShards) -> LayerScales:
        """The calibration set's mean scales, read one shard at a time."""
        layers = traces.shape("heads")[0]
        offset, span = torch.zeros(2, layers), torch.zeros(2, layers)
        for index in range(len(traces.sizes)):
            shard = traces.read(index, ["heads", "neurons"])
            for row, kind in enumerate(("heads", "neurons")):
                example_offset, example_span = example_scales(shard[kind].float())
                offset[row] += example_offset.sum(0)
                span[row] += example_span.sum(0)
        return cls(offset / len(traces), span / len(traces))

    def restore(self, heads: Tensor, neurons: Tensor, layers: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """(..., L, H) head and (..., L, F) neuron scores normalised per layer (of ``layers``, by default all) on
        the shared scale."""
        pick = slice(None) if layers is None else list(layers)
        offset, span = self.offset[:, pick].to(heads.device), self.span[:, pick].to(heads.device)
        return offset[0, :, None] + heads * span[0, :, None], offset[1, :, None] + neurons * span[1, :, None]


def static_importance(traces: TraceShards, how: str, scales: LayerScales | None = None) -> tuple[Tensor, Tensor]:
    """One (L, H) head and (L, F) neuron importance for every input: the mean over calibration examples of each
    example's normalised scores, so that no example (a long one, a task with long answers) outweighs another;
    with ``scales``, per-layer normalised scores put on the shared scale. Read one shard at a time."""
    sums = [torch.zeros(traces.shape(kind)) for kind in ("heads", "neurons")]
    for index in range(len(traces.sizes)):
        shard = traces.read(index, ["heads", "neurons"])
        for total, kind in zip(sums, ("heads", "neurons"), strict=True):
            total += normalise_targets(shard[kind].float(), how).sum(0)
    heads, neurons = sums[0] / len(traces), sums[1] / len(traces)
    return (heads, neurons) if scales is None else scales.restore(heads, neurons)


Groups = tuple[tuple[int, tuple[int, ...]], ...]  # (feature layer, the layers it predicts), one per network


def network(arch: str, inputs: int, hidden: int, outputs: int, rank: int | None = None) -> nn.Sequential:
    """An MLP or a low-rank map; with ``rank``, its output layer factored as (hidden → rank → outputs)."""
    first = [nn.Linear(inputs, hidden, bias=False)] if arch == "lowrank" else [nn.Linear(inputs, hidden), nn.ReLU()]
    output = [nn.Linear(hidden, rank, bias=False), nn.Linear(rank, outputs)] if rank else [nn.Linear(hidden, outputs)]
    return nn.Sequential(*first, *output)  # built in this order: a seed gives the same networks as ever


def _input_weight(net: nn.Sequential) -> Tensor | None:
    """The weight of a network's first layer; None for an int8 layer (dynamically quantised: on the CPU, taking
    float32 inputs), whose ``weight`` is a method."""
    weight = net[0].weight
    return weight if isinstance(weight, Tensor) else None


class Predictor(nn.Module):
    """One head network and one neuron network per group; together they cover every layer once."""

    def __init__(self, shape: Shape, hidden_size: int, groups: Groups, arch: str, head_hidden: int,
                 neuron_hidden: int | None, heads_only: bool, neuron_rank: int | None = None):
        super().__init__()
        self.shape, self.groups, self.arch, self.heads_only = shape, groups, arch, heads_only
        self.neuron_rank = neuron_rank
        self.feature_layers = sorted({layer for layer, _ in groups})
        self.heads = nn.ModuleList(network(arch, hidden_size, head_hidden, len(t) * shape.heads) for _, t in groups)
        self.neurons = nn.ModuleList() if heads_only else nn.ModuleList(  # head-only criteria score no neuron
            network(arch, hidden_size, neuron_hidden, len(t) * shape.neurons, neuron_rank) for _, t in groups)
        identity = LayerScales.identity(shape.layers)  # buffers: they follow the networks to their device
        self.register_buffer("scale_offset", identity.offset)
        self.register_buffer("scale_span", identity.span)

    @property
    def scales(self) -> LayerScales:
        """How its per-layer normalised predictions are put on one scale across layers (identity: as predicted)."""
        return LayerScales(self.scale_offset, self.scale_span)

    def use_scales(self, scales: LayerScales | None) -> Predictor:
        """Predict on ``scales``' shared scale (None: each layer's normalised scores as they are)."""
        scales = scales or LayerScales.identity(self.shape.layers)
        self.scale_offset.copy_(scales.offset)
        self.scale_span.copy_(scales.span)
        return self

    @classmethod
    def configured(cls, shape: Shape, hidden_size: int, groups: Groups, cfg: PredictorConfig,
                   heads_only: bool) -> Predictor:
        """Untrained networks for ``groups`` as the ``predictor`` config sets them."""
        return cls(shape, hidden_size, groups, cfg.arch, cfg.head_hidden, cfg.neuron_hidden, heads_only,
                   cfg.neuron_rank)

    @property
    def device(self) -> torch.device:
        weight = _input_weight(self.heads[0])
        return weight.device if weight is not None else torch.device("cpu")

    def run_as(self, dtype: str) -> Predictor:
        """Convert the trained float32 networks in place to run in ``dtype`` (config.PREDICTOR_DTYPES): float16 or
        bfloat16 weights, or int8 by torch's dynamic quantisation of every Linear (CPU only)."""
        if dtype == "int8":
            if self.device.type != "cpu":
                raise ValueError(f"predictor.dtype=int8 runs on the CPU only, not on {self.device}")
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            with warnings.catch_warnings():  # torch.ao announces its move to torchao, whose CPU path is slower
                warnings.simplefilter("ignore")
                quantize_dynamic(self, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
        else:
            self.to(getattr(torch, dtype))
        return self

    def inputs(self, features: Tensor, group: int) -> Tensor:
        """The group's normalised input from (..., len(feature_layers), E) features."""
        return normalise_inputs(features[..., self.feature_layers.index(self.groups[group][0]), :])

    def network_scores(self, kind: str, group: int, feature: Tensor) -> Tensor:
        """(..., len(targets) · units) float32 scores of a group's ``kind`` network ("heads" or "neurons") from its
        feature layer's raw (..., E) attention output."""
        net = (self.heads if kind == "heads" else self.neurons)[group]
        weight, x = _input_weight(net), normalise_inputs(feature)
        return net(x if weight is None else x.to(weight.dtype)).float()

    def group_scores(self, group: int, feature: Tensor) -> tuple[Tensor, Tensor]:
        """One group's (..., len(targets), H) head and (..., len(targets), F) neuron scores from its feature
        layer's raw (..., E) attention output, on the predictor's ``scales``."""
        targets = self.groups[group][1]
        heads = self.network_scores("heads", group, feature).unflatten(-1, (len(targets), -1))
        if self.heads_only:  # every unit kept: no score to restore
            neurons = heads.new_zeros(*heads.shape[:-1], self.shape.neurons)
            return self.scales.restore(heads, neurons, targets)[0], neurons
        return self.scales.restore(heads, self.network_scores("neurons", group, feature).unflatten(
            -1, (len(targets), -1)), targets)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(..., len(feature_layers), E) raw features → predicted (..., L, H) head and (..., L, F) neuron scores."""
        lead = features.shape[:-2]
        heads = features.new_zeros(*lead, self.shape.layers, self.shape.heads, dtype=torch.float32)
        neurons = features.new_zeros(*lead, self.shape.layers, self.shape.neurons, dtype=torch.float32)
        for g, (layer, targets) in enumerate(self.groups):
            group_heads, group_neurons = self.group_scores(g, features[..., self.feature_layers.index(layer), :])
            heads[..., list(targets), :] = group_heads
            neurons[..., list(targets), :] = group_neurons
        return heads, neurons


def average_ranks(x: Tensor) -> Tensor:
    """Per-row ranks of (N, K) values, ties given their average rank (as scipy.stats.rankdata)."""
    ordered = x.sort(dim=1).values.contiguous()
    below = torch.searchsorted(ordered, x.contiguous(), side="left")
    through = torch.searchsorted(ordered, x.contiguous(), side="right")
    return (below + through - 1).float() / 2


def spearman(pred: Tensor, target: Tensor) -> Tensor:
    """Per-row Spearman rank correlation of (N, K) predictions and targets: Pearson's on average ranks."""
    def centred(x: Tensor) -> Tensor:
        r = average_ranks(x)
        return r - r.mean(dim=1, keepdim=True)
    rp, rt = centred(pred), centred(target)
    return (rp * rt).sum(1) / (rp.norm(dim=1) * rt.norm(dim=1)).clamp(min=EPS)


def top_recall(pred: Tensor, target: Tensor, keep: float = 0.5) -> Tensor:
    """Per-row fraction of the target's top ``keep`` units that the prediction's top ``keep`` also holds."""
    k = max(1, round(keep * pred.shape[1]))
    hit = torch.zeros_like(pred, dtype=torch.bool).scatter_(1, pred.topk(k, dim=1).indices, True)
    return hit.gather(1, target.topk(k, dim=1).indices).float().mean(1)


def per_example_quality(pred: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Spearman ρ and top-50% recall of (N, L, U) predictions per example: over all units (the global ranking,
    (N,)) and within each layer (the local ranking, (N, L)), and the squared error summed per example."""
    N, L, U = pred.shape
    per_layer = pred.reshape(N * L, U), target.reshape(N * L, U)
    return {"val_spearman": spearman(pred.flatten(1), target.flatten(1)),
            "val_recall50": top_recall(pred.flatten(1), target.flatten(1)),
            "layer_val_spearman": spearman(*per_layer).view(N, L),
            "layer_val_recall50": top_recall(*per_layer).view(N, L),
            "squared_error": (pred - target).pow(2).flatten(1).sum(1)}


def split_by_document(documents: Sequence[str], val_fraction: float, seed: int) -> tuple[Tensor, Tensor, int]:
    """(train, held-out) example indices and the number of held-out documents: whole documents, in a seeded
    order, are held out until they hold ``val_fraction`` of the examples, so that no held-out example shares a
    document with a training one."""
    names = sorted(set(documents))
    if len(names) < 2:
        raise ValueError(f"the calibration examples come from {len(names)} document(s); a held-out split needs two")
    order = [names[i] for i in torch.randperm(len(names), generator=torch.Generator().manual_seed(seed))]
    sizes = Counter(documents)
    want = max(1, round(len(documents) * val_fraction))
    held, count = set(), 0
    for name in order[:-1]:  # at least one document is left to train on
        if count >= want:
            break
        held.add(name)
        count += sizes[name]
    val = torch.tensor([i for i, d in enumerate(documents) if d in held])
    train = torch.tensor([i for i, d in enumerate(documents) if d not in held])
    return train, val, len(held)


class _Blocks:
    """One kind's training data in blocks of consecutive trace shards, each holding at most ``block_bytes`` (and at
    least one shard), read a block at a time onto the training device: the raw features of the predictor's
    feature layers (n, len(feature_layers), E) and the normalised targets (n, L, U). Training shuffles the rows
    within a block and the order of the blocks, so a set that fits one block is shuffled as a whole; the last
    block read is kept."""

    def __init__(self, traces: TraceShards, kind: str, feature_layers: list[int], target_norm: str,
                 device: torch.device, block_bytes: float):
        self.traces, self.kind, self.layers, self.norm, self.device = traces, kind, feature_layers, target_norm, device
        example = 4 * (len(feature_layers) * traces.shape("features")[-1] + math.prod(traces.shape(kind)))
        self.blocks: list[list[int]] = [[]]
        for index, size in enumerate(traces.sizes):
            if self.blocks[-1] and (sum(traces.sizes[i] for i in self.blocks[-1]) + size) * example > block_bytes:
                self.blocks.append([])
            self.blocks[-1].append(index)
        self.last: tuple[int, Tensor, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, block: int) -> tuple[Tensor, Tensor]:
        if self.last is None or self.last[0] != block:
            self.last = None  # free the previous block before reading the next
            shards = self.blocks[block]
            features = torch.cat([self.traces.read(i, ["features"], self.layers)["features"] for i in shards])
            targets = torch.cat([self.traces.read(i, [self.kind])[self.kind] for i in shards])
            self.last = (block, features.to(self.device), normalise_targets(targets.to(self.device).float(),
                                                                            self.norm))
        return self.last[1], self.last[2]

    def rows(self, block: int, examples: Tensor) -> Tensor:
        """Of the global example indices ``examples``, those in ``block``, as rows of it."""
        start = self.traces.offsets[self.blocks[block][0]]
        end = start + sum(self.traces.sizes[i] for i in self.blocks[block])
        return examples[(examples >= start) & (examples < end)] - start


def train_network(net: nn.Module, data: _Blocks, group: int, predictor: Predictor, train: Tensor, epochs: int,
                  batch_size: int, lr: float, weight_decay: float, seed: int, desc: str) -> None:
    """MSE regression of a group's targets on its inputs over the ``train`` examples: AdamW, cosine schedule,
    seeded shuffles of the blocks' order and of each block's rows."""
    blocks = range(len(data))
    rows = [data.rows(i, train) for i in blocks]
    targets = list(predictor.groups[group][1])
    steps = epochs * sum(math.ceil(len(r) / batch_size) for r in rows)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    gen = torch.Generator().manual_seed(seed)

    def train_block(features: Tensor, y: Tensor, rows: Tensor) -> None:  # holds the block only while it trains
        for idx in rows[torch.randperm(len(rows), generator=gen)].split(batch_size):
            idx = idx.to(data.device)
            loss = nn.functional.mse_loss(net(predictor.inputs(features[idx], group)), y[idx][:, targets].flatten(1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()

    net.train()
    for _ in tqdm(range(epochs), desc=desc, unit="epoch"):
        order = torch.randperm(len(blocks), generator=gen).tolist() if len(blocks) > 1 else [0]
        for index in order:
            train_block(*data[index], rows[index])
    net.eval()


@torch.no_grad()
def evaluate_held_out(data: _Blocks, kind: str, predictor: Predictor, val: Tensor) -> dict[str, Tensor]:
    """``per_example_quality`` of the ``kind`` networks, as they run, summed over the held-out examples, a block at
    a time."""
    def block_quality(features: Tensor, y: Tensor, rows: Tensor) -> dict[str, Tensor]:
        pred = torch.zeros_like(y[rows])
        for g, (layer, targets) in enumerate(predictor.groups):
            feature = features[rows][:, predictor.feature_layers.index(layer)]
            pred[:, list(targets)] = predictor.network_scores(kind, g, feature).view(len(rows), len(targets), -1)
        return per_example_quality(pred, y[rows])

    sums: dict[str, Tensor] = {}
    for index in range(len(data)):
        rows = data.rows(index, val).to(data.device)
        if len(rows):
            for key, value in block_quality(*data[index], rows).items():
                sums[key] = sums.get(key, 0) + value.sum(0)
    return sums


def _kinds(predictor: Predictor, cfg: PredictorConfig) -> list[tuple[str, nn.ModuleList, int, int, float]]:
    """Each kind a predictor has: its networks, epochs, batch size and held-out fraction."""
    kinds = [("heads", predictor.heads, cfg.head_epochs, cfg.head_batch_size, cfg.head_val_fraction)]
    if not predictor.heads_only:
        kinds.append(("neurons", predictor.neurons, cfg.neuron_epochs, cfg.neuron_batch_size, cfg.neuron_val_fraction))
    return kinds


def fit_predictor(traces: TraceShards, documents: Sequence[str], shape: Shape, groups: Groups, cfg: PredictorConfig,
                  seed: int, heads_only: bool, device: torch.device | str) -> tuple[Predictor, dict]:
    """Train networks for ``groups`` on ``device``, streaming the traces in blocks of at most ``cfg.block_gb``;
    report held-out quality overall and per layer. Examples are held out by ``documents`` (one per example);
    ``heads_only``: no FFN-unit networks (nothing to predict). Per-layer normalised targets give the predictor the
    calibration set's ``LayerScales``."""
    torch.manual_seed(seed)
    device = torch.device(device)
    predictor = Predictor.configured(shape, traces.shape("features")[-1], groups, cfg, heads_only).to(device)
    for kind, nets, epochs, batch_size, val_fraction in _kinds(predictor, cfg):
        data = _Blocks(traces, kind, predictor.feature_layers, cfg.target_norm, device, cfg.block_gb * 1e9)
        train, _, _ = split_by_document(documents, val_fraction, seed)
        for g, (_, targets) in enumerate(groups):
            where = f" layer {targets[0]}" if len(groups) > 1 else ""
            train_network(nets[g], data, g, predictor, train, epochs, batch_size, cfg.lr, cfg.weight_decay, seed,
                          f"predictor ({kind}{where})")
    if cfg.target_norm == "per_layer":  # targets normalised over all layers are on one scale already
        predictor.use_scales(LayerScales.of(traces))
    predictor.eval()
    return predictor, held_out_report(traces, documents, predictor, cfg, seed)


def held_out_report(traces: TraceShards, documents: Sequence[str], predictor: Predictor, cfg: PredictorConfig,
                    seed: int) -> dict:
    """The predictor's quality, as it runs, on the examples of the documents its training held out: ``metrics``
    overall and ``per_layer`` lists, per kind."""
    metrics, per_layer = {}, {}
    for kind, _, _, _, val_fraction in _kinds(predictor, cfg):
        data = _Blocks(traces, kind, predictor.feature_layers, cfg.target_norm, predictor.device, cfg.block_gb * 1e9)
        _, val, held_documents = split_by_document(documents, val_fraction, seed)
        sums = evaluate_held_out(data, kind, predictor, val)
        units = predictor.shape.layers * (predictor.shape.heads if kind == "heads" else predictor.shape.neurons)
        metrics.update({f"predictor/{kind}_val_mse": sums["squared_error"].item() / (len(val) * units),
                        **{f"predictor/{kind}_{k}": sums[k].item() / len(val) for k in ("val_spearman",
                                                                                         "val_recall50")},
                        f"predictor/{kind}_val_examples": len(val),
                        f"predictor/{kind}_val_documents": held_documents})
        per_layer.update({f"{kind}_{k}": (sums[f"layer_{k}"] / len(val)).tolist()
                          for k in ("val_spearman", "val_recall50")})
    log.info("predictor: held-out Spearman ρ (%d unseen documents) %s", metrics["predictor/heads_val_documents"],
             ", ".join(f"{kind} {metrics[f'predictor/{kind}_val_spearman']:.3f}" for kind, *_ in
                       _kinds(predictor, cfg)))
    return {"metrics": metrics, "per_layer": per_layer}


class PredictedMasks:
    """A trained predictor as a mask source: features → predicted scores → the policy's masks.

    Per request, the features are those of each request's prompt at its last token; per token, those of the
    request's own input at every position (position t sees tokens up to t only, so nothing leaks).
    """

    def __init__(self, model: nn.Module, predictor: Predictor, policy: Policy, pad_id: int,
                 granularity: str):
        self.model, self.predictor, self.policy, self.pad_id = model, predictor, policy, pad_id
        self.granularity = granularity

    @torch.no_grad()
    def __call__(self, requests: Sequence) -> Masks:
        if self.granularity == "token":
            ids, attention = pad([r.tokens[:-1] for r in requests], self.pad_id)
            positions = None
        else:
            ids, attention = pad([r.prompt for r in requests], self.pad_id)
            positions = attention.sum(1) - 1
        features = layer_features(self.model, ids, attention, positions, self.predictor.feature_layers)
        if self.granularity != "token":
            return self.policy.select(*self.predictor(features.to(self.predictor.device)))
        # float32 scores of every position are (B, T, L, F): only a chunk of positions at a time becomes scores
        chunks = [self.policy.select(*self.predictor(chunk.to(self.predictor.device)))
                  for chunk in features.split(TOKEN_CHUNK, dim=1)]
        return Masks(torch.cat([m.heads for m in chunks], 1), torch.cat([m.neurons for m in chunks], 1))


class StaticMasks:
    """One mask for every request, from importance aggregated over the calibration set (``static_importance``)."""

    def __init__(self, heads: Tensor, neurons: Tensor, policy: Policy):
        self.masks = policy.select(heads[None], neurons[None])

    def __call__(self, requests: Sequence) -> Masks:
        n = len(requests)
        return Masks(self.masks.heads.expand(n, -1, -1), self.masks.neurons.expand(n, -1, -1))


def flock(x: Tensor, real: Tensor, units: int) -> Tensor:
    """GRIFFIN's statistic in one layer: the (B, T, units · width) activations ``x`` (or (B·T, …), as OPT's FFN
    has them), each of the (B, T) ``real`` tokens' divided by its ℓ2 norm, then each unit's columns' ℓ2 norm over
    the tokens: (B, units)."""
    z = x.reshape(*real.shape, -1).float() * real.to(x.device)[..., None]
    z = z / z.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return z.unflatten(-1, (units, -1)).pow(2).sum((1, 3)).sqrt()


class GriffinMasks:
    """GRIFFIN's masks (Dong et al. 2024, "flocking"): each request's FFN units from its own prompt, with no
    calibration and no predictor. In a dense pass over the prompt, each token's FFN intermediate activations (the
    down projection's input: act(gate(x)) · up(x), or OPT's ReLU of its up projection) are divided by their ℓ2
    norm, and unit j's statistic is the ℓ2 norm of its column over the prompt's tokens; the policy keeps the
    largest (GRIFFIN: the top-k of every layer, ``policy=local``). Attention units are scored alike from the output
    projection's input, each unit's columns together, and masked only where the policy's head sparsity asks it.
    The statistic is read from whichever pass runs the prompt: evaluation's own (``__call__``), or a decoder's
    dense prompt pass (``recording``), at no extra pass."""

    def __init__(self, model: nn.Module, shape: Shape, policy: Policy, pad_id: int):
        self.model, self.shape, self.policy, self.pad_id = model, shape, policy, pad_id

    @torch.no_grad()
    def __call__(self, requests: Sequence) -> Masks:
        ids, attention = pad([r.prompt for r in requests], self.pad_id)
        return self.policy.select(*self.statistics(ids, attention))

    def statistics(self, ids: Tensor, attention: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L, units) head and (B, L, F) neuron statistics of the (B, T) prompts, padding left out."""
        device = input_device(self.model)
        with self.recording(attention) as recorded:
            self.model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False)
        return recorded()

    @contextmanager
    def recording(self, attention: Tensor) -> Iterator[Callable[[], tuple[Tensor, Tensor]]]:
        """Inside the block, the model's forward over (B, T) prompts whose real tokens are ``attention``'s records
        the statistic; the function it yields gives it, (B, L, units) and (B, L, F), once the forward has run."""
        family = family_of(self.model.config)
        real = attention.bool()
        stats: dict[tuple[str, int], Tensor] = {}

        def record(key: tuple[str, int], units: int):
            return lambda module, args: stats.__setitem__(key, flock(args[0], real, units))

        handles = [family.module(layer, role).register_forward_pre_hook(record((kind, index), units))
                   for index, layer in enumerate(family.layers(self.model))
                   for kind, role, units in (("heads", family.head_columns[0], self.shape.heads),
                                             ("neurons", family.neuron_columns[0], self.shape.neurons))]
        layers = range(self.shape.layers)
        try:
            yield lambda: (torch.stack([stats["heads", i].to(real.device) for i in layers], 1),
                           torch.stack([stats["neurons", i].to(real.device) for i in layers], 1))
        finally:
            for handle in handles:
                handle.remove()


class OracleMasks:
    """The upper bound of any predictor: the criterion's own scores on each request's text, its loss on the
    tokens that are scored (so the mask has seen them), normalised as ``target_norm`` says (``global``: one scale
    for every layer, what ``LayerScales`` restores per-layer normalised predictions to).

    Scoring a batch is a forward and a backward pass; its scores do not depend on the policy or the sparsity, so
    the jobs of a sweep in one process (the basic launcher's) score each batch of the evaluation once: the scores
    of the last model, criterion and seed are kept, the same computation's results."""

    _scores: ClassVar[dict[tuple, tuple[Tensor, Tensor]]] = {}
    _of: ClassVar[tuple | None] = None

    def __init__(self, model: nn.Module, criterion: Criterion, shape: Shape, policy: Policy, target_norm: str,
                 pad_id: int, seed: int):
        self.model, self.criterion, self.shape, self.policy = model, criterion, shape, policy
        self.target_norm, self.pad_id, self.seed = target_norm, pad_id, seed

    def __call__(self, requests: Sequence) -> Masks:
        limit = self.model.config.max_position_embeddings  # a rolling window holds one token more than the input
        examples = [Example(tuple(w), max(1, len(w) - r.n_targets))
                    for w, r in zip((r.tokens[-limit:] for r in requests), requests, strict=True)]
        heads, neurons = self.scores(examples)
        return self.policy.select(normalise_targets(heads, self.target_norm),
                                  normalise_targets(neurons, self.target_norm))

    def scores(self, examples: list[Example]) -> tuple[Tensor, Tensor]:
        """The criterion's (B, L, H) head and (B, L, F) neuron scores of one batch, scored once per process."""
        of = (id(self.model), self.criterion, self.shape, self.pad_id, self.seed)
        if OracleMasks._of != of:
            OracleMasks._scores.clear()  # one model, criterion and seed at a time: a sweep's jobs share them
            OracleMasks._of = of
        key = tuple((e.input_ids, e.context_len) for e in examples)
        if key not in OracleMasks._scores:
            generator = torch.Generator().manual_seed(self.seed)
            _, heads, neurons = score_batch(self.model, collate(examples, self.pad_id), self.criterion, self.shape,
                                            generator)
            OracleMasks._scores[key] = heads, neurons
        heads, neurons = OracleMasks._scores[key]
        return heads, neurons


def save_predictor(predictor: Predictor, directory: Path) -> dict:
    """Write the weights as safetensors; returns what ``load_predictor`` needs to rebuild it."""
    save_file({k: v.contiguous() for k, v in predictor.state_dict().items()},
              str(directory / "predictor.safetensors"))
    first_heads = predictor.heads[0][0]
    return {"shape": asdict(predictor.shape), "groups": predictor.groups, "arch": predictor.arch,
            "hidden_size": first_heads.in_features, "head_hidden": first_heads.out_features,
            "neuron_hidden": None if predictor.heads_only else predictor.neurons[0][0].out_features,
            "neuron_rank": predictor.neuron_rank, "heads_only": predictor.heads_only}


def load_predictor(directory: Path, meta: dict) -> Predictor:
    groups = tuple((layer, tuple(targets)) for layer, targets in meta["groups"])
    predictor = Predictor(Shape(**meta["shape"]), meta["hidden_size"], groups, meta["arch"], meta["head_hidden"],
                          meta["neuron_hidden"], meta["heads_only"], meta["neuron_rank"])
    predictor.load_state_dict(load_file(str(directory / "predictor.safetensors")))
    return predictor.eval()
