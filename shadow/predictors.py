"""The ShadowLLM predictor: one MLP reads one layer's attention output and predicts every layer's importance.

Input: the attention output (before out_proj) of ``predictor.layer`` at the last context token, min–max
normalised per example. Targets: the criterion's per-example scores, min–max normalised per layer (the paper's
better variant) or over all layers. Two MLPs, Linear → ReLU → Linear: one for the L·H head scores and one for
the L·F neuron scores, each trained with MSE, AdamW and a cosine schedule on its own train/validation split.
"""

from __future__ import annotations

import logging
import math
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


def normalise_targets(scores: Tensor, how: str) -> Tensor:
    """(N, L, U) scores → [0, 1] per example and layer (``per_layer``) or per example (``global``)."""
    return minmax(scores, (2,) if how == "per_layer" else (1, 2))


def static_importance(traces: dict[str, Tensor], how: str = "per_layer") -> tuple[Tensor, Tensor]:
    """One (L, H) head and (L, F) neuron importance for every input: the mean over calibration examples of each
    example's normalised scores, so that no example (a long one, a task with long answers) outweighs another."""
    return (normalise_targets(traces["heads"].float(), how).mean(0),
            normalise_targets(traces["neurons"].float(), how).mean(0))


def mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, outputs))


class ShadowPredictor(nn.Module):
    def __init__(self, shape: Shape, hidden_size: int, head_hidden: int, neuron_hidden: int):
        super().__init__()
        self.shape = shape
        self.heads = mlp(hidden_size, head_hidden, shape.layers * shape.heads)
        self.neurons = mlp(hidden_size, neuron_hidden, shape.layers * shape.neurons)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(B, E) raw features → predicted (B, L, H) head and (B, L, F) neuron scores."""
        x = minmax(features.float(), (1,))
        L, H, F = self.shape.layers, self.shape.heads, self.shape.neurons
        return self.heads(x).view(-1, L, H), self.neurons(x).view(-1, L, F)


def spearman(pred: Tensor, target: Tensor) -> Tensor:
    """Per-row Spearman rank correlation of (N, K) predictions and targets (ties broken by position)."""
    def ranks(x: Tensor) -> Tensor:
        r = x.argsort(dim=1).argsort(dim=1).float()
        return r - r.mean(dim=1, keepdim=True)
    rp, rt = ranks(pred), ranks(target)
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


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * val_fraction))
    return order[n_val:], order[:n_val]


def fit_mlp(net: nn.Module, x: Tensor, y: Tensor, epochs: int, batch_size: int, lr: float, weight_decay: float,
            val_fraction: float, seed: int, desc: str) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Train ``net`` to map normalised features x (N, E) to targets y (N, L, U); its held-out quality."""
    train, val = split_indices(len(x), val_fraction, seed)
    steps = epochs * math.ceil(len(train) / batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in tqdm(range(epochs), desc=desc, unit="epoch"):
        for idx in train[torch.randperm(len(train), generator=gen)].split(batch_size):
            loss = nn.functional.mse_loss(net(x[idx]), y[idx].flatten(1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    net.eval()
    with torch.no_grad():
        pred = net(x[val]).view(y[val].shape)
    overall, layers = quality(pred, y[val])
    return {"val_mse": nn.functional.mse_loss(pred, y[val]).item(), **overall, "val_examples": len(val)}, layers


def fit_shadow(traces: dict[str, Tensor], shape: Shape, cfg: PredictorConfig, seed: int) -> tuple[ShadowPredictor,
                                                                                                  dict]:
    torch.manual_seed(seed)
    features = traces["features"]
    predictor = ShadowPredictor(shape, features.shape[1], cfg.head_hidden, cfg.neuron_hidden)
    x = minmax(features.float(), (1,))
    metrics, per_layer = {}, {}
    for kind, net, epochs, batch_size, val_fraction in (
            ("heads", predictor.heads, cfg.head_epochs, cfg.head_batch_size, cfg.head_val_fraction),
            ("neurons", predictor.neurons, cfg.neuron_epochs, cfg.neuron_batch_size, cfg.neuron_val_fraction)):
        y = normalise_targets(traces[kind].float(), cfg.target_norm)
        result, layers = fit_mlp(net, x, y, epochs, batch_size, cfg.lr, cfg.weight_decay, val_fraction, seed,
                                 f"predictor ({kind})")
        metrics.update({f"predictor/{kind}_{k}": v for k, v in result.items()})
        per_layer.update({f"{kind}_{k}": v for k, v in layers.items()})
    log.info("predictor: held-out Spearman ρ heads %.3f, neurons %.3f",
             metrics["predictor/heads_val_spearman"], metrics["predictor/neurons_val_spearman"])
    return predictor.eval(), {"metrics": metrics, "per_layer": per_layer}


class PredictedMasks:
    """The ShadowLLM mask source: each request's prompt → layer features → predicted scores → the policy's mask."""

    def __init__(self, model: nn.Module, predictor: ShadowPredictor, layer: int, policy: Policy, pad_id: int):
        self.model, self.predictor, self.layer, self.policy, self.pad_id = model, predictor, layer, policy, pad_id

    @torch.no_grad()
    def __call__(self, requests: Sequence) -> Masks:
        prompts = [r.prompt for r in requests]
        ids, attention = pad(prompts, self.pad_id)
        last = torch.tensor([len(p) - 1 for p in prompts])
        heads, neurons = self.predictor(layer_features(self.model, ids, attention, last, self.layer))
        return self.policy.select(heads, neurons)


class StaticMasks:
    """One mask for every request, from importance aggregated over the calibration set."""

    def __init__(self, heads: Tensor, neurons: Tensor, policy: Policy):
        self.masks = policy.select(heads[None], neurons[None])

    def __call__(self, requests: Sequence) -> Masks:
        n = len(requests)
        return Masks(self.masks.heads.expand(n, -1, -1), self.masks.neurons.expand(n, -1, -1))


class OracleMasks:
    """The upper bound of any predictor: the criterion's own scores, computed on each request's full text,
    scored tokens included, normalised as the predictor's targets are."""

    def __init__(self, model: nn.Module, criterion: Criterion, shape: Shape, policy: Policy, target_norm: str,
                 pad_id: int, seed: int):
        self.model, self.criterion, self.shape, self.policy = model, criterion, shape, policy
        self.target_norm, self.pad_id, self.seed = target_norm, pad_id, seed

    def __call__(self, requests: Sequence) -> Masks:
        batch = collate([Example(tuple(r.tokens), 1) for r in requests], self.pad_id)
        generator = torch.Generator().manual_seed(self.seed)
        _, heads, neurons = score_batch(self.model, batch, self.criterion, self.shape, 0, generator)
        return self.policy.select(normalise_targets(heads, self.target_norm),
                                  normalise_targets(neurons, self.target_norm))


def save_predictor(predictor: ShadowPredictor, directory: Path) -> dict:
    """Write the weights as safetensors; returns what ``load_predictor`` needs to rebuild it."""
    save_file({k: v.contiguous() for k, v in predictor.state_dict().items()},
              str(directory / "predictor.safetensors"))
    return {"shape": asdict(predictor.shape), "hidden_size": predictor.heads[0].in_features,
            "head_hidden": predictor.heads[0].out_features, "neuron_hidden": predictor.neurons[0].out_features}


def load_predictor(directory: Path, meta: dict) -> ShadowPredictor:
    predictor = ShadowPredictor(Shape(**meta["shape"]), meta["hidden_size"], meta["head_hidden"],
                                meta["neuron_hidden"])
    predictor.load_state_dict(load_file(str(directory / "predictor.safetensors")))
    return predictor.eval()
