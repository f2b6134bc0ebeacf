"""The decoding loop and its cache: a dense (or pruned, or thresholded) prompt pass, then one token per request at
every step through a step function, greedily, on a KV cache of the decoder's own; a static step captured as a CUDA
graph on CUDA. What a step reads is the step's business (``shadow.sparse.steps``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from shadow.arch import family_of
from shadow.offload import input_device
from shadow.policy import Masks


@dataclass
class Generation:
    tokens: Tensor  # (B, N) the greedy continuations
    logits: Tensor  # (B, N - 1, V) of the sparse decoding steps (the first token comes from the prompt pass)
    masks: Masks | None = None  # per-token masks: heads (N - 1, L, H), neurons (N - 1, L, F), each step's
    kept: Tensor | None = None  # thresholds: (N - 1, sites, L) each step's share of every site's channels read


@dataclass
class LayerCache:
    """One layer's cache for a batch of B requests, each request's P positions one span after another."""

    keys: Tensor  # (key-value heads · head_dim, B · P): one row per key unit, as the gather kernel writes them
    values: Tensor
    inputs: Tensor | None  # (B · P, E) attention inputs, to compute a head's skipped keys and values later
    done: Tensor  # (key-value heads,) per head: positions [0, done) have keys and values in every request
    prompt: int  # positions [0, prompt) have every head's keys and values (the dense prompt pass wrote them)
    requests: int  # B
    rotary: Tensor | None = None  # a rotary family's (2, P, head_dim) cosines and sines, shared by the layers


PromptCache = list[tuple[Tensor, Tensor]]  # per layer: keys and values, (B, key-value heads, T, head_dim) each
Prompt = Callable[[Tensor], tuple[Tensor, PromptCache]]  # (B, T) ids → (B, V) last logits and the prompt's cache
# (tokens, position, last, caches) → (B, V) logits and what the step applied; ``last`` is the position as the
# launches take it: the host's int, sizing them, or the 0-d device tensor itself in a static step
Step = Callable[[Tensor, Tensor, "int | Tensor", list[LayerCache]], tuple[Tensor, Any]]


@contextmanager
def stored_transposed(modules: list[nn.Linear]) -> Iterator[None]:
    """Store these projections' weights transposed in place for the block (rows = input units), as
    ``kernels.columns`` reads them; values are untouched and the model runs as before. A weight already stored so
    (an enclosing block) is left as it is, and so on leaving."""
    changed = [m for m in modules if not m.weight.data.t().is_contiguous()]
    for m in changed:
        m.weight.data = m.weight.data.t().contiguous().t()
    try:
        yield
    finally:
        for m in changed:
            m.weight.data = m.weight.data.contiguous()


def prompt_pass(model: nn.Module, input_ids: Tensor) -> tuple[Tensor, PromptCache]:
    """The model's (B, V) logits at the prompts' last position, and each layer's keys and values."""
    out = model(input_ids.to(input_device(model)), use_cache=True)
    cache = out["cache" if "cache" in out else "past_key_values"]  # newer transformers name it ``cache``
    return out.logits[:, -1], [(layer.keys, layer.values) for layer in cache.layers]


def layer_caches(model: nn.Module, prompt_cache: PromptCache, positions: int, catch_up: bool) -> list[LayerCache]:
    """Each layer's cache for ``positions`` positions, the prompt's filled in; with ``catch_up``, room for the
    attention inputs from which heads skipped at some steps compute their keys and values later."""
    family = family_of(model.config)
    caches, tables = [], {}  # one rotary table per device, built once for the generation
    for layer, keys_and_values in zip(family.layers(model), prompt_cache, strict=True):
        stores = []
        for prompt in keys_and_values:  # (B, kv heads, T, head_dim)
            B, H, T, D = prompt.shape
            store = prompt.new_zeros(H, D, B, positions)
            store[..., :T] = prompt.permute(1, 3, 0, 2)
            stores.append(store.view(H * D, B * positions))
        width = family.module(layer, "query").in_features
        inputs = prompt.new_zeros(B * positions, width) if catch_up else None
        if prompt.device not in tables:
            tables[prompt.device] = family.rotary_table(model, positions, prompt.device, prompt.dtype)
        caches.append(LayerCache(*stores, inputs, torch.full((H,), T, device=prompt.device), T, B,
                                 tables[prompt.device]))
    return caches


class CapturedStep:
    """A decoding step as a CUDA graph. The first call runs eagerly on a side stream (compiling the kernels and
    warming the allocator, as a capture needs), the second captures the step and replays it, and so does every
    later call: the token is copied into the captured input, and the caller advances the position in place."""

    def __init__(self, step: Callable[[Tensor], tuple[Tensor, Masks | Tensor]]):
        self.step, self.warm = step, False
        self.graph: torch.cuda.CUDAGraph | None = None
        self.tokens: Tensor | None = None
        self.out: tuple[Tensor, Masks | Tensor] | None = None

    def __call__(self, tokens: Tensor) -> tuple[Tensor, Masks | Tensor]:
        if not self.warm:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(tokens)
            torch.cuda.current_stream().wait_stream(side)
            self.warm = True
            return out
        if self.graph is None:
            self.tokens, self.graph = tokens.clone(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.step(self.tokens)
        self.tokens.copy_(tokens)
        self.graph.replay()
        logits, applied = self.out  # the graph's own memory, rewritten by the next replay
        if isinstance(applied, Masks):
            return logits.clone(), Masks(applied.heads.clone(), applied.neurons.clone())
        return logits.clone(), applied.clone()


@torch.no_grad()
def decode(model: nn.Module, input_ids: Tensor, new_tokens: int, prompt: Prompt, step: Step, static: bool,
           catch_up: bool) -> tuple[Tensor, Tensor, list]:
    """Greedily continue a batch of (B, T) prompts, all of length T, by ``new_tokens`` tokens: ``prompt`` runs
    them, then ``step`` gives each next token. A static step (the same launches at every position, which read it
    from a device tensor) is captured as a CUDA graph on CUDA. Returns the (B, N) tokens and (B, N - 1, V) logits,
    on the CPU, and what each step applied."""
    requests, length = input_ids.shape
    window = family_of(model.config).sliding_window(model.config)
    if window is not None and length + new_tokens - 2 >= window:
        raise ValueError(f"a {length}-token prompt and new_tokens={new_tokens} reach position "
                         f"{length + new_tokens - 2}, past the {window}-token sliding window, which per-token "
                         "decoding does not apply; use shorter prompts and continuations")
    last_logits, prompt_cache = prompt(input_ids)
    caches = layer_caches(model, prompt_cache, length + new_tokens, catch_up)
    tokens = [last_logits.argmax(-1)]  # on the device: read once, at the end
    position = torch.tensor(length, device=tokens[0].device)  # advanced in place: the steps read it there
    graph = (CapturedStep(partial(step, position=position, last=position, caches=caches))
             if static and position.is_cuda else None)
    logits, applied = [], []
    for last in range(length, length + new_tokens - 1):
        if graph is not None:
            step_logits, step_applied = graph(tokens[-1])
        else:
            step_logits, step_applied = step(tokens[-1], position, position if static else last, caches)
        position += 1
        tokens.append(step_logits.argmax(-1))
        logits.append(step_logits)
        applied.append(step_applied)
    return (torch.stack(tokens, 1).cpu(), torch.stack(logits, 1).cpu() if logits else
            torch.zeros(requests, 0, model.config.vocab_size), applied)
