"""Importance traces: per example, the predictor's input feature and every head's and neuron's score.

One forward and one backward pass per batch. Pre-hooks on each layer's ``self_attn.out_proj`` and ``fc2`` see
the head outputs and the FFN activations; tensor hooks on those inputs receive their gradients during the
backward pass, where the criterion turns them into scores at once, so no layer's activations outlive its
gradient. The weights are frozen for the pass: the backward computes activation gradients only.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from shadow.criteria import Criterion
from shadow.data import Batch, Example, collate
from shadow.models import Shape, decoder_layers

SHARD_SIZE = 512  # examples per safetensors file: traces stream to disk, not into RAM


class _Stop(Exception):
    pass


@contextmanager
def frozen(model: nn.Module):
    """Weights need no gradient; the embeddings' output does, so activations get theirs."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.detach().requires_grad_())
    try:
        yield
    finally:
        handle.remove()
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


@torch.no_grad()
def layer_features(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, positions: Tensor,
                   layer: int) -> Tensor:
    """The attention output (input of out_proj) of ``layer`` at ``positions``, running layers 0..layer only."""
    captured = {}
    attn = decoder_layers(model)[layer].self_attn

    def grab(module, args):
        captured["x"] = args[0][torch.arange(len(positions)), positions.to(args[0].device)].float()
        raise _Stop

    handle = attn.out_proj.register_forward_pre_hook(grab)
    try:
        model.model.decoder(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device))
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["x"].cpu()


def score_batch(model: nn.Module, batch: Batch, criterion: Criterion, shape: Shape,
                feature_layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """(features (B, E), head scores (B, L, H), neuron scores (B, L, F)) for one batch."""
    B = batch.input_ids.shape[0]
    heads = torch.zeros(B, shape.layers, shape.heads)
    neurons = torch.zeros(B, shape.layers, shape.neurons)
    valid = batch.attention_mask.float()
    features = {}
    handles = []

    def record(out: Tensor, index: int, scorer, act: Tensor):
        def on_grad(grad: Tensor) -> None:
            v = valid.to(act.device)
            out[:, index] = scorer(upcast(act), upcast(grad).reshape(act.shape), v).float().cpu()
        return on_grad

    def on_attention(index: int):
        def hook(module, args):
            a = args[0]
            if index == feature_layer:
                features["x"] = a.detach()[torch.arange(B), batch.last_context.to(a.device)].float().cpu()
            head_view = a.view(B, -1, shape.heads, shape.head_dim)
            if criterion.needs_grad:
                a.register_hook(record(heads, index, criterion.heads, head_view.detach()))
            else:
                heads[:, index] = criterion.heads(upcast(head_view), None, valid.to(a.device)).float().cpu()
        return hook

    def on_ffn(index: int):
        def hook(module, args):
            z = args[0].view(B, -1, shape.neurons)
            if criterion.needs_grad:
                args[0].register_hook(record(neurons, index, criterion.neurons, z.detach()))
            else:
                neurons[:, index] = criterion.neurons(upcast(z), None, valid.to(z.device)).float().cpu()
        return hook

    for index, layer in enumerate(decoder_layers(model)):
        handles.append(layer.self_attn.out_proj.register_forward_pre_hook(on_attention(index)))
        handles.append(layer.fc2.register_forward_pre_hook(on_ffn(index)))
    try:
        with frozen(model), torch.set_grad_enabled(criterion.needs_grad):
            device = model.device
            logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
            if criterion.needs_grad:
                example_loss(logits, batch.labels.to(device)).sum().backward()
    finally:
        for h in handles:
            h.remove()
    return features["x"], heads, neurons


def upcast(x: Tensor) -> Tensor:
    """At least float32: half-precision activations are scored in float32, float64 stays."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def example_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """(B,) mean cross-entropy of each example's labelled tokens (the gold continuation)."""
    target = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(upcast(logits[:, :-1]).transpose(1, 2), target, reduction="none",
                                            ignore_index=-100)
    counts = (target != -100).sum(1).clamp(min=1)
    return nll.sum(1) / counts


def compute_traces(model: nn.Module, examples: list[Example], criterion: Criterion, shape: Shape,
                   feature_layer: int, batch_size: int, pad_id: int, out_dir: Path) -> int:
    """Score all examples, writing shards ``traces-<n>.safetensors`` into out_dir; returns the shard count."""
    shard: dict[str, list[Tensor]] = {"features": [], "heads": [], "neurons": []}
    n_shards = 0

    def flush():
        nonlocal n_shards
        if shard["features"]:
            save_file({k: torch.cat(v).contiguous() for k, v in shard.items()},
                      str(out_dir / f"traces-{n_shards:05d}.safetensors"))
            n_shards += 1
            for v in shard.values():
                v.clear()

    for start in tqdm(range(0, len(examples), batch_size), desc=f"scoring ({criterion.name})", unit="batch"):
        batch = collate(examples[start:start + batch_size], pad_id)
        for key, value in zip(shard, score_batch(model, batch, criterion, shape, feature_layer), strict=True):
            shard[key].append(value)
        if sum(len(x) for x in shard["features"]) >= SHARD_SIZE:
            flush()
    flush()
    return n_shards


def load_traces(directory: Path) -> dict[str, Tensor]:
    shards = [load_file(str(p)) for p in sorted(directory.glob("traces-*.safetensors"))]
    return {k: torch.cat([s[k] for s in shards]) for k in ("features", "heads", "neurons")}
