"""Sparse execution: the pruned units' (or zeroed channels') weights are not read at all. Outputs equal the masked
(or thresholded) model's (tested).

Per request, ``pruned(model, masks, shape)`` swaps, for the duration of a block, each layer's projections for
smaller ones that hold only the kept units' weights, gathered once: the query, key and value rows and the output
projection's columns of the kept key-value groups (so the KV cache holds only those), and the rows (gate, up) and
columns (down) of the kept FFN units; the model family names the projections of each role. Prefill and every
decoding step then run on the smaller layers. ``RequestDecoder`` decodes under per-request masks faster: the
prompt on those smaller layers, then every step with ``TokenDecoder``'s step on the same kept units, reading them
in place.

Per token, ``TokenDecoder`` decodes greedily with a fresh mask at every step, as DejaVu does, and copies no weights:
the gather kernels of ``shadow.kernels`` read the kept rows (query, key, value, gate, up) and the kept columns
(output, down: stored transposed) in place; the family's ``decode_step`` is the model's forward for one token per
request of a batch, the decoder supplying each layer's attention and FFN. Copying the kept weights at every step
would cost more than the dense product.

Under TEAL's or CATS' thresholds, ``ThresholdDecoder`` decodes the same way, each step reading only the columns of
the input channels kept (TEAL) or the up rows and down columns of the FFN units kept (CATS).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import Tensor, nn

from shadow import kernels
from shadow.arch import Family, Shape, family_of
from shadow.offload import input_device, offloaded, resident
from shadow.policy import Masks, Policy
from shadow.predictors import Predictor
from shadow.thresholds import reads, site_index, sites, thresholded
from shadow.weights_read import masks_read, weights_read


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A Linear holding these tensors; built on the meta device, so no throwaway initialisation runs."""
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias, requires_grad=False)
    return out


def _rows(layer: nn.Linear, index: Tensor) -> nn.Linear:
    bias = layer.bias.data.index_select(0, index) if layer.bias is not None else None
    return _linear(layer.weight.data.index_select(0, index), bias)


def _columns(layer: nn.Linear, index: Tensor) -> nn.Linear:
    """The kept columns, in the weight's own layout: a weight stored transposed (as the decoders store the ones they
    read by columns) gives contiguous rows of its storage, which a product reads as they are."""
    bias = layer.bias.data.clone() if layer.bias is not None else None
    weight = layer.weight.data
    if weight.t().is_contiguous():
        return _linear(weight.t().index_select(0, index).t(), bias)
    return _linear(weight.index_select(1, index).contiguous(), bias)


def _head_dims(heads: Tensor, head_dim: int) -> Tensor:
    """The rows (or columns) of ``heads`` in a projection with ``head_dim`` of them per head."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


def _pruned_groups(shape: Shape, heads: Tensor) -> tuple[Tensor, Tensor]:
    """A layer's kept query heads (a mask) under its (H,) head mask, and the key-value groups ``pruned`` keeps
    (indices): those with a kept query head, or group 0 alone when none has one."""
    query_kept = shape.query_mask(heads.bool())
    groups = query_kept.view(shape.kv_heads, shape.group_size).any(-1)
    if not groups.any():
        groups[0] = True
    return query_kept, groups.nonzero().flatten()


@contextmanager
def pruned(model: nn.Module, masks: Masks, shape: Shape) -> Iterator[None]:
    """Run the model with only the units kept by a single request's masks ((1, L, heads) and (1, L, F) in the
    units of ``shape``).

    Attention keeps whole key-value groups, those with a kept query head: their query, key and value rows and
    output columns (so the KV cache holds only those groups). A query head of a kept group that the mask removes
    (``attention_unit=query_head``) has its output columns zeroed; so has the one group a layer with no kept head
    keeps, so that the KV cache keeps its layout."""
    if masks.heads.dim() != 3 or masks.heads.shape[0] != 1:
        raise ValueError("pruned() takes one request's masks: heads (1, L, H), neurons (1, L, F)")
    family = family_of(model.config)
    saved = []
    try:
        for index, layer in enumerate(family.layers(model)):
            saved.append((layer, {role: family.module(layer, role) for role in family.paths}))
            with resident(layer):  # the copies live on the layer's execution device, offloaded or not
                device = family.head_output(layer).weight.device
                query_kept, groups = _pruned_groups(shape, masks.heads[0, index].to(device))
                queries = _head_dims(groups, shape.group_size)  # every query head of the kept groups
                query_dims = _head_dims(queries, shape.head_dim)
                neurons = masks.neurons[0, index].nonzero().flatten().to(device)
                gathers = ((family.query_rows, _rows, query_dims),
                           (family.kv_rows, _rows, _head_dims(groups, shape.head_dim)),
                           (family.head_columns, _columns, query_dims),
                           (family.neuron_rows, _rows, neurons), (family.neuron_columns, _columns, neurons))
                for roles, gather, kept in gathers:
                    for role in roles:
                        family.replace(layer, role, gather(family.module(layer, role), kept))
                removed = ~query_kept[queries]
                if removed.any():
                    output = family.head_output(layer).weight.data
                    output.view(output.shape[0], len(queries), shape.head_dim)[:, removed] = 0
                family.set_head_count(layer, len(queries))
        yield
    finally:
        for layer, modules in saved:
            for role, module in modules.items():
                family.replace(layer, role, module)
            family.set_head_count(layer, shape.query_heads)


@dataclass
class Generation:
    tokens: Tensor  # (B, N) the greedy continuations
    logits: Tensor  # (B, N - 1, V) of the sparse decoding steps (the first token comes from the prompt pass)
    masks: Masks | None = None  # per-token masks: heads (N - 1, L, H), neurons (N - 1, L, F), each step's
    kept: Tensor | None = None  # thresholds: (N - 1, sites, L) each step's share of every site's channels read


@dataclass
class _LayerCache:
    """One layer's cache for a batch of B requests, each request's P positions one span after another."""

    keys: Tensor  # (key-value heads · head_dim, B · P): one row per key unit, as the gather kernel writes them
    values: Tensor
    inputs: Tensor | None  # (B · P, E) attention inputs, to compute a head's skipped keys and values later
    done: Tensor  # (key-value heads,) per head: positions [0, done) have keys and values in every request
    prompt: int  # positions [0, prompt) have every head's keys and values (the dense prompt pass wrote them)
    requests: int  # B

    def request(self, b: int) -> tuple[Tensor, Tensor]:
        """Request b's keys and values, (key-value heads · head_dim, P) views of the stores."""
        span = self.keys.shape[1] // self.requests
        return self.keys[:, b * span:(b + 1) * span], self.values[:, b * span:(b + 1) * span]


@dataclass
class _Kept:
    """One layer's mask at one decoding step, and the sorted indices the kernels read. Their lengths are known on
    the host before the mask is (static) under a local policy, so that nothing is read back from the device."""

    heads: Tensor  # (H,) bool, in attention units
    neurons: Tensor  # (F,) bool
    queries: Tensor  # the kept query heads
    kv_heads: Tensor  # the key-value heads to compute: every one a kept query head reads, and perhaps more
    units: Tensor  # the kept FFN units


def _leading(masks: Tensor, counts: list[int]) -> list[Tensor]:
    """Row i's first ``counts[i]`` units when a (n, U) mask's kept units are put first, in order (a stable sort):
    the kept units when ``counts[i]`` is how many row i keeps, padded with removed ones when it is more."""
    order = masks.to(torch.int8).sort(dim=-1, descending=True, stable=True).indices
    return [order[i, :count] for i, count in enumerate(counts)]


def _kept_sets(shape: Shape, heads: Tensor, neurons: Tensor, counts: tuple[list[int], list[int]] | None
               ) -> list[_Kept]:
    """The kept sets of n layers from their (n, H) head masks (in attention units) and (n, F) neuron masks.
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
    return [_Kept(heads[i], neurons[i], q, g.sort().values if padded else g, u)
            for i, (q, g, u) in enumerate(zip(_leading(queries, query_counts), _leading(groups, group_counts),
                                              _leading(neurons, neuron_counts), strict=True))]


class _CapturedStep:
    """A decoding step as a CUDA graph. The first call runs eagerly on a side stream (compiling the kernels and
    warming the allocator, as a capture needs), the second captures the step and replays it, and so does every
    later call: the token is copied into the captured input, and the caller advances the position in place."""

    def __init__(self, step: Callable[[Tensor], tuple[Tensor, Masks]]):
        self.step, self.warm = step, False
        self.graph: torch.cuda.CUDAGraph | None = None
        self.tokens: Tensor | None = None
        self.out: tuple[Tensor, Masks] | None = None

    def __call__(self, tokens: Tensor) -> tuple[Tensor, Masks]:
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
        logits, masks = self.out  # the graph's own memory, rewritten by the next replay
        return logits.clone(), Masks(masks.heads.clone(), masks.neurons.clone())


def _gated_down(family: Family, layer: nn.Module, h: Tensor, units: Tensor, activations: Tensor) -> Tensor:
    """An FFN's output from its kept units' activations (B, kept), act(gate) or act(up): times their up rows in a
    gated FFN, through their down columns."""
    if family.gated:
        activations = activations * kernels.rows(family.module(layer, "up"), units, h)
    return kernels.columns(family.ffn_output(layer), units, activations)


class _Decoder(ABC):
    """Greedy decoding, one token per request at each step through the family's ``decode_step``, on a KV cache of
    its own, reading the weights a step needs in place through ``shadow.kernels``. A subclass says which
    projections it reads by columns (stored transposed while the decoder is entered), runs the prompt and the
    steps, and says what the steps applied."""

    catch_up = False  # heads skipped at some steps compute their keys and values later, from cached inputs

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = family_of(model.config)
        self.layers = self.family.layers(model)
        self.activations = [layer.get_submodule(self.family.activation_path) for layer in self.layers]
        self.active = False
        self.fetch = [resident if offloaded(layer) else nullcontext for layer in self.layers]  # once, not per step

    def __enter__(self) -> _Decoder:
        """Store the column-read weights transposed in place (rows = input units) for ``kernels.columns``; the
        values are untouched and the model runs as before. ``generate`` does this itself when not inside."""
        for m in self._column_modules():
            m.weight.data = m.weight.data.t().contiguous().t()
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        for m in self._column_modules():
            m.weight.data = m.weight.data.contiguous()
        self.active = False

    @abstractmethod
    def _column_roles(self) -> tuple[str, ...]:
        """The roles of the projections read by columns."""

    def _column_modules(self) -> list[nn.Linear]:
        return [self.family.module(layer, role) for layer in self.layers for role in self._column_roles()]

    def _prompt(self, input_ids: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """The model's (B, V) logits at the prompts' last position, and each layer's keys and values, (B, key-value
        heads, T, head_dim) each."""
        out = self.model(input_ids.to(input_device(self.model)), use_cache=True)
        cache = out["cache" if "cache" in out else "past_key_values"]  # newer transformers name it ``cache``
        return out.logits[:, -1], [(layer.keys, layer.values) for layer in cache.layers]

    def _static_steps(self, requests: int) -> bool:
        return False

    @abstractmethod
    def _step(self, tokens: Tensor, position: Tensor, last: int | Tensor, caches: list[_LayerCache]) -> tuple:
        """One token per request at ``position``: the (B, V) logits and what the step applied."""

    @abstractmethod
    def _applied(self, steps: list) -> dict:
        """The Generation's fields for what the steps applied."""

    @abstractmethod
    def weights_read(self, generation: Generation) -> float:
        """The share of the dense step's weights a step of this generation read, on average."""

    def generate(self, input_ids: Tensor, new_tokens: int) -> Generation:
        """Greedily continue a batch of (B, T) prompts, all of length T, by ``new_tokens`` tokens."""
        with nullcontext() if self.active else self:
            return self._generate(input_ids, new_tokens)

    @torch.no_grad()
    def _generate(self, input_ids: Tensor, new_tokens: int) -> Generation:
        requests, prompt = input_ids.shape
        window = self.family.sliding_window(self.model.config)
        if window is not None and prompt + new_tokens - 2 >= window:
            raise ValueError(f"a {prompt}-token prompt and new_tokens={new_tokens} reach position "
                             f"{prompt + new_tokens - 2}, past the {window}-token sliding window, which per-token "
                             "decoding does not apply; use shorter prompts and continuations")
        static = self._static_steps(requests)
        last_logits, prompt_cache = self._prompt(input_ids)
        caches = self._caches(prompt_cache, prompt + new_tokens)
        tokens = [last_logits.argmax(-1)]  # on the device: read once, at the end
        position = torch.tensor(prompt, device=tokens[0].device)  # advanced in place: the steps read it there
        graph = (_CapturedStep(partial(self._step, position=position, last=position, caches=caches))
                 if static and position.is_cuda else None)
        logits, steps = [], []
        for last in range(prompt, prompt + new_tokens - 1):
            if graph is not None:
                step_logits, applied = graph(tokens[-1])
            else:
                step_logits, applied = self._step(tokens[-1], position, position if static else last, caches)
            position += 1
            tokens.append(step_logits.argmax(-1))
            logits.append(step_logits)
            steps.append(applied)
        return Generation(torch.stack(tokens, 1).cpu(), torch.stack(logits, 1).cpu() if logits else
                          torch.zeros(requests, 0, self.model.config.vocab_size), **self._applied(steps))

    def _caches(self, prompt_cache: list[tuple[Tensor, Tensor]], positions: int) -> list[_LayerCache]:
        caches = []
        for layer, keys_and_values in zip(self.layers, prompt_cache, strict=True):
            stores = []
            for prompt in keys_and_values:  # (B, kv heads, T, head_dim)
                B, H, T, D = prompt.shape
                store = prompt.new_zeros(H, D, B, positions)
                store[..., :T] = prompt.permute(1, 3, 0, 2)
                stores.append(store.view(H * D, B * positions))
            width = self.family.module(layer, "query").in_features
            inputs = prompt.new_zeros(B * positions, width) if self.catch_up else None
            caches.append(_LayerCache(*stores, inputs, torch.full((H,), T, device=prompt.device), T, B))
        return caches


class _UnitDecoder(_Decoder):
    """Decoding under masks of heads and FFN units (in ``shape``'s units): each step's attention and FFN read only
    the kept units' weights, reading nothing back from the device, and a static step is captured as a CUDA graph on
    CUDA (see ``TokenDecoder``). A subclass says which units a step keeps and what keeps its steps from being
    static."""

    catch_up = True

    def __init__(self, model: nn.Module, shape: Shape, static: bool | None):
        super().__init__(model)
        self.shape, self.static = shape, static
        self.groups_at: dict[int, list[int]] = {}  # layer -> groups of predictors run in the step (TokenDecoder)

    @abstractmethod
    def _step_kept(self) -> dict[int, _Kept]:
        """The kept sets known as a step starts, by layer (a fresh dict: predictors that run add theirs)."""

    def _other_devices(self) -> set[str]:
        """Devices besides the model's that a step runs on."""
        return set()

    def _varying(self, requests: int) -> str | None:
        """Why a step's kept counts are not known in advance for a batch of ``requests``, or None."""
        return None

    def _column_roles(self) -> tuple[str, ...]:
        return self.family.head_columns + self.family.neuron_columns

    def _applied(self, steps: list[Masks]) -> dict:
        empty = torch.zeros(0, self.shape.layers, 0, dtype=torch.bool)
        return {"masks": Masks(torch.stack([m.heads for m in steps]).cpu() if steps else empty,
                               torch.stack([m.neurons for m in steps]).cpu() if steps else empty)}

    def weights_read(self, generation: Generation) -> float:
        return masks_read(self.model, generation.masks)

    def _static_steps(self, requests: int) -> bool:
        """Whether this generation's steps are static: as asked, or by default where a CUDA graph can capture them
        (an error where it was asked on CUDA and cannot)."""
        cuda = input_device(self.model).type == "cuda"
        blocker = self._capture_blocker(requests) if cuda else "the model is not on CUDA"
        if self.static is None:
            return blocker is None
        if self.static and cuda and blocker is not None:
            raise ValueError(f"static=True: a CUDA graph cannot capture this decoding step: {blocker}; use "
                             "static=None to decide by itself")
        return self.static

    def _capture_blocker(self, requests: int) -> str | None:
        """Why a CUDA graph cannot capture this decoder's step for a batch of ``requests``, or None."""
        devices = {str(p.device) for p in self.model.parameters()} | self._other_devices()
        if len(devices) > 1:
            return f"the weights lie on {', '.join(sorted(devices))}; put them on one GPU, not offloaded"
        if (varying := self._varying(requests)) is not None:
            return varying
        if not getattr(kernels.backend(self.family.module(self.layers[0], "query").weight), "positions_on_device",
                       False):
            return "the Triton kernels are not in use; install triton and leave SHADOW_GATHER unset"
        return None

    def _step(self, tokens: Tensor, position: Tensor, last: int | Tensor, caches: list[_LayerCache]
              ) -> tuple[Tensor, Masks]:
        """One token per request at ``position`` (a 0-d device tensor) through the model family's decoding step,
        each layer's attention and FFN reading only the kept units. ``last`` is the position as the launches take
        it: the host's int, sizing them, or the tensor itself in a static step."""
        kept = self._step_kept()  # predictors running in the step add theirs

        def attention(index: int, h: Tensor) -> Tensor:
            return self._attention(index, self.layers[index], h, position, last, caches[index], kept)

        def ffn(index: int, h: Tensor) -> Tensor:
            layer, units = self.layers[index], kept[index].units.to(h.device)
            activations = self.activations[index](kernels.rows(self.family.ffn_input(layer), units, h))
            return _gated_down(self.family, layer, h, units, activations)

        logits = self.family.decode_step(self.model, tokens, position, attention, ffn,
                                         lambda index: self.fetch[index](self.layers[index]))
        return logits, Masks(torch.stack([kept[i].heads.to(logits.device) for i in range(len(self.layers))]),
                             torch.stack([kept[i].neurons.to(logits.device) for i in range(len(self.layers))]))

    def _attention(self, index: int, layer: nn.Module, h: Tensor, position: Tensor, last: int | Tensor,
                   cache: _LayerCache, kept: dict[int, _Kept]) -> Tensor:
        """One position's attention output after the output projection, (B, E) for the batch's (B, E) inputs, over
        the kept heads (all of them when the layer's mask is not known yet); runs the predictors that read this
        layer. Query heads read their group's key-value head, whose keys and values are computed first (for more
        groups, see the class)."""
        query, key, value, output = (self.family.module(layer, role) for role in ("query", "key", "value", "output"))
        shape, D, device, B = self.shape, self.shape.head_dim, h.device, cache.requests
        known = kept.get(index)
        if known is not None:
            queries, kv_heads = known.queries.to(device), known.kv_heads.to(device)
        else:
            queries = torch.arange(shape.query_heads, device=device)
            kv_heads = torch.arange(shape.kv_heads, device=device)
        position = position.to(device)  # a no-op but across the GPUs of a split model
        last = position if isinstance(last, Tensor) else last
        cache.inputs.view(B, -1, h.shape[1]).index_copy_(1, position.view(1), h[:, None])
        first = cache.done[kv_heads]  # a head kept again catches up on skipped positions
        kv_dims, first_rows = _head_dims(kv_heads, D), first.repeat_interleave(D)
        kernels.rows_into(cache.keys, key, kv_dims, cache.inputs, first_rows, last, B)
        kernels.rows_into(cache.values, value, kv_dims, cache.inputs, first_rows, last, B)
        if self.family.rotary:
            self._rotate_new_keys(layer, cache, kv_heads, first, position, last)
        cache.done.index_put_((kv_heads,), position + 1)
        dims = _head_dims(queries, D)
        out = kernels.rows(query, dims, h)  # (B, kept query heads · D)
        if self.family.rotary:
            out = self.family.rotate(self.model, layer, "query", out.view(-1, 1, D), position.view(1)).view(B, -1)
        out = out * self.family.scaling(layer)
        groups = queries // shape.group_size
        out = torch.stack([kernels.attend(out[b], *cache.request(b), groups, D, last + 1) for b in range(B)])
        for group in self.groups_at.get(index, []):
            feature = h.new_zeros(B, output.in_features).index_copy_(1, dims, out)
            self._predict(group, feature, kept)
        if known is None:  # every head was computed: the output reads those the mask now keeps
            queries = kept[index].queries.to(device)
            dims, out = _head_dims(queries, D), out.view(B, -1, D).index_select(1, queries).flatten(1)
        return kernels.columns(output, dims, out)

    def _rotate_new_keys(self, layer: nn.Module, cache: _LayerCache, kv_heads: Tensor, first: Tensor,
                         position: Tensor, last: int | Tensor) -> None:
        """Rotate the keys just written, positions [first[i], position] of each head ``kv_heads[i]`` in every
        request, in place. Every first[i] is past the prompt, so the span from there to ``last`` (the whole cache
        in a static step) is rotated where written: its length the host knows."""
        D, B = self.shape.head_dim, cache.requests
        store = cache.keys.view(-1, D, B, cache.keys.shape[1] // B)
        end = store.shape[-1] if isinstance(last, Tensor) else last + 1
        span = store[kv_heads, :, :, cache.prompt:end].permute(0, 2, 3, 1).flatten(0, 1)  # (heads·B, T, D)
        positions = torch.arange(cache.prompt, end, device=span.device)
        rotated = self.family.rotate(self.model, layer, "key", span, positions)
        wanted = ((positions[None] >= first.repeat_interleave(B)[:, None]) & (positions <= position))[..., None]
        store[kv_heads, :, :, cache.prompt:end] = (torch.where(wanted, rotated, span)
                                                    .unflatten(0, (len(kv_heads), B)).permute(0, 3, 1, 2))


class TokenDecoder(_UnitDecoder):
    """Greedy decoding with per-token masks, reading only the kept units' weights at each step.

    The prompt runs densely. At every decoding step the predictor runs where its features appear: ShadowLLM's once,
    on layer 0's attention output; DejaVu-style ones at every layer (with ``lookahead``, layer l's reads layer l −
    1's). A layer whose mask is not yet known when it starts computes all its heads. Its features are its output
    projection's input, pruned heads zeroed. Keys and values of a head at positions where it was pruned are computed
    when it is next kept, from the cached attention input, so each head attends to exactly the keys and values of
    the masked model, whose pruned heads still write their cache.

    A batch of B prompts of one length decodes together: each layer keeps the union of the units the requests'
    masks keep, so every kept weight is read once for the batch, and each request's output is the masked model's
    under that union mask. The union grows with B (B = 8 untrained predictors keep nearly every unit), which is
    how per-token sparsity's gain shrinks with batch size.

    A step reads nothing back from the device (with the compiled or Triton kernels; torch's sparse kernels size
    their patterns on the host): tokens stay on the device until the end, and the kept units' indices come from a
    sort of the mask with lengths the host knows. Under a local policy it knows them in advance; under a global or
    hybrid one they depend on the scores, so each predictor run reads its layers' counts once (one read per token
    for ShadowLLM's single predictor). With query-head units and grouped-query attention, how many key-value groups
    the kept query heads fall in varies too: under a local policy the step computes the keys and values of as many
    groups as it keeps query heads (at most all), the groups in use first, which is correct for any extra group.

    A static step launches the same kernels with the same arguments at every position: the position is a device
    tensor the kernels read, the row gathers that fill the KV cache launch over its whole length (programs past the
    position return at once) and rotary keys are rotated over it. On CUDA a static step is captured once as a CUDA
    graph and replayed for every later token, which removes the launch overhead of its hundreds of small kernels.
    That needs the kept counts known in advance (a local policy, a batch of one: a batch's union varies), the
    Triton kernels, and the model and predictor on one GPU with nothing offloaded; under a global or hybrid policy
    the step runs eagerly, its launches sized by the position.
    """

    def __init__(self, model: nn.Module, predictor: Predictor, policy: Policy, static: bool | None = None):
        """``predictor.shape`` says the attention unit its head masks address. ``static``: run static steps (see
        the class), captured as CUDA graphs on CUDA, run as they are elsewhere (that is how the tests check them on
        the CPU); by default, wherever a CUDA graph can capture them."""
        if len(predictor.groups) > 1 and policy.name != "local":
            raise ValueError(f"policy={policy.name}: per-token execution selects each layer's units when its own "
                             "predictor runs, so only policy=local applies to per-layer predictors")
        for feature_layer, targets in predictor.groups:
            if min(targets) < feature_layer:
                raise ValueError(f"predictor.layer={feature_layer}: per-token execution needs every layer's mask "
                                 f"before the layer runs, and layer {min(targets)} runs first; use layer=0")
        super().__init__(model, predictor.shape, static)
        self.predictor, self.policy = predictor, policy
        self.groups_at = {layer: [g for g, (f, _) in enumerate(predictor.groups) if f == layer]
                          for layer in predictor.feature_layers}

    def _step_kept(self) -> dict[int, _Kept]:
        return {}

    def _other_devices(self) -> set[str]:
        return {str(self.predictor.device)}

    def _varying(self, requests: int) -> str | None:
        if self.policy.name != "local":
            return f"under policy={self.policy.name} the scores decide how many units a layer keeps; use policy=local"
        if requests > 1:
            return f"a batch of {requests} keeps the union of its masks, of varying size; decode one request at a time"
        return None

    def _predict(self, group: int, feature: Tensor, kept: dict[int, _Kept]) -> None:
        """Run one predictor on the batch's (B, E) features and select its target layers' units: the union of
        the requests' masks."""
        targets = self.predictor.groups[group][1]
        policy = replace(self.policy, dense_first_layer=self.policy.dense_first_layer and targets[0] == 0)
        masks = policy.select(*self.predictor.group_scores(group, feature.to(self.predictor.device)))
        n = len(targets)
        head_counts = policy.kept_counts(n, self.shape.heads, policy.head_sparsity) if len(feature) == 1 else None
        counts = None if head_counts is None else (
            head_counts, policy.kept_counts(n, self.shape.neurons, policy.neuron_sparsity))
        # a batch keeps the union of its requests' masks, whose size the scores decide
        sets = _kept_sets(self.shape, masks.heads.any(0), masks.neurons.any(0), counts)
        kept.update(zip(targets, sets, strict=True))


class RequestDecoder(_UnitDecoder):
    """Greedy decoding with one mask per request, chosen before the prompt runs (ShadowLLM's or DejaVu-style
    predictors' per-request masks, or a fixed one): the prompt runs on ``pruned``'s smaller layers, then every step
    reads only the kept units' weights in place with ``TokenDecoder``'s step, without predictors and with the same
    units at every step: the bytes of the smaller layers, without Hugging Face's per-step work. Its steps are
    static, batches too, so on CUDA one is captured as a CUDA graph and replayed (with the Triton kernels, the
    model on one GPU).

    A batch keeps the union of its requests' masks, in the prompt and at every step: each request's output is the
    masked model's under that union mask."""

    def __init__(self, model: nn.Module, shape: Shape, static: bool | None = None):
        """``shape`` says the attention unit the masks address; ``static`` as for ``TokenDecoder``."""
        super().__init__(model, shape, static)
        self.union: Masks | None = None
        self.kept: dict[int, _Kept] = {}

    def generate(self, input_ids: Tensor, new_tokens: int, masks: Masks | None = None) -> Generation:
        """Greedily continue a batch of (B, T) prompts by ``new_tokens`` tokens under ``masks``: heads (B or 1, L,
        H) and neurons (B or 1, L, F) in ``shape``'s units."""
        layers, shape = len(self.layers), self.shape
        if (masks is None or masks.heads.dim() != 3 or masks.heads.shape[1:] != (layers, shape.heads)
                or masks.neurons.shape[1:] != (layers, shape.neurons)
                or {masks.heads.shape[0], masks.neurons.shape[0]} - {1, len(input_ids)}):
            got = "none" if masks is None else f"heads {tuple(masks.heads.shape)}, neurons {tuple(masks.neurons.shape)}"
            raise ValueError(f"RequestDecoder.generate takes each request's masks, heads (B or 1, {layers}, "
                             f"{shape.heads}) and neurons (B or 1, {layers}, {shape.neurons}) for B = "
                             f"{len(input_ids)} prompts; got {got}")
        self.union = Masks(masks.heads.bool().any(0, keepdim=True), masks.neurons.bool().any(0, keepdim=True))
        device = input_device(self.model)
        # one read of the kept counts per generation; the steps then know every size in advance
        sets = _kept_sets(shape, self.union.heads[0].to(device), self.union.neurons[0].to(device), None)
        self.kept = dict(enumerate(sets))
        return super().generate(input_ids, new_tokens)

    def _step_kept(self) -> dict[int, _Kept]:
        return dict(self.kept)

    def _prompt(self, input_ids: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """The prompt on the smaller layers of ``pruned`` (the kept key-value groups' cache rows), its cache then
        laid out for every group, as the steps address it."""
        with pruned(self.model, self.union, self.shape):
            logits, kept_cache = super()._prompt(input_ids)
        full_cache = []
        for index, (keys, values) in enumerate(kept_cache):
            groups = _pruned_groups(self.shape, self.union.heads[0, index])[1].to(keys.device)
            keys, values = (x.new_zeros(x.shape[0], self.shape.kv_heads, *x.shape[2:]).index_copy_(1, groups, x)
                            for x in (keys, values))
            full_cache.append((keys, values))
        return logits, full_cache


class ThresholdDecoder(_Decoder):
    """Greedy decoding under TEAL's or CATS' thresholds (``shadow.thresholds``), each step reading only the weights
    of the channels it keeps. The prompt runs under the thresholds too, so the generation is the thresholded
    model's.

    At each step TEAL zeroes each site's entries below its threshold and reads only the kept channels' columns of
    the projections the site feeds (all of them stored transposed). CATS computes the FFN input projection (gate;
    OPT's up) whole, zeroes the activations below its threshold and reads only the kept units' up rows and down
    columns; its attention is dense. Every head is computed at every step.

    A batch zeroes each request's own small entries and reads, per site, the columns of the channels any of its
    requests keeps. How many a step keeps is known only once it has thresholded: each site reads its count back
    (on CUDA a host sync per site and layer), so the steps are not static and not captured as CUDA graphs."""

    def __init__(self, model: nn.Module, method: str, thresholds: Tensor):
        """``thresholds``: (sites, L), as ``Histograms.thresholds`` gives them for ``method`` (teal or cats)."""
        super().__init__(model)
        self.method, self.sites = method, sites(model, method)
        if thresholds.shape != (len(self.sites), len(self.layers)):
            raise ValueError(f"thresholds of shape {tuple(thresholds.shape)} for method={method}; it has "
                             f"{len(self.sites)} sites in each of {len(self.layers)} layers: calibrate them with "
                             "shadow.thresholds.calibrate on this model")
        self.thresholds, self.site = thresholds, site_index(model, method)
        self.shape = self.family.shape(model.config, "query_head")

    def _column_roles(self) -> tuple[str, ...]:
        if self.method == "teal":
            return tuple(role for site in self.sites for role in site.roles)
        return self.family.neuron_columns

    def _prompt(self, input_ids: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        with thresholded(self.model, self.method, self.thresholds):
            return super()._prompt(input_ids)

    def _applied(self, steps: list[Tensor]) -> dict:
        return {"kept": torch.stack(steps) if steps else torch.zeros(0, *self.thresholds.shape)}

    def weights_read(self, generation: Generation) -> float:
        return weights_read(self.model, *reads(self.model, self.method, generation.kept.mean(0)))

    def _kept(self, site: str, index: int, x: Tensor, read: Tensor) -> tuple[Tensor, Tensor]:
        """A site's (B, channels) entries with those below its threshold zeroed, as (B, kept) on the channels some
        request keeps, and those channels; their share goes to ``read``."""
        s = self.site[site]
        keep = x.abs() >= self.thresholds[s, index].to(x.device, x.dtype)
        channels = keep.any(0).nonzero().flatten()
        read[s, index] = len(channels) / x.shape[1]
        return (x * keep).index_select(1, channels), channels

    def _project(self, role: str, index: int, x: Tensor, read: Tensor) -> Tensor:
        """Projection ``role`` of layer ``index`` on the (B, channels) ``x``: under TEAL the columns of the channels
        its threshold keeps; otherwise dense."""
        module = self.family.module(self.layers[index], role)
        if self.method != "teal":
            return module(x)
        kept, channels = self._kept(role, index, x, read)
        return kernels.columns(module, channels, kept)

    def _step(self, tokens: Tensor, position: Tensor, last: int | Tensor, caches: list[_LayerCache]
              ) -> tuple[Tensor, Tensor]:
        read = torch.ones(self.thresholds.shape)  # on the host: each site's count is read back anyway

        def attention(index: int, h: Tensor) -> Tensor:
            return self._attention(index, h, position, last, caches[index], read)

        def ffn(index: int, h: Tensor) -> Tensor:
            layer, activation = self.layers[index], self.activations[index]
            if self.method == "cats":
                activations, units = self._kept("activation", index, activation(self.family.ffn_input(layer)(h)),
                                                read)
                return _gated_down(self.family, layer, h, units, activations)
            inner = activation(self._project("gate" if self.family.gated else "up", index, h, read))
            if self.family.gated:
                inner = inner * self._project("up", index, h, read)
            return self._project("down", index, inner, read)

        logits = self.family.decode_step(self.model, tokens, position, attention, ffn,
                                         lambda index: self.fetch[index](self.layers[index]))
        return logits, read

    def _attention(self, index: int, h: Tensor, position: Tensor, last: int, cache: _LayerCache, read: Tensor
                   ) -> Tensor:
        """One position's attention output after the output projection, (B, E), every head computed: its key and
        value written to the cache at ``position``."""
        layer, shape, B = self.layers[index], self.shape, cache.requests
        D = shape.head_dim
        position = position.to(h.device)  # a no-op but across the GPUs of a split model
        keys, values = self._project("key", index, h, read), self._project("value", index, h, read)
        if self.family.rotary:
            keys = self.family.rotate(self.model, layer, "key", keys.view(-1, 1, D), position.view(1)).view(B, -1)
        for store, new in ((cache.keys, keys), (cache.values, values)):
            store.view(store.shape[0], B, -1).index_copy_(2, position.view(1), new.t()[..., None].to(store.dtype))
        queries = self._project("query", index, h, read)
        if self.family.rotary:
            queries = self.family.rotate(self.model, layer, "query", queries.view(-1, 1, D), position.view(1))
        queries = queries.reshape(B, -1) * self.family.scaling(layer)
        groups = torch.arange(shape.query_heads, device=h.device) // shape.group_size
        out = torch.stack([kernels.attend(queries[b], *cache.request(b), groups, D, last + 1) for b in range(B)])
        return self._project("output", index, out, read)
