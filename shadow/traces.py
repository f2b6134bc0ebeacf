"""Importance traces: per example, the predictor's input feature and every head's and neuron's score.

One forward and one backward pass per batch. Pre-hooks on each layer's attention output projection and FFN down
projection (the model family's ``head_output`` and ``ffn_output``) see the head outputs and the FFN activations;
tensor hooks on those inputs receive their gradients during the backward pass, where the criterion turns them into
scores at once, so no layer's activations outlive its gradient. The weights are frozen for the pass: the backward
computes activation gradients only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from shadow.arch import Shape, family_of
from shadow.criteria import Criterion, Needs, Units
from shadow.data import Batch, Example, collate
from shadow.masking import apply_masks
from shadow.offload import input_device, resident
from shadow.policy import Masks

SHARD_SIZE = 512  # examples per safetensors file: traces stream to disk, not into RAM


class _Stop(Exception):
    pass


@contextmanager
def frozen(model: nn.Module):
    """Weights need no gradient; the embeddings' output does, so activations get theirs."""
    flags = {name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)}
    model.requires_grad_(False)
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.detach().requires_grad_())
    try:
        yield
    finally:
        handle.remove()
        # by name: accelerate's offload hooks replace parameter objects (and may untie shared ones) per forward
        for name, p in model.named_parameters(remove_duplicate=False):
            p.requires_grad_(flags.get(name, False))


@torch.no_grad()
def layer_features(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, positions: Tensor | None,
                   layers: Sequence[int]) -> Tensor:
    """The attention outputs (inputs of the output projection) of ``layers`` in a dense pass that stops after the last
    of them: (B, len(layers), E) at one position per row, or (B, T, len(layers), E) at every position
    (``positions=None``), in float32 on the model's input device."""
    captured: dict[int, Tensor] = {}
    last = max(layers)

    def grab(index: int):
        def hook(module, args):
            x = args[0]
            captured[index] = (x if positions is None else x[torch.arange(len(x)), positions.to(x.device)]).float()
            if index == last:
                raise _Stop
        return hook

    family = family_of(model.config)
    handles = [family.head_output(family.layers(model)[i]).register_forward_pre_hook(grab(i)) for i in set(layers)]
    try:
        device = input_device(model)
        family.backbone(model)(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([captured[i].to(device) for i in layers], dim=-2)


def score_batch(model: nn.Module, batch: Batch, criterion: Criterion, shape: Shape,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(features (B, L, E): every layer's attention output at the last context token, head scores (B, L, H),
    neuron scores (B, L, F)) for one batch, in float32 on the model's input device."""
    B = batch.input_ids.shape[0]
    device = input_device(model)
    heads = torch.zeros(B, shape.layers, shape.heads, device=device)
    neurons = torch.zeros(B, shape.layers, shape.neurons, device=device)
    valid = batch.attention_mask.float()
    targets = torch.cat([batch.input_ids[:, 1:].masked_fill(batch.attention_mask[:, 1:] == 0, -100),
                         torch.full((B, 1), -100)], dim=1)
    labels = torch.cat([batch.labels[:, 1:], torch.full((B, 1), -100)], dim=1)  # the loss's target at each token
    needs, captured, handles = criterion.needs, {}, []
    scaling = LossScaling(model.dtype)
    family = family_of(model.config)
    layers = family.layers(model)

    activation = family.activation(model.config)

    def units(act: Tensor, grad: Tensor | None, index: int, kind: str) -> Units:
        weights = {}
        if Needs.WEIGHTS in needs:
            with resident(layers[index]):  # offloaded weights come back for the read
                weights = {role: upcast(family.module(layers[index], role).weight.detach()).to(act.device)
                           for role in ("value", "output", *family.neuron_rows, "down")}
        neurons = kind == "neurons"
        return Units(act=upcast(act), grad=None if grad is None else scaling.unscale(grad).reshape(act.shape),
                     valid=valid.to(act.device), activation=activation, weights=weights,
                     ffn_input=captured.pop(("ffn_input", index), None) if neurons else None,
                     pre_activation=captured.pop(("pre_activation", index), None) if neurons else None,
                     up=captured.pop(("up", index), None) if neurons else None,
                     output_grad=captured.pop(("output_grad", index), None) if kind == "heads" else None,
                     targets=targets.to(act.device), labels=labels.to(act.device), generator=generator)

    def score(out: Tensor, index: int, kind: str, scorer, act: Tensor, tensor: Tensor) -> None:
        """Score now, or when the gradient of ``tensor`` arrives in the backward pass. Heads are scored per query
        head, then summed into the attention units."""
        pool = shape.unit_scores if kind == "heads" else (lambda scores: scores)
        if Needs.GRAD not in needs:
            out[:, index] = pool(scorer(units(act, None, index, kind)).float())
            return

        def on_grad(grad: Tensor) -> None:
            out[:, index] = pool(scorer(units(act, grad, index, kind)).float())
        tensor.register_hook(on_grad)

    def per_head(x: Tensor) -> Tensor:
        """(B, T, query heads, chunk): head outputs, or the output projection's output in as many chunks."""
        return x.view(B, -1, shape.query_heads, x.shape[-1] // shape.query_heads)

    def on_attention(index: int):
        def hook(module, args):
            a = args[0]
            captured[("features", index)] = a.detach()[torch.arange(B), batch.last_context.to(a.device)].float()
            if criterion.heads is not None:
                score(heads, index, "heads", criterion.heads, per_head(a.detach()), a)
        return hook

    def on_attention_output(index: int):
        def hook(module, args, output):
            def keep(grad: Tensor) -> None:
                captured[("output_grad", index)] = per_head(scaling.unscale(grad))
            output.register_hook(keep)
        return hook

    def on_ffn_input(index: int):
        def hook(module, args):
            captured[("ffn_input", index)] = upcast(args[0].detach()).view(B, -1, args[0].shape[-1])
        return hook

    def on_output(key: str, index: int):
        def hook(module, args, output):
            captured[(key, index)] = upcast(output.detach()).view(B, -1, output.shape[-1], 1)
        return hook

    def on_ffn(index: int):
        def hook(module, args):
            z = args[0]
            score(neurons, index, "neurons", criterion.neurons, z.detach().view(B, -1, shape.neurons, 1), z)
        return hook

    for index, layer in enumerate(layers):
        attention_output, ffn_input = family.head_output(layer), family.ffn_input(layer)
        handles.append(attention_output.register_forward_pre_hook(on_attention(index)))
        if Needs.OUTPUT_GRAD in needs:
            handles.append(attention_output.register_forward_hook(on_attention_output(index)))
        if Needs.FFN_INPUT in needs:
            handles.append(ffn_input.register_forward_pre_hook(on_ffn_input(index)))
        if Needs.PRE_ACTIVATION in needs:
            handles.append(ffn_input.register_forward_hook(on_output("pre_activation", index)))
            if family.gated:
                handles.append(family.module(layer, "up").register_forward_hook(on_output("up", index)))
        if criterion.neurons is not None:
            handles.append(family.ffn_output(layer).register_forward_pre_hook(on_ffn(index)))
    try:
        if Needs.HESSIAN in needs:
            heads[:], neurons[:] = gate_hessian_scores(model, batch, shape)
        else:
            with frozen(model), torch.set_grad_enabled(Needs.GRAD in needs):
                for _ in scaling:  # more than once only after a float16 overflow
                    logits = model(input_ids=batch.input_ids.to(device),
                                   attention_mask=batch.attention_mask.to(device)).logits
                    if Needs.GRAD in needs:
                        (example_loss(logits, batch.labels.to(logits.device)).sum() * scaling.scale).backward()
    finally:
        for h in handles:
            h.remove()
    features = torch.stack([captured[("features", i)].to(device) for i in range(shape.layers)], dim=1)
    return features, heads, neurons


class LossScaling:
    """Loss scaling for float16 backward passes, whose small gradients underflow (on opt-mini, 35% of FFN-activation
    gradients are subnormal unscaled, none at 2^16): the loss is multiplied by ``scale`` (2^16 first, as torch's
    GradScaler), the gradients criteria read are divided by it in float32, and an overflow reruns the pass with a
    smaller scale. bfloat16 has float32's range: one pass, scale 1. Iterating yields once per pass to run."""

    def __init__(self, dtype: torch.dtype):
        self.half = dtype == torch.float16
        self.scale = 2.0 ** 16 if self.half else 1.0
        self.finite: list[Tensor] = []

    def unscale(self, grad: Tensor) -> Tensor:
        """A gradient of the scaled loss → float32 (at least) gradient of the loss; notes whether it overflowed."""
        if self.half:
            self.finite.append(torch.isfinite(grad).all())
        return upcast(grad) / self.scale

    def __iter__(self) -> Iterator[float]:
        while True:
            self.finite = []
            yield self.scale
            if not self.finite or bool(torch.stack([f.to(self.finite[0].device) for f in self.finite]).all()):
                return
            if self.scale <= 1:
                raise FloatingPointError("float16 gradients overflow even without loss scaling; use "
                                         "model.dtype=bfloat16 or float32")
            self.scale /= 2.0 ** 8


def gate_hessian_scores(model: nn.Module, batch: Batch, shape: Shape) -> tuple[Tensor, Tensor]:
    """GraSP on multiplicative gates θ: +H g at θ = 1, per example (the Hessian is block-diagonal over examples).
    GraSP removes the units with the largest −θ ⊙ Hg; the policy keeps the highest scores, so the score is +Hg.

    The gates are float32 whatever the model's dtype (their products are cast back), so the gate gradients sum
    in float32; float16 passes are loss-scaled. Needs double backward, which only the eager attention supports;
    the model's own choice is restored after.
    """
    device = input_device(model)
    B = batch.input_ids.shape[0]
    scaling = LossScaling(model.dtype)
    attention = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        for scale in scaling:
            gates = Masks(torch.ones(B, shape.layers, shape.heads, device=device, requires_grad=True),
                          torch.ones(B, shape.layers, shape.neurons, device=device, requires_grad=True))
            with frozen(model), torch.enable_grad(), apply_masks(model, gates):
                logits = model(input_ids=batch.input_ids.to(device),
                               attention_mask=batch.attention_mask.to(device)).logits
                loss = example_loss(logits, batch.labels.to(logits.device)).sum() * scale
                grads = torch.autograd.grad(loss, [gates.heads, gates.neurons], create_graph=True)  # scale · g
                # d/dθ <scale · g, g> = scale · H g: the second pass is scaled once, like the first
                hvp = torch.autograd.grad(sum((g * g.detach() / scale).sum() for g in grads),
                                          [gates.heads, gates.neurons])
            hvp = [scaling.unscale(h) for h in hvp]
    finally:
        model.set_attn_implementation(attention)
    return hvp[0], hvp[1]


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
                   batch_size: int, pad_id: int, out_dir: Path, seed: int = 0) -> int:
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
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start)  # the random control, reproducible
        scores = score_batch(model, batch, criterion, shape, generator)
        for key, value in zip(shard, scores, strict=True):
            shard[key].append(value.cpu())
        if sum(len(x) for x in shard["features"]) >= SHARD_SIZE:
            flush()
    flush()
    return n_shards


class TraceShards:
    """Traces as the shards they were written in, each read when asked for: what reads them (predictor training,
    static importance) holds a shard or a block of them, never necessarily the whole set. A shard is a
    ``traces-*.safetensors`` file or, in memory, a dict of its tensors."""

    def __init__(self, shards: Sequence[Path | dict[str, Tensor]]):
        self.shards = list(shards)
        self.sizes = [self._rows(s) for s in self.shards]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]

    @classmethod
    def load(cls, directory: Path) -> TraceShards:
        return cls(sorted(directory.glob("traces-*.safetensors")))

    @staticmethod
    def _rows(shard: Path | dict[str, Tensor]) -> int:
        if isinstance(shard, dict):
            return len(shard["features"])
        with safe_open(str(shard), framework="pt") as f:
            return f.get_slice("features").get_shape()[0]

    def __len__(self) -> int:
        return sum(self.sizes)

    def read(self, index: int, keys: Sequence[str], layers: Sequence[int] | None = None) -> dict[str, Tensor]:
        """The tensors ``keys`` of shard ``index``, only at ``layers`` (dimension 1) when given: a file is read
        only for the span from the first to the last of them (the predictor's feature layer, not all 40)."""
        shard = self.shards[index]
        span = slice(None) if layers is None else slice(min(layers), max(layers) + 1)
        pick = slice(None) if layers is None else [i - span.start for i in layers]
        if isinstance(shard, dict):
            return {k: shard[k][:, span][:, pick] for k in keys}
        with safe_open(str(shard), framework="pt") as f:
            return {k: f.get_slice(k)[:, span][:, pick] for k in keys}

    def shape(self, key: str) -> tuple[int, ...]:
        """One example's shape of ``key``."""
        shard = self.shards[0]
        if isinstance(shard, dict):
            return tuple(shard[key].shape[1:])
        with safe_open(str(shard), framework="pt") as f:
            return tuple(f.get_slice(key).get_shape()[1:])
