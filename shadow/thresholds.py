"""Training-free activation sparsity, TEAL and CATS: magnitude thresholds per layer, calibrated on the dense model,
applied to every token.

- TEAL (Liu et al. 2024) zeroes the input channels of a projection whose magnitude falls below a threshold set per
  layer and per input, at four sites: the attention input (shared by query, key and value), the output
  projection's input, the FFN input (shared by gate and up, or OPT's up) and the down projection's input. A projection
  then reads only the columns of the channels it keeps.
- CATS (Lee et al. 2024) zeroes the FFN's intermediate channels whose |act(gate(x))| falls below a threshold set
  per layer: the gate is read whole, the up rows and down columns of the channels kept. Attention stays dense. On
  OPT, which has no gate, the threshold is on |relu(up(x))| (ReLU already zeroes many): the up projection is read
  whole and only the down projection's columns are skipped, so CATS saves at most half of an OPT FFN.

Thresholds come from histograms of the magnitudes at each site over the calibration set (log2-spaced bins): each
is the magnitude below which the target share of that site's entries fall.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from shadow.arch import family_of
from shadow.data import Example, collate
from shadow.offload import input_device
from shadow.weights_read import weights_read

BINS = 4096
GREEDY_STEP = 0.025  # how much a round of the greedy allocation raises a layer's weighted sparsity
GREEDY_EXAMPLES = 32  # calibration examples whose layer outputs the greedy allocation compares
LOWEST, HIGHEST = -40.0, 24.0  # log2 range of the binned magnitudes; zeros fall in the first bin, larger in the last


@dataclass(frozen=True)
class Site:
    """Where a threshold applies in each layer: the input of ``roles`` (pre-forward), or the output of the FFN
    activation (``roles`` empty)."""

    name: str
    roles: tuple[str, ...]
    share: str  # the sparsity it takes: "head" (attention) or "neuron" (FFN)


def sites(model: nn.Module, method: str) -> list[Site]:
    """The method's sites in each layer of the model, in the order of its thresholds' rows."""
    family = family_of(model.config)
    if method == "cats":
        return [Site("activation", (), "neuron")]
    return [Site("attention", ("query", "key", "value"), "head"), Site("output", family.head_columns, "head"),
            Site("ffn", family.neuron_rows, "neuron"), Site("down", family.neuron_columns, "neuron")]


Act = Callable[[int, int, Tensor], Tensor]  # (site index, layer index, tensor) → the tensor to use instead


def _hooks(model: nn.Module, method: str, act: Act) -> list:
    """Install ``act`` at every site of every layer; returns the handles. The projections of a TEAL site share
    their input: the first computes ``act`` on it, the others reuse the result (the last one lets it go)."""
    family, handles = family_of(model.config), []
    for s, site in enumerate(sites(model, method)):
        for index, layer in enumerate(family.layers(model)):
            if not site.roles:
                module = layer.get_submodule(family.activation_path)
                handles.append(module.register_forward_hook(
                    lambda m, args, out, s=s, index=index: act(s, index, out)))
                continue
            shared: dict[str, Tensor] = {}
            final = len(site.roles) - 1
            for position, role in enumerate(site.roles):
                def pre(module: nn.Module, args: tuple, s=s, index=index, shared=shared, first=position == 0,
                        last=position == final) -> tuple:
                    if first or shared.get("input") is not args[0]:
                        shared.update(input=args[0], output=act(s, index, args[0]))
                    out = shared["output"]
                    if last:
                        shared.clear()
                    return (out,)
                handles.append(family.module(layer, role).register_forward_pre_hook(pre))
    return handles


@dataclass
class Histograms:
    """Counts of |x| per site and layer, in ``BINS`` log2-spaced bins."""

    counts: Tensor  # (sites, L, BINS) float64

    def thresholds(self, shares: list[float] | Tensor) -> Tensor:
        """(sites, L) magnitudes below which ``shares[s]`` of site s's entries fall in every layer, or
        ``shares[s, l]`` in layer l when given per layer (interpolated in log2 within their bin; 0 for a share of
        0)."""
        cumulative = self.counts.cumsum(-1)
        total = cumulative[..., -1:]
        shares = torch.as_tensor(shares, dtype=torch.float64)
        target = (shares[:, None] if shares.dim() == 1 else shares)[..., None] * total
        bin_ = torch.searchsorted(cumulative, target).clamp(max=BINS - 1)  # the first bin reaching the target
        before = torch.where(bin_ > 0, cumulative.gather(-1, (bin_ - 1).clamp(min=0)), torch.zeros_like(target))
        inside = self.counts.gather(-1, bin_)
        fraction = ((target - before) / inside.clamp(min=1)).clamp(0, 1)
        width = (HIGHEST - LOWEST) / BINS
        log2 = LOWEST + (bin_.double() + fraction) * width
        return torch.where(target > 0, torch.exp2(log2), torch.zeros_like(log2)).squeeze(-1).float()


@torch.no_grad()
def calibrate(model: nn.Module, examples: list[Example], method: str, batch_size: int, pad_id: int) -> Histograms:
    """Histograms of every site's magnitudes on the dense model over the calibration examples' tokens (padding
    left out)."""
    family, device = family_of(model.config), input_device(model)
    counts = torch.zeros(len(sites(model, method)), len(family.layers(model)), BINS, dtype=torch.float64,
                         device=device)  # on the device: no read back per forward
    valid: list[Tensor] = []

    def record(s: int, index: int, x: Tensor) -> Tensor:
        tokens = x.reshape(-1, x.shape[-1])  # (B·T, channels): OPT's FFN already takes them flattened
        magnitudes = tokens[valid[0].flatten().to(x.device)].abs().float()
        log2 = magnitudes.clamp(min=2.0 ** LOWEST).log2()
        counts[s, index] += torch.histc(log2, BINS, LOWEST, HIGHEST).to(device, torch.float64)
        return x

    handles = _hooks(model, method, record)
    try:
        for start in tqdm(range(0, len(examples), batch_size), desc=f"{method} calibration", unit="batch"):
            batch = collate(examples[start:start + batch_size], pad_id)
            valid[:] = [batch.attention_mask.bool()]
            model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return Histograms(counts.cpu())


def _weights_per_site(model: nn.Module, method: str) -> Tensor:
    """(sites,) parameters each site's zeros let a layer skip: the projections it feeds (CATS: the down one)."""
    family = family_of(model.config)
    layer = family.layers(model)[0]
    return torch.tensor([float(sum(family.module(layer, role).weight.numel()
                                   for role in site.roles or family.neuron_columns))
                         for site in sites(model, method)], dtype=torch.float64)


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


def _moved(model: nn.Module, layer: nn.Module, limits: Tensor, batches: list, dense: list[Tensor]) -> float:
    """How far the layer's output moves from ``dense`` under TEAL's ``limits``: the mean L2 norm of the change
    over the real tokens of the batches."""
    with thresholded(model, "teal", limits):
        moved = [(_hidden(layer(*args, **kwargs)) - out).norm(dim=-1)[mask]
                 for (args, kwargs, mask), out in zip(batches, dense, strict=True)]
    return torch.cat(moved).mean().item()


@torch.no_grad()
def greedy_shares(model: nn.Module, histograms: Histograms, examples: list[Example], shares: list[float],
                  batch_size: int, pad_id: int, step: float = GREEDY_STEP) -> Tensor:
    """TEAL's greedy allocation: per layer, the (sites,) shares to zero that reach the layer's target sparsity
    (``shares``' mean weighted by the parameters each site's zeros skip) with the least change in the layer's
    output. From nothing zeroed, each round tries raising each site's share so that the layer's weighted sparsity
    grows by ``step``, and keeps the one whose output, on the dense model's inputs to the layer over the
    examples, moves least from the dense output (mean L2 norm over real tokens); thresholds from ``histograms``.
    Each layer's inputs are the previous layer's dense outputs. Returns (sites, L)."""
    family = family_of(model.config)
    layers = family.layers(model)
    weights = _weights_per_site(model, "teal")
    target = float((weights * torch.tensor(shares, dtype=torch.float64)).sum() / weights.sum())
    allocated = torch.zeros(len(weights), len(layers), dtype=torch.float64)
    batches = _first_layer_inputs(model, examples, batch_size, pad_id)
    for index, layer in enumerate(tqdm(layers, desc="greedy allocation", unit="layer")):
        dense = [_hidden(layer(*args, **kwargs)) for args, kwargs, _ in batches]
        while (weights @ allocated[:, index]) / weights.sum() < target - 1e-9:
            trials = []
            for s in range(len(weights)):
                if allocated[s, index] < 1:
                    trial = allocated.clone()
                    trial[s, index] = min(1.0, trial[s, index] + step * weights.sum() / weights[s])
                    trials.append(trial)
            allocated = min(trials, key=lambda trial: _moved(model, layer, histograms.thresholds(trial), batches,
                                                             dense))
        batches = [((out, *args[1:]), kwargs, mask) for (args, kwargs, mask), out in zip(batches, dense, strict=True)]
    return allocated.float()


@dataclass
class KeptCounts:
    """Entries kept and entries seen per site and layer, summed over the forwards run under the thresholds."""

    kept: Tensor  # (sites, L) float64, on the model's device: no read back per forward
    seen: Tensor

    def shares(self) -> Tensor:
        """(sites, L) share of each site's entries kept (1 where none was seen)."""
        return torch.where(self.seen > 0, self.kept / self.seen.clamp(min=1), 1.0).cpu()


@contextmanager
def thresholded(model: nn.Module, method: str, thresholds: Tensor) -> Iterator[KeptCounts]:
    """Run the model with every site's entries below its layer's threshold zeroed, inside the block; yields the
    count of entries kept (every position of every forward, padding included)."""
    device = input_device(model)
    counts = KeptCounts(*(torch.zeros(thresholds.shape, dtype=torch.float64, device=device) for _ in range(2)))

    def zero_small(s: int, index: int, x: Tensor) -> Tensor:
        keep = x.abs() >= thresholds[s, index].to(x.device, x.dtype)
        counts.kept[s, index] += keep.sum().to(device)
        counts.seen[s, index] += keep.numel()
        return x * keep

    handles = _hooks(model, method, zero_small)
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def reads(model: nn.Module, method: str, kept: Tensor) -> tuple[dict[str, list[float]], tuple[str, ...]]:
    """Each projection role's (L,) share of its weight read from the (sites, L) shares kept, and the roles whose
    share is of rows (``weights_read``'s ``rows``): TEAL reads columns of every projection; CATS the up rows (or
    none on OPT, whose up projection gives the activations) and down columns."""
    family = family_of(model.config)
    shares = kept.tolist()
    if method == "teal":
        return {role: shares[s] for s, site in enumerate(sites(model, method)) for role in site.roles}, ()
    up = ("up",) if family.gated else ()
    return {role: shares[0] for role in up + family.neuron_columns}, up


def report(model: nn.Module, method: str, shares: Tensor) -> tuple[dict[str, float], dict[str, list[float]]]:
    """A job's metrics from the (sites, L) shares kept: the weights read, each site's achieved sparsity, and as
    head and neuron sparsity (overall and per layer, so that tables and plots treat every placement alike) the
    share zeroed on the attention sites and on the FFN sites (0 on a side without any)."""
    found, zeroed = sites(model, method), 1 - shares
    per_layer = {}
    for side in ("head", "neuron"):
        rows = [s for s, site in enumerate(found) if site.share == side]
        per_layer[f"{side}_sparsity"] = (zeroed[rows].mean(0) if rows else torch.zeros(zeroed.shape[1])).tolist()
    metrics = {f"achieved_{key}": sum(values) / len(values) for key, values in per_layer.items()}
    metrics |= {f"achieved_{site.name}_sparsity": zeroed[s].mean().item() for s, site in enumerate(found)}
    metrics["weights_read"] = weights_read(model, *reads(model, method, shares))
    return metrics, per_layer
