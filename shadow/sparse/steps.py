"""Decoding steps: one token per request through the model family's ``decode_step``, each layer's attention and FFN
reading only the weights of what the step keeps, in place, through the gather kernels of ``shadow.kernels``: the
kept rows (query, key, value, gate, up) and the kept columns (output, down: stored transposed while decoding, see
``loop.stored_transposed``). Copying the kept weights at every step would cost more than the dense product."""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn

from shadow import kernels
from shadow.arch import Shape, family_of
from shadow.offload import input_device, offloaded, resident
from shadow.policy import Masks
from shadow.sparse.kept import FixedUnits, PredictedUnits, ThresholdedChannels, UnitSet
from shadow.sparse.loop import LayerCache
from shadow.thresholds import INPUT_SITES


class ModelParts:
    """The parts of a model a step calls directly, looked up once: its family, layers, their FFN activations,
    and how to bring each layer's weights to where they run (offloaded layers)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = family_of(model.config)
        self.layers = self.family.layers(model)
        self.activations = [layer.get_submodule(self.family.activation_path) for layer in self.layers]
        self.silu = [kernels.is_silu(activation) for activation in self.activations]
        self.fetchers = [resident if offloaded(layer) else nullcontext for layer in self.layers]

    def modules(self, roles: tuple[str, ...]) -> list[nn.Linear]:
        """Every layer's projections of these roles."""
        return [self.family.module(layer, role) for layer in self.layers for role in roles]

    def fetch(self, index: int) -> AbstractContextManager:
        return self.fetchers[index](self.layers[index])

    def decode_step(self, tokens: Tensor, position: Tensor, attention: Callable[[int, Tensor], Tensor],
                    ffn: Callable[[int, Tensor], Tensor]) -> Tensor:
        return self.family.decode_step(self.model, tokens, position, attention, ffn, self.fetch)


def capture_blocker(parts: ModelParts, other_devices: set[str], varying: str | None) -> str | None:
    """Why a CUDA graph cannot capture a step of this model that also runs on ``other_devices`` and whose sizes
    vary for the reason ``varying`` (None: they are known in advance), or None."""
    devices = {str(p.device) for p in parts.model.parameters()} | other_devices
    if len(devices) > 1:
        return f"the weights lie on {', '.join(sorted(devices))}; put them on one GPU, not offloaded"
    if varying is not None:
        return varying
    if not getattr(kernels.backend(parts.family.module(parts.layers[0], "query").weight), "positions_on_device",
                   False):
        return "the Triton kernels are not in use; install triton and leave SHADOW_GATHER unset"
    return None


def decide_static(parts: ModelParts, asked: bool | None, blocker: Callable[[], str | None]) -> bool:
    """Whether a generation's steps are static (the same launches at every position, which read it from a device
    tensor): as ``asked``, or by default where a CUDA graph can capture them, on CUDA with no ``blocker``; an error
    where it was asked on CUDA and cannot."""
    cuda = input_device(parts.model).type == "cuda"
    reason = blocker() if cuda else "the model is not on CUDA"
    if asked is None:
        return reason is None
    if asked and cuda and reason is not None:
        raise ValueError(f"static=True: a CUDA graph cannot capture this decoding step: {reason}; use "
                         "static=None to decide by itself")
    return asked


@functools.cache
def every_one(count: int, device: torch.device) -> Tensor:
    """Indices [0, count) on ``device``, made once (a step reuses them, and a CUDA graph replays them)."""
    return torch.arange(count, device=device)


def write_keys_values(parts: ModelParts, shape: Shape, index: int, h: Tensor, position: Tensor, last: int | Tensor,
                      cache: LayerCache, project: Callable[[str, Tensor], Tensor]) -> None:
    """Every key-value head's key and value at ``position`` (``last``, as the launches take it) for the batch's (B,
    E) inputs, each projection by ``project(role, x)``, written to the cache, the keys rotated: in place in one
    launch where the kernels rotate keys so (Triton's, as for the kept heads), else by torch before writing."""
    family, layer, D, B = parts.family, parts.layers[index], shape.head_dim, cache.requests
    keys = project("key", h)
    in_place = family.rotary and kernels.rotates_keys_in_place(cache.keys)
    if family.rotary and not in_place:
        keys = family.rotate(parts.model, layer, "key", keys.view(-1, 1, D), position.view(1), cache.rotary)
    for store, new in ((cache.keys, keys.reshape(B, -1)), (cache.values, project("value", h))):
        store.view(store.shape[0], B, -1).index_copy_(2, position.view(1), new.t()[..., None].to(store.dtype))
    if in_place:
        heads = every_one(shape.kv_heads, h.device)
        kernels.rotate_keys(cache.keys, heads, position.expand(shape.kv_heads), last, cache.rotary, D, B,
                            cache.prompt, family.head_norm(layer, "key"))


def attend(parts: ModelParts, shape: Shape, index: int, queries: Tensor, heads: Tensor, last: int | Tensor,
           cache: LayerCache) -> Tensor:
    """The attention of the query heads ``heads`` at position ``last`` over the cache, (B, len(heads) · head_dim),
    from their (B, len(heads) · head_dim) projections: rotated, scaled, each over its key-value group's cache rows,
    positions up to ``last``."""
    family, layer = parts.family, parts.layers[index]
    table = cache.rotary if family.rotary else None
    return kernels.attend_queries(queries, cache.keys, cache.values, heads, shape.group_size, shape.head_dim, last,
                                  cache.requests, family.scaling(layer), table, family.head_norm(layer, "query"))


def every_head(parts: ModelParts, shape: Shape, index: int, h: Tensor, position: Tensor, last: int | Tensor,
               cache: LayerCache, project: Callable[[str, Tensor], Tensor]) -> Tensor:
    """One position's attention output after the output projection, (B, E) for the batch's (B, E) inputs, every
    head computed, each projection by ``project(role, x)``: the key and value written to the cache at
    ``position``."""
    position = position.to(h.device)  # a no-op but across the GPUs of a split model
    write_keys_values(parts, shape, index, h, position, last, cache, project)
    every = every_one(shape.query_heads, h.device)
    return project("output", attend(parts, shape, index, project("query", h), every, last, cache))


def dense_ffn(parts: ModelParts, index: int, h: Tensor) -> Tensor:
    """A layer's whole FFN on the batch's (B, E) inputs, through its own projections (cuBLAS on CUDA)."""
    family, layer = parts.family, parts.layers[index]
    inner = parts.activations[index](family.ffn_input(layer)(h))
    if family.gated:
        inner = inner * family.module(layer, "up")(h)
    return family.ffn_output(layer)(inner)


class UnitStep:
    """A step under masks of heads and FFN units (in ``shape``'s units), fixed for the generation or predicted at
    every token: its attention and FFN read only the kept units' weights, and nothing is read back from the
    device. A layer a fixed mask keeps whole runs its own dense products (cuBLAS on CUDA): with every unit kept,
    this is the same engine's dense step, the anchor the sparse steps are timed against. A layer whose units are
    not yet known when it starts computes all its heads (its features feed a predictor). Keys and values of a
    head at positions where it was pruned are computed when it is next kept, from the cached attention input, so
    each head attends to exactly the keys and values of the masked model, whose pruned heads still write their
    cache."""

    def __init__(self, parts: ModelParts, shape: Shape, units: FixedUnits | PredictedUnits,
                 dense_key_values: bool = False):
        """``dense_key_values``: every key-value head's key and value at every step, by the dense projections
        (cuBLAS on CUDA), instead of the kept heads' with catch-up; the outputs are the same (the masked model's
        pruned heads write their cache too), the reads are not."""
        self.parts, self.shape, self.units, self.dense_key_values = parts, shape, units, dense_key_values

    @staticmethod
    def column_modules(parts: ModelParts) -> list[nn.Linear]:
        """The projections a unit step reads by columns: the attention output's and the FFN output's."""
        return parts.modules(parts.family.head_columns + parts.family.neuron_columns)

    def static(self, requests: int, asked: bool | None) -> bool:
        """Whether a generation of ``requests``' steps are static (see ``decide_static``)."""
        return decide_static(self.parts, asked, lambda: self.capture_blocker(requests))

    def capture_blocker(self, requests: int) -> str | None:
        """Why a CUDA graph cannot capture this step for a batch of ``requests``, or None."""
        return capture_blocker(self.parts, self.units.devices(), self.units.varying(requests))

    def __call__(self, tokens: Tensor, position: Tensor, last: int | Tensor, caches: list[LayerCache]
                 ) -> tuple[Tensor, Masks]:
        """One token per request at ``position`` (a 0-d device tensor): the (B, V) logits and the masks applied."""
        kept = self.units.at_step()  # predictors running in the step add theirs
        family, layers = self.parts.family, self.parts.layers

        def attention(index: int, h: Tensor) -> Tensor:
            return self.attention(index, h, position, last, caches[index], kept)

        def ffn(index: int, h: Tensor) -> Tensor:
            if kept[index].whole:
                return dense_ffn(self.parts, index, h)
            layer, units = layers[index], kept[index].units.to(h.device)
            activation = self.parts.activations[index]
            if family.gated:
                inner = kernels.gated_rows(family.ffn_input(layer), family.module(layer, "up"), units, h, activation,
                                           self.parts.silu[index])
            else:
                inner = activation(kernels.rows(family.ffn_input(layer), units, h))
            return kernels.columns(family.ffn_output(layer), units, inner)

        logits = self.parts.decode_step(tokens, position, attention, ffn)
        return logits, Masks(torch.stack([kept[i].heads.to(logits.device) for i in range(len(layers))]),
                             torch.stack([kept[i].neurons.to(logits.device) for i in range(len(layers))]))

    def attention(self, index: int, h: Tensor, position: Tensor, last: int | Tensor, cache: LayerCache,
                  kept: dict[int, UnitSet]) -> Tensor:
        """One position's attention output after the output projection, (B, E) for the batch's (B, E) inputs, over
        the kept heads (all of them when the layer's units are not known yet); runs the predictors that read this
        layer. Query heads read their group's key-value head, whose keys and values are computed first (for more
        groups, see ``unit_sets``)."""
        family, layer = self.parts.family, self.parts.layers[index]
        query, key, value, output = (family.module(layer, role) for role in ("query", "key", "value", "output"))
        shape, D, device, B = self.shape, self.shape.head_dim, h.device, cache.requests
        known = kept.get(index)
        def dense(role: str, x: Tensor) -> Tensor:
            return family.module(layer, role)(x)

        if known is not None and known.whole:  # kept whole for the generation: no catch-up, dense products
            return every_head(self.parts, shape, index, h, position, last, cache, dense)
        if known is not None:
            queries, kv_heads = known.queries.to(device), known.kv_heads.to(device)
        else:
            queries, kv_heads = every_one(shape.query_heads, device), every_one(shape.kv_heads, device)
        position = position.to(device)  # a no-op but across the GPUs of a split model
        last = position if isinstance(last, Tensor) else last
        if self.dense_key_values:
            write_keys_values(self.parts, shape, index, h, position, last, cache, dense)
        else:
            cache.inputs.view(B, -1, h.shape[1]).index_copy_(1, position.view(1), h[:, None])
            first = cache.done[kv_heads]  # a head kept again catches up on skipped positions
            kernels.rows_into_pair(cache.keys, key, cache.values, value, kv_heads, cache.inputs, first, last, B, D)
            if family.rotary:  # the keys just written, as attention reads them
                kernels.rotate_keys(cache.keys, kv_heads, first, last, cache.rotary, D, B, cache.prompt,
                                    family.head_norm(layer, "key"))
            cache.done.index_put_((kv_heads,), position + 1)
        out = attend(self.parts, shape, index, kernels.rows(query, queries, h, D), queries, last, cache)
        if index in self.units.feature_layers:
            features = h.new_zeros(B, output.in_features).index_copy_(1, kernels.unit_rows(queries, D), out)
            self.units.predict(index, features, kept)
        if known is None:  # every head was computed: the output reads those the mask now keeps
            queries = kept[index].queries.to(device)
            out = out.view(B, -1, D).index_select(1, queries).flatten(1)
        return kernels.columns(output, queries, out, D)


class ThresholdStep:
    """A step under TEAL's, WINA's or CATS' thresholds. TEAL zeroes each site's entries below its threshold (WINA:
    those whose magnitude times their weight column's norm is below it) and reads only
    the kept channels' columns of the projections the site feeds (all of them stored transposed). CATS computes
    the FFN input projection (gate; OPT's up) whole, zeroes the activations below its threshold and reads only the
    kept units' up rows and down columns; its attention is dense. Every head is computed at every step. A batch
    zeroes each request's own small entries and reads, per site, the columns of the channels any request keeps.
    With Triton's kernels the products test their inputs themselves, on grids over every channel, and the shares
    kept are summed on the device: nothing is read back, so the step is static, batches too, and on CUDA captured
    as a CUDA graph. The compiled kernel reads the kept channels' indices on the host (free on the CPU)."""

    def __init__(self, parts: ModelParts, channels: ThresholdedChannels):
        self.parts, self.channels = parts, channels
        self.shape = parts.family.shape(parts.model.config, "query_head")

    def column_modules(self) -> list[nn.Linear]:
        """The projections this step reads by columns: every site's under TEAL, the FFN output's under CATS."""
        if self.channels.method in INPUT_SITES:
            return self.parts.modules(tuple(role for site in self.channels.sites for role in site.roles))
        return self.parts.modules(self.parts.family.neuron_columns)

    def static(self, requests: int, asked: bool | None) -> bool:
        """Whether a generation's steps are static (see ``decide_static``): their sizes never vary."""
        return decide_static(self.parts, asked, lambda: capture_blocker(self.parts, set(), None))

    def project(self, role: str, index: int, x: Tensor, read: Tensor) -> Tensor:
        """Projection ``role`` of layer ``index`` on the (B, channels) ``x``: under TEAL the columns of the channels
        its threshold keeps; otherwise dense."""
        module = self.parts.family.module(self.parts.layers[index], role)
        if self.channels.method not in INPUT_SITES:
            return module(x)
        return kernels.columns_nonzero(module, self.channels.keep(role, index, x, read)[0])

    def __call__(self, tokens: Tensor, position: Tensor, last: int | Tensor, caches: list[LayerCache]
                 ) -> tuple[Tensor, Tensor]:
        """One token per request: the (B, V) logits and each (site, layer)'s share of channels read."""
        read = torch.ones(self.channels.thresholds.shape, device=tokens.device)
        family = self.parts.family

        def attention(index: int, h: Tensor) -> Tensor:
            return self.attention(index, h, position, last, caches[index], read)

        def ffn(index: int, h: Tensor) -> Tensor:
            layer, activation = self.parts.layers[index], self.parts.activations[index]
            if self.channels.method == "cats":
                activations, units = self.channels.keep("activation", index, activation(family.ffn_input(layer)(h)),
                                                        read)
                if family.gated:
                    activations = activations * kernels.rows_where(family.module(layer, "up"), units, h)
                return kernels.columns_nonzero(family.ffn_output(layer), activations)
            inner = activation(self.project("gate" if family.gated else "up", index, h, read))
            if family.gated:
                inner = inner * self.project("up", index, h, read)
            return self.project("down", index, inner, read)

        return self.parts.decode_step(tokens, position, attention, ffn), read

    def attention(self, index: int, h: Tensor, position: Tensor, last: int | Tensor, cache: LayerCache,
                  read: Tensor) -> Tensor:
        """One position's attention output after the output projection, (B, E), every head computed."""
        return every_head(self.parts, self.shape, index, h, position, last, cache,
                          lambda role, x: self.project(role, index, x, read))
