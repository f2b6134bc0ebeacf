"""Predictors and the mask sources built on them (the ``predictor`` config group).

- ``shadow`` (ShadowLLM): one predictor reads the attention output (before out_proj) of ``predictor.layer``
  (0 by default) at the last context token and predicts every layer's head and neuron importance.
- ``dejavu`` (DejaVu-style, as ShadowLLM ran it): one predictor per layer, reading that layer's own attention
  output from a dense pass, or the previous layer's with ``predictor.lookahead=true``.
- ``static``: one mask for every input, from importance averaged over the calibration set.
- ``oracle``: the criterion's own scores on each request, the upper bound of any predictor.
- ``dense``: no mask.

A predictor is an MLP (Linear → ReLU → Linear, hidden 2048 for heads and 1024 for neurons, the paper's) or
DejaVu's low-rank linear map (``predictor.arch=lowrank``, rank = the hidden size). Inputs are min–max normalised
per example; targets are the criterion's per-example scores, min–max normalised per layer (the paper's better
variant) or over all layers; training is MSE with AdamW and a cosine schedule, on a held-out split per kind.
Masks are per request (one from the prompt) or per token (``predictor.granularity=token``: position t's mask
from the features at t, recomputed at every step as DejaVu does).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from shadow.config import PredictorConfig
from shadow.criteria import Criterion
from shadow.data import Example, collate, pad
from shadow.models import Shape
from shadow.policy import Masks, Policy
from shadow.traces import layer_features, score_batch

log = logging.getLogger(__name__)
EPS = 1e-12


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


def static_importance(traces: dict[str, Tensor], how: str = "per_layer") -> tuple[Tensor, Tensor]:
    """One (L, H) head and (L, F) neuron importance for every input: the mean over calibration examples of each
    example's normalised scores, so that no example (a long one, a task with long answers) outweighs another."""
    return (normalise_targets(traces["heads"].float(), how).mean(0),
            normalise_targets(traces["neurons"].float(), how).mean(0))


Groups = tuple[tuple[int, tuple[int, ...]], ...]  # (feature layer, the layers it predicts), one per network


def placement_groups(name: str, layers: int, layer: int = 0, lookahead: bool = False) -> Groups:
    if name == "shadow":
        return ((layer, tuple(range(layers))),)
    return tuple((max(target - 1, 0) if lookahead else target, (target,)) for target in range(layers))


def network(arch: str, inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    if arch == "lowrank":
        return nn.Sequential(nn.Linear(inputs, hidden, bias=False), nn.Linear(hidden, outputs))
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, outputs))


class Predictor(nn.Module):
    """One head network and one neuron network per group; together they cover every layer once."""

    def __init__(self, shape: Shape, hidden_size: int, groups: Groups, arch: str = "mlp", head_hidden: int = 2048,
                 neuron_hidden: int = 1024, heads_only: bool = False):
        super().__init__()
        self.shape, self.groups, self.arch, self.heads_only = shape, groups, arch, heads_only
        self.feature_layers = sorted({layer for layer, _ in groups})
        self.heads = nn.ModuleList(network(arch, hidden_size, head_hidden, len(t) * shape.heads) for _, t in groups)
        self.neurons = nn.ModuleList() if heads_only else nn.ModuleList(  # head-only criteria score no neuron
            network(arch, hidden_size, neuron_hidden, len(t) * shape.neurons) for _, t in groups)

    def inputs(self, features: Tensor, group: int) -> Tensor:
        """The group's normalised input from (..., len(feature_layers), E) features."""
        return normalise_inputs(features[..., self.feature_layers.index(self.groups[group][0]), :])

    def group_scores(self, group: int, feature: Tensor) -> tuple[Tensor, Tensor]:
        """One group's (..., len(targets), H) head and (..., len(targets), F) neuron scores from its feature
        layer's raw (..., E) attention output."""
        x = normalise_inputs(feature).to(self.heads[group][0].weight.dtype)
        targets = len(self.groups[group][1])
        neurons = x.new_zeros(*x.shape[:-1], targets * self.shape.neurons) if self.heads_only else \
            self.neurons[group](x)
        return (self.heads[group](x).unflatten(-1, (targets, -1)).float(),
                neurons.unflatten(-1, (targets, -1)).float())

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


def quality(pred: Tensor, target: Tensor) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Held-out quality of (N, L, U) predictions: Spearman ρ and top-50% recall over all units (the global
    ranking) and within each layer (the local ranking), averaged over examples."""
    N, L, U = pred.shape
    per_layer = pred.reshape(N * L, U), target.reshape(N * L, U)
    overall = {"val_spearman": spearman(pred.flatten(1), target.flatten(1)).mean().item(),
               "val_recall50": top_recall(pred.flatten(1), target.flatten(1)).mean().item()}
    layers = {"val_spearman": spearman(*per_layer).view(N, L).mean(0).tolist(),
              "val_recall50": top_recall(*per_layer).view(N, L).mean(0).tolist()}
    return overall, layers


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


def train_network(net: nn.Module, x: Tensor, y: Tensor, epochs: int, batch_size: int, lr: float,
                  weight_decay: float, seed: int, desc: str) -> None:
    """MSE regression of targets y (N, K) on inputs x (N, E): AdamW, cosine schedule, seeded shuffles."""
    steps = epochs * math.ceil(len(x) / batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in tqdm(range(epochs), desc=desc, unit="epoch"):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = nn.functional.mse_loss(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    net.eval()


def fit_predictor(traces: dict[str, Tensor], documents: Sequence[str], shape: Shape, cfg: PredictorConfig,
                  seed: int, heads_only: bool = False) -> tuple[Predictor, dict]:
    """Train the configured placement on the traces; report held-out quality overall and per layer. Examples
    are held out by ``documents`` (one per example); ``heads_only``: no neuron networks (nothing to predict)."""
    torch.manual_seed(seed)
    features = traces["features"]  # (N, L, E): every layer's attention output at the last context token
    groups = placement_groups(cfg.name, shape.layers, cfg.layer, cfg.lookahead)
    predictor = Predictor(shape, features.shape[-1], groups, cfg.arch, cfg.head_hidden, cfg.neuron_hidden,
                          heads_only)
    inputs = features[:, predictor.feature_layers]
    kinds = [("heads", predictor.heads, cfg.head_epochs, cfg.head_batch_size, cfg.head_val_fraction)]
    if not heads_only:
        kinds.append(("neurons", predictor.neurons, cfg.neuron_epochs, cfg.neuron_batch_size, cfg.neuron_val_fraction))
    metrics, per_layer = {}, {}
    for kind, nets, epochs, batch_size, val_fraction in kinds:
        y = normalise_targets(traces[kind].float(), cfg.target_norm)
        train, val, held_documents = split_by_document(documents, val_fraction, seed)
        pred = torch.zeros_like(y[val])
        for g, (_, targets) in enumerate(groups):
            x = predictor.inputs(inputs, g)
            where = f" layer {targets[0]}" if len(groups) > 1 else ""
            train_network(nets[g], x[train], y[train][:, list(targets)].flatten(1), epochs, batch_size, cfg.lr,
                          cfg.weight_decay, seed, f"predictor ({kind}{where})")
            with torch.no_grad():
                pred[:, list(targets)] = nets[g](x[val]).view(len(val), len(targets), -1)
        overall, layers = quality(pred, y[val])
        metrics.update({f"predictor/{kind}_val_mse": nn.functional.mse_loss(pred, y[val]).item(),
                        **{f"predictor/{kind}_{k}": v for k, v in overall.items()},
                        f"predictor/{kind}_val_examples": len(val),
                        f"predictor/{kind}_val_documents": held_documents})
        per_layer.update({f"{kind}_{k}": v for k, v in layers.items()})
    log.info("predictor: held-out Spearman ρ (%d unseen documents) %s", metrics["predictor/heads_val_documents"],
             ", ".join(f"{kind} {metrics[f'predictor/{kind}_val_spearman']:.3f}" for kind, *_ in kinds))
    return predictor.eval(), {"metrics": metrics, "per_layer": per_layer}


class PredictedMasks:
    """A trained predictor as a mask source: features → predicted scores → the policy's masks.

    Per request, the features are those of each request's prompt at its last token; per token, those of the
    request's own input at every position (position t sees tokens up to t only, so nothing leaks).
    """

    def __init__(self, model: nn.Module, predictor: Predictor, policy: Policy, pad_id: int,
                 granularity: str = "request"):
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
        return self.policy.select(*self.predictor(features))


class StaticMasks:
    """One mask for every request, from importance aggregated over the calibration set."""

    def __init__(self, heads: Tensor, neurons: Tensor, policy: Policy):
        self.masks = policy.select(heads[None], neurons[None])

    def __call__(self, requests: Sequence) -> Masks:
        n = len(requests)
        return Masks(self.masks.heads.expand(n, -1, -1), self.masks.neurons.expand(n, -1, -1))


class OracleMasks:
    """The upper bound of any predictor: the criterion's own scores on each request's text, its loss on the
    tokens that are scored (so the mask has seen them), normalised as the predictor's targets are."""

    def __init__(self, model: nn.Module, criterion: Criterion, shape: Shape, policy: Policy, target_norm: str,
                 pad_id: int, seed: int):
        self.model, self.criterion, self.shape, self.policy = model, criterion, shape, policy
        self.target_norm, self.pad_id, self.seed = target_norm, pad_id, seed

    def __call__(self, requests: Sequence) -> Masks:
        limit = self.model.config.max_position_embeddings  # a rolling window holds one token more than the input
        windows = [r.tokens[-limit:] for r in requests]
        batch = collate([Example(tuple(w), max(1, len(w) - r.n_targets)) for w, r in zip(windows, requests,
                                                                                          strict=True)], self.pad_id)
        generator = torch.Generator().manual_seed(self.seed)
        _, heads, neurons = score_batch(self.model, batch, self.criterion, self.shape, generator)
        return self.policy.select(normalise_targets(heads, self.target_norm),
                                  normalise_targets(neurons, self.target_norm))


def save_predictor(predictor: Predictor, directory: Path) -> dict:
    """Write the weights as safetensors; returns what ``load_predictor`` needs to rebuild it."""
    save_file({k: v.contiguous() for k, v in predictor.state_dict().items()},
              str(directory / "predictor.safetensors"))
    first_heads = predictor.heads[0][0]
    return {"shape": asdict(predictor.shape), "groups": predictor.groups, "arch": predictor.arch,
            "hidden_size": first_heads.in_features, "head_hidden": first_heads.out_features,
            "neuron_hidden": None if predictor.heads_only else predictor.neurons[0][0].out_features,
            "heads_only": predictor.heads_only}


def load_predictor(directory: Path, meta: dict) -> Predictor:
    groups = tuple((layer, tuple(targets)) for layer, targets in meta["groups"])
    predictor = Predictor(Shape(**meta["shape"]), meta["hidden_size"], groups, meta["arch"], meta["head_hidden"],
                          meta["neuron_hidden"], meta["heads_only"])
    predictor.load_state_dict(load_file(str(directory / "predictor.safetensors")))
    return predictor.eval()
