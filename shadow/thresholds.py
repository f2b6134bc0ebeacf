"""Training-free activation sparsity, TEAL, WINA and CATS: magnitude thresholds per layer, calibrated on the dense
model, applied to every token.

- TEAL (Liu et al. 2024) zeroes, at every projection's input, the channels whose magnitude falls below that
  projection's threshold in that layer: seven sites in a gated layer (query, key, value, output, gate, up, down;
  six on OPT, whose FFN has no gate). A projection then reads only the columns of the channels it keeps. The
  projections that share an input (query, key and value; gate and up) share its histogram, and with the same
  share (``allocation=uniform``) the same threshold; TEAL's greedy allocation (``greedy_path``) gives each its own.
- WINA (Chen et al. 2025) is TEAL weighted by the weights: at each projection's input it zeroes the channels j
  whose |x_j| · ‖W[:, j]‖₂ (the norm of the weight column the channel multiplies) falls below the projection's
  threshold in that layer. Each projection has its own histogram of that score; allocation as TEAL's.
- CATS (Lee et al. 2024) zeroes the FFN's intermediate channels whose |act(gate(x))| falls below a threshold set
  per layer: the gate is read whole, the up rows and down columns of the channels kept. Attention stays dense. On
  OPT, which has no gate, the threshold is on |relu(up(x))|: the up projection is read whole and only the down
  projection's columns are skipped, so CATS saves at most half of an OPT FFN.

Thresholds come from histograms of the magnitudes at each input over the calibration set's real tokens
(log2-spaced bins): each is the magnitude below which the target share of that input's entries fall. Counts of
what the thresholds drop leave padding out and do not count an entry that was exactly zero already (ReLU's zeros
on OPT) as dropped: ``shadow.weights_read`` credits such zeros to every method alike, or to none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from shadow.arch import family_of
from shadow.data import Example, collate
from shadow.offload import input_device
from shadow.weights_read import RealTokens

BINS = 4096
LOWEST, HIGHEST = -40.0, 24.0  # log2 range of the binned magnitudes; zeros fall in the first bin, larger in the last
GREEDY_BASE = 0.05  # TEAL's greedyopt default: a step raises projection p's share by GREEDY_BASE / w_p
GREEDY_LIMIT = 0.9  # the parameter-weighted sparsity TEAL's greedy path runs to: it serves every target below
GREEDY_EXAMPLES = 8  # calibration examples whose layer outputs the greedy allocation compares
GREEDY_TAIL = 0.25  # the last quarter of each example's positions: where TEAL measures a layer's error
INPUT_SITES = ("teal", "wina")  # methods whose sites are projections' inputs, each read by its kept columns


@dataclass(frozen=True)
class Site:
    """Where a threshold applies in each layer: the input of projection ``roles`` (pre-forward; TEAL), or the output
    of the FFN activation (``roles`` empty; CATS, where the down projection reads it)."""

    name: str
    roles: tuple[str, ...]
    share: str  # the sparsity it takes: "head" (attention) or "neuron" (FFN)
    input: str  # the activations whose histogram sets its threshold, shared by the sites that read them


def sites(model: nn.Module, method: str) -> list[Site]:
    """The method's sites in each layer of the model, in the order of its thresholds' rows. TEAL's projections
    that share an input share its histogram; WINA's scores differ by projection, so each has its own."""
    family = family_of(model.config)
    if method == "cats":
        return [Site("activation", (), "neuron", "activation")]
    inputs = {"query": "attention", "key": "attention", "value": "attention", "output": "output",
              **{role: "ffn" for role in family.neuron_rows}, **{role: "down" for role in family.neuron_columns}}
    return [Site(role, (role,), "head" if inputs[role] in ("attention", "output") else "neuron",
                 role if method == "wina" else inputs[role])
            for role in (*family.query_rows, *family.kv_rows, *family.head_columns, *family.neuron_rows,
                         *family.neuron_columns)]


Scales = list[list[Tensor]] | None  # (sites × L) per-channel factors of the magnitudes, or None: the magnitudes


def channel_scales(model: nn.Module, method: str) -> Scales:
    """WINA's factor of each input channel's magnitude at each site of each layer: the ℓ2 norm of the weight column
    the channel multiplies, in float32 on the weight's device; None for TEAL and CATS, which read magnitudes alone."""
    if method != "wina":
        return None
    family = family_of(model.config)
    return [[family.module(layer, site.roles[0]).weight.detach().float().norm(dim=0)
             for layer in family.layers(model)] for site in sites(model, method)]


def scored(x: Tensor, scale: Tensor | None) -> Tensor:
    """What a threshold compares: |x|, times the channels' ``scale`` where the method has one."""
    return x.abs() if scale is None else x.abs() * scale.to(x.device, x.dtype)


def site_index(model: nn.Module, method: str) -> dict[str, int]:
    """Each site's row in the thresholds, by name."""
    return {site.name: s for s, site in enumerate(sites(model, method))}


def inputs(model: nn.Module, method: str) -> list[str]:
    """The inputs the method's sites read, in the order of the histograms' rows."""
    return list(dict.fromkeys(site.input for site in sites(model, method)))


Act = Callable[[int, int, Tensor], Tensor]  # (site index, layer index, tensor) → the tensor to use instead


def _hooks(model: nn.Module, method: str, act: Act, first_of_input: bool = False) -> list:
    """Install ``act`` at every site of every layer (only at the first site of each input with
    ``first_of_input``); returns the handles."""
    family, handles, seen = family_of(model.config), [], set()
    for s, site in enumerate(sites(model, method)):
        if first_of_input and site.input in seen:
            continue
        seen.add(site.input)
        for index, layer in enumerate(family.layers(model)):
            if not site.roles:
                module = layer.get_submodule(family.activation_path)
                handles.append(module.register_forward_hook(lambda m, args, out, s=s, i=index: act(s, i, out)))
            else:
                module = family.module(layer, site.roles[0])
                handles.append(module.register_forward_pre_hook(lambda m, args, s=s, i=index: (act(s, i, args[0]),)))
    return handles


@dataclass
class Histograms:
    """Counts of |x| per input and layer, in ``BINS`` log2-spaced bins, and each site's input."""

    counts: Tensor  # (inputs, L, BINS) float64
    rows: tuple[int, ...]  # each site's row of ``counts``

    @classmethod
    def of(cls, model: nn.Module, method: str, counts: Tensor) -> Histograms:
        order = inputs(model, method)
        return cls(counts, tuple(order.index(site.input) for site in sites(model, method)))

    def thresholds(self, shares: list[float] | Tensor) -> Tensor:
        """(sites, L) magnitudes below which ``shares[s]`` of site s's input entries fall in every layer, or
        ``shares[s, l]`` in layer l when given per layer (interpolated in log2 within their bin; 0 for a share of
        0)."""
        counts = self.counts[list(self.rows)]
        cumulative = counts.cumsum(-1)
        total = cumulative[..., -1:]
        shares = torch.as_tensor(shares, dtype=torch.float64).clamp(0, 1)
        target = ((shares[:, None] if shares.dim() == 1 else shares)[..., None] * total).contiguous()
        bin_ = torch.searchsorted(cumulative, target).clamp(max=BINS - 1)  # the first bin reaching the target
        before = torch.where(bin_ > 0, cumulative.gather(-1, (bin_ - 1).clamp(min=0)), torch.zeros_like(target))
        inside = counts.gather(-1, bin_)
        fraction = ((target - before) / inside.clamp(min=1)).clamp(0, 1)
        width = (HIGHEST - LOWEST) / BINS
        log2 = LOWEST + (bin_.double() + fraction) * width
        return torch.where(target > 0, torch.exp2(log2), torch.zeros_like(log2)).squeeze(-1).float()


@torch.no_grad()
def calibrate(model: nn.Module, examples: list[Example], method: str, batch_size: int, pad_id: int) -> Histograms:
    """Histograms of every input's magnitudes on the dense model over the calibration examples' tokens (padding
    left out)."""
    family, device = family_of(model.config), input_device(model)
    order = inputs(model, method)
    found = sites(model, method)
    counts = torch.zeros(len(order), len(family.layers(model)), BINS, dtype=torch.float64,
                         device=device)  # on the device: no read back per forward
    valid: list[Tensor] = []
    scales = channel_scales(model, method)

    def record(s: int, index: int, x: Tensor) -> Tensor:
        tokens = x.reshape(-1, x.shape[-1])  # (B·T, channels): OPT's FFN already takes them flattened
        magnitudes = scored(tokens[valid[0].flatten().to(x.device)].float(), scales and scales[s][index])
        log2 = magnitudes.clamp(min=2.0 ** LOWEST).log2()
        counts[order.index(found[s].input), index] += torch.histc(log2, BINS, LOWEST, HIGHEST).to(device,
                                                                                                  torch.float64)
        return x

    handles = _hooks(model, method, record, first_of_input=True)
    try:
        for start in tqdm(range(0, len(examples), batch_size), desc=f"{method} calibration", unit="batch"):
            batch = collate(examples[start:start + batch_size], pad_id)
            valid[:] = [batch.attention_mask.bool()]
            model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return Histograms.of(model, method, counts.cpu())


def projection_weights(model: nn.Module, method: str) -> Tensor:
    """(sites,) TEAL's w_p: the parameters of each site's projection relative to the query projection's."""
    family = family_of(model.config)
    layer = family.layers(model)[0]
    size = [float(family.module(layer, site.roles[0]).weight.numel()) for site in sites(model, method)]
    return torch.tensor(size, dtype=torch.float64) / family.module(layer, "query").weight.numel()


def weighted(shares: Tensor, weights: Tensor) -> Tensor:
    """The parameter-weighted sparsity of (sites, …) shares: Σ w_p s_p / Σ w_p."""
    return (weights @ shares.clamp(max=1)) / weights.sum()


def _first_layer_inputs(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int
                        ) -> list[tuple[tuple, dict, Tensor]]:
    """Layer 0's positional and keyword arguments for each batch of the examples on the dense model, with the
    batch's (B, T) mask of real tokens: every layer takes the same keywords (attention mask, positions)."""
    family, device = family_of(model.config), input_device(model)
    captured: list[tuple[tuple, dict, Tensor]] = []
    mask: list[Tensor] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs, mask[0]))
        raise _Captured

    handle = family.layers(model)[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], pad_id)
            mask[:] = [batch.attention_mask.bool().to(device)]
            with suppress(_Captured):
                model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                      use_cache=False)
    finally:
        handle.remove()
    return captured


class _Captured(Exception):
    """Stops a forward once layer 0's inputs are captured."""


def _hidden(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def tail_positions(real: Tensor, fraction: float = GREEDY_TAIL) -> Tensor:
    """(B, T) the last ``fraction`` of each sequence's real tokens (at least one)."""
    lengths = real.sum(1, keepdim=True)
    positions = torch.arange(real.shape[1], device=real.device)[None]
    return real & (positions >= lengths - (lengths * fraction).ceil().clamp(min=1))


def layer_error(new: list[Tensor], dense: list[Tensor], tails: list[Tensor]) -> float:
    """TEAL's error of a layer's output: per sequence and channel, the L2 norm over the tail positions of the change
    from ``dense``, averaged over sequences and channels."""
    norms = [((n - d).float() * t[..., None]).pow(2).sum(1).sqrt() for n, d, t in zip(new, dense, tails, strict=True)]
    return torch.cat(norms).mean().item()


def _moved(model: nn.Module, method: str, scales: Scales, layer: nn.Module, limits: Tensor, batches: list,
           dense: list[Tensor], tails: list[Tensor]) -> float:
    """``layer_error`` of the layer under the method's ``limits``."""
    with thresholded(model, method, limits, scales):
        new = [_hidden(layer(*args, **kwargs)) for args, kwargs, _ in batches]
    return layer_error(new, dense, tails)


@torch.no_grad()
def greedy_path(model: nn.Module, histograms: Histograms, examples: list[Example], batch_size: int, pad_id: int,
                limit: float = GREEDY_LIMIT, base: float = GREEDY_BASE, method: str = "teal") -> tuple[Tensor, Tensor]:
    """TEAL's greedy allocation (its greedyopt; WINA's the same over its own scores), per layer: from nothing
    zeroed, each round tries raising each projection's share by ``base / w_p`` (``projection_weights``: every
    accepted step raises the layer's parameter-weighted sparsity by ``base / Σ w``) and keeps the one whose layer
    output, on the dense model's inputs to the layer over the examples, moves least from the dense output
    (``layer_error`` over the last quarter of each example's real tokens), until the weighted sparsity reaches
    ``limit``. Each layer's inputs are the
    previous layer's dense outputs. Returns the path: (steps + 1, sites, L) shares after each step (the first row
    all zero; a share is at most 1) and their (steps + 1, L) weighted sparsity."""
    family = family_of(model.config)
    layers = family.layers(model)
    weights = projection_weights(model, method)
    scales = channel_scales(model, method)  # once: every trial thresholds with them
    steps = math.ceil(limit * weights.sum().item() / base - 1e-9)
    path = torch.zeros(steps + 1, len(weights), len(layers), dtype=torch.float64)
    batches = _first_layer_inputs(model, examples, batch_size, pad_id)
    tails = [tail_positions(mask) for _, _, mask in batches]
    full = (1 / (base / weights) - 1e-9).ceil()  # a projection's steps to a share of 1
    for index, layer in enumerate(tqdm(layers, desc="greedy allocation", unit="layer")):
        dense = [_hidden(layer(*args, **kwargs)) for args, kwargs, _ in batches]
        taken = torch.zeros(len(weights), dtype=torch.float64)  # steps each projection took
        for step in range(1, steps + 1):
            trials = []
            for s in range(len(weights)):
                if taken[s] < full[s]:
                    trial = path[step - 1].clone()
                    trial[s, index] = min(1.0, (taken[s] + 1) * base / weights[s])
                    trials.append((s, trial))
            best, trial = min(trials, key=lambda t: _moved(model, method, scales, layer,
                                                           histograms.thresholds(t[1]), batches, dense, tails))
            taken[best] += 1
            path[step, :, index] = trial[:, index]
        batches = [((out, *args[1:]), kwargs, mask) for (args, kwargs, mask), out in zip(batches, dense, strict=True)]
    return path.float(), torch.stack([weighted(row, weights) for row in path])


def greedy_shares(path: Tensor, reached: Tensor, target: float) -> Tensor:
    """(sites, L): in each layer, the row of the greedy path whose weighted sparsity is closest to ``target`` (as
    TEAL's lookup picks it; the same target in every layer)."""
    rows = (reached - target).abs().argmin(0)
    return path[rows, :, torch.arange(path.shape[2])].t()


@dataclass
class KeptCounts:
    """Entries the thresholds dropped (those that were not exactly zero already) and entries seen, per site and
    layer, at real tokens, summed over the forwards run under the thresholds."""

    dropped: Tensor  # (sites, L) float64, on the model's device: no read back per forward
    seen: Tensor

    def shares(self) -> Tensor:
        """(sites, L) share of each site's entries kept (1 where none was seen): exact zeros count as kept."""
        return torch.where(self.seen > 0, 1 - self.dropped / self.seen.clamp(min=1), 1.0).cpu()


@contextmanager
def thresholded(model: nn.Module, method: str, thresholds: Tensor, scales: Scales = None) -> Iterator[KeptCounts]:
    """Run the model with every site's entries below its layer's threshold zeroed, inside the block; yields the
    count of entries dropped at real tokens (the model's attention mask says which; padding counts nowhere).
    ``scales``: the method's ``channel_scales`` where the caller has them already."""
    device = input_device(model)
    counts = KeptCounts(*(torch.zeros(thresholds.shape, dtype=torch.float64, device=device) for _ in range(2)))
    tokens = RealTokens(model)
    scales = scales or channel_scales(model, method)

    def zero_small(s: int, index: int, x: Tensor) -> Tensor:
        keep = scored(x, scales and scales[s][index]) >= thresholds[s, index].to(x.device, x.dtype)
        dropped, seen = tokens.count(~keep & (x != 0))
        counts.dropped[s, index] += dropped.to(device)
        counts.seen[s, index] += seen.to(device) if isinstance(seen, Tensor) else seen
        return x * keep

    handles = _hooks(model, method, zero_small)
    try:
        yield counts
    finally:
        tokens.remove()
        for handle in handles:
            handle.remove()


def reads(model: nn.Module, method: str, kept: Tensor) -> tuple[dict[str, list[float]], tuple[str, ...]]:
    """Each projection role's (L,) share of its weight read from the (sites, L) shares kept, and the roles whose
    share is of rows (``weights_read``'s ``rows``): TEAL reads columns of every projection; CATS the up rows (or
    none on OPT, whose up projection gives the activations) and down columns. WINA reads as TEAL."""
    family = family_of(model.config)
    shares = kept.tolist()
    if method in INPUT_SITES:
        return {site.roles[0]: shares[s] for s, site in enumerate(sites(model, method))}, ()
    up = ("up",) if family.gated else ()
    return {role: shares[0] for role in up + family.neuron_columns}, up


def achieved(model: nn.Module, method: str, shares: Tensor) -> tuple[dict[str, float], dict[str, list[float]]]:
    """A job's achieved sparsity from the (sites, L) shares kept: each site's, and as head and neuron sparsity
    (overall and per layer, so that tables and plots treat every placement alike) the mean share dropped on the
    attention sites and on the FFN sites (0 on a side without any)."""
    found, zeroed = sites(model, method), 1 - shares
    per_layer = {}
    for side in ("head", "neuron"):
        rows = [s for s, site in enumerate(found) if site.share == side]
        per_layer[f"{side}_sparsity"] = (zeroed[rows].mean(0) if rows else torch.zeros(zeroed.shape[1])).tolist()
    metrics = {f"achieved_{key}": sum(values) / len(values) for key, values in per_layer.items()}
    metrics |= {f"achieved_{site.name}_sparsity": zeroed[s].mean().item() for s, site in enumerate(found)}
    return metrics, per_layer
