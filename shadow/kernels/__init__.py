"""Gather kernels for per-token sparse decoding: matrix-vector products that read only the kept rows of a weight,
in place (no copy of the kept weights is made).

Three backends with one meaning, checked against each other by the tests:
- ``gather.cpp``, compiled on first use by torch's C++ extension loader (needs a C++ compiler; the build is
  cached under ``$TORCH_EXTENSIONS_DIR``), for float32 on the CPU;
- ``TritonGather`` (``triton_gather.py``), for CUDA tensors in float32, float16 and bfloat16, where triton is
  installed (torch's CUDA wheels bring it on Linux);
- ``TorchGather``, torch's own sparse kernels (``sampled_addmm`` computes just the wanted entries of a product,
  ``embedding_bag`` sums just the wanted rows), for other devices and dtypes, when neither of the others is
  available (a warning says why) and when ``SHADOW_GATHER=torch``. ``sampled_addmm`` has no float16/bfloat16
  kernel, so in half precision the kept rows are gathered and multiplied (correct, not fast).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
SOURCE = Path(__file__).with_name("gather.cpp")
COLUMN_BAGS = 8  # embedding_bag runs one bag per thread


class TorchGather:
    """The gather kernels in torch's sparse operations: any device and dtype torch supports."""

    @staticmethod
    def rows_into(out: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor, inputs: Tensor, first: Tensor,
                  last: int, requests: int = 1) -> None:
        """``out[index[i], b·span + p] = weight[index[i]] · inputs[b·span + p] + bias[index[i]]`` for p in
        [first[i], last], for each of the ``requests`` spans of ``out``'s columns and ``inputs``' rows (one per
        request of a batch); ``index`` sorted. Computes only those entries: a CSR pattern of them per request,
        filled by ``sampled_addmm``; in half precision, which ``sampled_addmm`` lacks, the kept rows' products over
        the positions from the earliest first."""
        span = out.shape[1] // requests
        for b in range(requests):
            out_b, inputs_b = out[:, b * span:(b + 1) * span], inputs[b * span:(b + 1) * span]
            if weight.dtype in (torch.float16, torch.bfloat16):
                TorchGather._rows_into_span(out_b, weight, bias, index, inputs_b, first, last)
            else:
                TorchGather._rows_into_sampled(out_b, weight, bias, index, inputs_b, first, last)

    @staticmethod
    def _rows_into_sampled(out: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor, inputs: Tensor,
                           first: Tensor, last: int) -> None:
        counts = (last + 1 - first.clamp(min=0)).clamp(min=0)
        crow = torch.zeros(out.shape[0] + 1, dtype=torch.long, device=out.device)
        crow[index + 1] = counts
        starts = counts.cumsum(0) - counts
        total = int(counts.sum())
        position = (torch.arange(total, device=out.device) - starts.repeat_interleave(counts, output_size=total)
                    + first.clamp(min=0).repeat_interleave(counts, output_size=total))
        row = index.repeat_interleave(counts, output_size=total)
        values = bias[row] if bias is not None else out.new_zeros(total)
        pattern = torch.sparse_csr_tensor(crow.cumsum(0), position, values, size=out.shape, check_invariants=False)
        out[row, position] = torch.sparse.sampled_addmm(pattern, weight, inputs[:out.shape[1]].t()).values()

    @staticmethod
    def _rows_into_span(out: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor, inputs: Tensor,
                        first: Tensor, last: int) -> None:
        first = first.clamp(min=0)
        start = int(first.min()) if len(index) else last + 1
        if start > last:
            return
        products = nn.functional.linear(inputs[start:last + 1], weight[index],
                                        None if bias is None else bias[index]).t()  # (kept, span)
        wanted = torch.arange(start, last + 1, device=out.device)[None] >= first[:, None]
        out[index, start:last + 1] = torch.where(wanted, products, out[index, start:last + 1])

    @staticmethod
    def rows(weight: Tensor, bias: Tensor | None, index: Tensor, x: Tensor) -> Tensor:
        """``(x @ weightᵀ + bias)[:, index]`` for a batch x (B, in), computing only those rows: the batch is the
        positions of ``rows_into``."""
        out = x.new_empty(weight.shape[0], x.shape[0])
        TorchGather.rows_into(out, weight, bias, index, x, torch.zeros_like(index), x.shape[0] - 1)
        return out[index].t().contiguous()

    @staticmethod
    def columns(weight_t: Tensor, bias: Tensor | None, index: Tensor, scale: Tensor) -> Tensor:
        """``bias + Σ_i scale[:, i] · weight_t[index[i]]`` for a batch of scales (B, kept): the columns ``index`` of
        W = weight_tᵀ times each request's scale, a weighted sum of those rows by ``embedding_bag``, each request's
        split into bags so that every thread takes a share."""
        batch, kept = scale.shape
        bags = torch.arange(COLUMN_BAGS, device=index.device) * kept // COLUMN_BAGS
        offsets = (torch.arange(batch, device=index.device)[:, None] * kept + bags).flatten()
        out = nn.functional.embedding_bag(index.repeat(batch), weight_t, offsets, mode="sum",
                                          per_sample_weights=scale.flatten()).view(batch, COLUMN_BAGS, -1).sum(1)
        return out if bias is None else out + bias

    @staticmethod
    def rows_where(weight: Tensor, bias: Tensor | None, keep: Tensor, x: Tensor) -> Tensor:
        """``x @ weightᵀ + bias`` for a batch x (B, in), the rows where ``keep`` (out,) is False set to 0: every row
        computed (torch has no product that skips rows by a mask without reading it on the host), nothing read
        back."""
        return nn.functional.linear(x, weight, bias) * keep

    @staticmethod
    def columns_nonzero(weight_t: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
        """``bias + x @ weight_t`` for a batch x (B, in): the whole product, whose zero entries add nothing; nothing
        read back."""
        out = x @ weight_t
        return out if bias is None else out + bias

    @staticmethod
    def rotate_keys(keys: Tensor, heads: Tensor, first: Tensor, last: int | Tensor, table: Tensor, head_dim: int,
                    requests: int, prompt: int, norm: tuple[Tensor, float] | None) -> None:
        """Rotate in place the keys of key-value heads ``heads[i]`` at positions [first[i], last] of every request:
        ``keys`` (H · head_dim, requests · span) with one row per unit, as ``rows_into`` writes them; each key
        RMS-normalised over its head by ``norm`` (weight, epsilon) where given, then rotated by ``table``'s (2,
        span, head_dim) cosines and sines as Llama's rotary embedding pairs dimensions (d with d + head_dim / 2), in
        float32, rounded once. Every first is at least ``prompt``: the span from there to ``last`` (the whole cache
        when ``last`` is a tensor) is rotated where written, a length the host knows."""
        store = keys.view(-1, head_dim, requests, keys.shape[1] // requests)
        end = store.shape[-1] if isinstance(last, Tensor) else last + 1
        span = store[heads, :, :, prompt:end].permute(0, 2, 3, 1)  # (heads, requests, T, head_dim)
        positions = torch.arange(prompt, end, device=keys.device)
        wanted = (positions >= first[:, None, None]) & (positions <= last)  # (heads, 1, T)
        store[heads, :, :, prompt:end] = torch.where(wanted[..., None], rotated(span, *table[:, prompt:end], norm),
                                                     span).permute(0, 3, 1, 2)

    @staticmethod
    def attend(query: Tensor, keys: Tensor, values: Tensor, heads: Tensor, head_dim: int, length: int) -> Tensor:
        """One position's attention output for the kept ``heads``: ``query`` (n · head_dim,) already scaled,
        ``keys`` and ``values`` (H · head_dim, positions) with one row per unit (perhaps column slices of a larger
        store); positions [0, length)."""
        total = keys.shape[0] // head_dim
        keys, values = (store.unflatten(0, (total, head_dim))[heads, :, :length].transpose(1, 2)[None]
                        for store in (keys, values))
        return nn.functional.scaled_dot_product_attention(query.view(1, -1, 1, head_dim), keys, values,
                                                          scale=1.0).flatten()


def rotated(states: Tensor, cos: Tensor, sin: Tensor, norm: tuple[Tensor, float] | None = None) -> Tensor:
    """Llama's rotary embedding of ``states`` (..., head_dim) by ``cos`` and ``sin`` (broadcast to them),
    dimension d paired with d + head_dim / 2, after an RMSNorm over each head by ``norm`` (weight, epsilon) where
    given (Qwen3's head norms): in float32, rounded to ``states``' dtype once, as the Triton kernels compute it."""
    x = states.float()
    if norm is not None:
        weight, eps = norm
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    half = x.shape[-1] // 2
    return (x * cos.float() + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin.float()).to(states.dtype)


@functools.cache
def native() -> ModuleType | None:
    """The compiled CPU kernels, built on first use; None (with a warning) where they cannot be built."""
    if os.environ.get("SHADOW_GATHER") == "torch":
        return None
    try:
        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:  # the ninja wheel's binary, when its venv is not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        log.info("loading shadow's gather kernel (the first load on a machine compiles it: about 30 s)")
        return cpp_extension.load("shadow_gather", [str(SOURCE)], extra_cflags=["-O3", "-fopenmp"], verbose=False)
    except Exception as err:  # no compiler, no headers: the torch kernels give the same results, slower
        warnings.warn(f"shadow's gather kernel could not be built ({str(err).splitlines()[0]}); per-token "
                      "decoding uses torch's sparse kernels instead", stacklevel=2)
        return None


@functools.cache
def triton_kernels() -> type | None:
    """The Triton kernels, for CUDA tensors; None (with a warning) where triton is not installed."""
    if os.environ.get("SHADOW_GATHER") == "torch":
        return None
    try:
        from shadow.kernels.triton_gather import TritonGather
    except ImportError as err:
        warnings.warn(f"triton cannot be imported ({err}); per-token decoding on CUDA uses torch's sparse kernels "
                      "instead", stacklevel=2)
        return None
    return TritonGather


def backend(weight: Tensor) -> ModuleType | type:
    """The kernels for this weight: the compiled ones for float32 on the CPU, Triton's on CUDA, where each is
    available; else torch's."""
    if weight.device.type == "cpu" and weight.dtype == torch.float32:
        return native() or TorchGather
    if weight.device.type == "cuda":
        return triton_kernels() or TorchGather
    return TorchGather


def unit_rows(index: Tensor, unit: int) -> Tensor:
    """The rows of the entries ``index`` that name ``unit`` consecutive rows each (a head's ``head_dim``), in
    order: rows [index[i]·unit, (index[i] + 1)·unit) for each i."""
    return (index[:, None] * unit + torch.arange(unit, device=index.device)).flatten()


def _units(kernels: ModuleType | type, index: Tensor, unit: int, first: Tensor | None = None
           ) -> tuple[Tensor, Tensor | None, dict]:
    """``index`` (and each entry's ``first``) as ``kernels`` take them: Triton's expand each entry's ``unit`` rows
    themselves (``unit`` passed on); the others get the rows (and their firsts)."""
    if getattr(kernels, "units_in_kernel", False):
        return index, first, {"unit": unit}
    if unit == 1:
        return index, first, {}
    return unit_rows(index, unit), None if first is None else first.repeat_interleave(unit), {}


def _on_host(kernels: ModuleType | type, value: int | Tensor) -> int | Tensor:
    """A position as ``kernels`` take it: Triton's read a 0-d device tensor where it is; the others, on the host."""
    return int(value) if isinstance(value, Tensor) and not getattr(kernels, "positions_on_device", False) else value


def rows_into(out: Tensor, linear: nn.Linear, index: Tensor, inputs: Tensor, first: Tensor, last: int | Tensor,
              requests: int = 1, unit: int = 1) -> None:
    """Write ``linear(inputs[p])[index[i]]`` to ``out[index[i], p]`` for p in [first[i], last], reading only the
    rows ``index`` (sorted) of the weight, each once. ``out``: (out_features, positions), ``inputs``: (positions,
    in); with ``requests`` > 1, both hold that many requests' equal spans of positions one after another, and the
    positions are those of each span. ``last`` may be a 0-d tensor on the weight's device: the Triton kernels then
    launch over the whole span whatever its value (a host read for the others). With ``unit`` > 1 each entry of
    ``index`` (and of ``first``) names ``unit`` consecutive rows (``unit_rows``): a head's."""
    kernels = backend(linear.weight)
    index, first, units = _units(kernels, index, unit, first)
    kernels.rows_into(out, linear.weight, linear.bias, index, inputs, first, _on_host(kernels, last), requests,
                      **units)


def rows_into_pair(out: Tensor, linear: nn.Linear, out2: Tensor, linear2: nn.Linear, index: Tensor, inputs: Tensor,
                   first: Tensor, last: int | Tensor, requests: int = 1, unit: int = 1) -> None:
    """``rows_into`` of two projections of one shape at the same rows and positions (a layer's keys and values):
    one pass over the inputs with Triton's kernels, two with the others."""
    kernels = backend(linear.weight)
    if hasattr(kernels, "rows_into_pair") and (linear.bias is None) == (linear2.bias is None):
        index, first, units = _units(kernels, index, unit, first)
        kernels.rows_into_pair(out, linear.weight, linear.bias, out2, linear2.weight, linear2.bias, index, inputs,
                               first, last, requests, **units)
        return
    rows_into(out, linear, index, inputs, first, last, requests, unit)
    rows_into(out2, linear2, index, inputs, first, last, requests, unit)


def rows(linear: nn.Linear, index: Tensor, x: Tensor, unit: int = 1) -> Tensor:
    """``linear(x)[..., rows]`` for a batch (B, in) of inputs, reading only those rows (sorted) of the weight, each
    once for the batch: ``index``, or with ``unit`` > 1 the ``unit`` rows of each of its entries (a head's)."""
    kernels = backend(linear.weight)
    index, _, units = _units(kernels, index, unit)
    return kernels.rows(linear.weight, linear.bias, index, x.contiguous(), **units)


def rotates_keys_in_place(keys: Tensor) -> bool:
    """Whether the kernels for this cache rotate written keys in one launch over just their positions (Triton's);
    elsewhere a step that writes every head's new key is better off rotating it before it writes."""
    return hasattr(backend(keys), "rotate_keys")


def rotate_keys(keys: Tensor, heads: Tensor, first: Tensor, last: int | Tensor, table: Tensor, head_dim: int,
                requests: int, prompt: int, norm: tuple[Tensor, float] | None = None) -> None:
    """Rotate in place the keys just written at positions [first[i], last] of key-value heads ``heads[i]`` (see
    ``TorchGather.rotate_keys``), normalised first by ``norm`` (an RMSNorm's weight and epsilon) where given.
    Triton's kernel reads and writes only those positions, in one launch; the others rotate the span from
    ``prompt``."""
    rotate = getattr(backend(keys), "rotate_keys", TorchGather.rotate_keys)
    rotate(keys, heads, first, last, table, head_dim, requests, prompt, norm)


def attend_queries(queries: Tensor, keys: Tensor, values: Tensor, heads: Tensor, group_size: int, head_dim: int,
                   last: int | Tensor, requests: int, scale: float, table: Tensor | None = None,
                   norm: tuple[Tensor, float] | None = None) -> Tensor:
    """One step's attention output (B, n · head_dim) for the query heads ``heads`` (n,) of a batch's (B, n ·
    head_dim) query projections at position ``last`` (an int, or a 0-d device tensor), over positions [0, last]
    of the caches ``keys`` and ``values`` ((H · head_dim, B · span), each request's span one after another, as
    ``rows_into`` writes them), each head over its key-value head ``heads // group_size``. Each query is first
    normalised by ``norm`` and rotated by ``table``'s row ``last`` (see ``rotated``) where given, then scaled.
    Triton's kernel does it all in one launch; elsewhere torch rotates and scales, then each request attends."""
    kernels = backend(keys)
    if hasattr(kernels, "attend_queries"):
        return kernels.attend_queries(queries, keys, values, heads, group_size, head_dim, last, requests, scale,
                                      table, norm)
    if table is not None:
        queries = rotated(queries.view(requests, -1, head_dim), *table[:, last, None], norm).flatten(1)
    queries, groups, span = queries * scale, heads // group_size, keys.shape[1] // requests
    return torch.stack([kernels.attend(queries[b], keys[:, b * span:(b + 1) * span],
                                       values[:, b * span:(b + 1) * span], groups, head_dim,
                                       _on_host(kernels, last + 1)) for b in range(requests)])


def _transposed(linear: nn.Linear) -> Tensor:
    weight_t = linear.weight.t()
    if not weight_t.is_contiguous():  # a weight fetched from an offload, not stored transposed: one copy
        weight_t = weight_t.contiguous()
    return weight_t


def is_silu(activation: nn.Module) -> bool:
    """Whether an activation module computes SiLU (checked on values: transformers has its own SiLU classes)."""
    probe = torch.linspace(-6, 6, 25)
    return torch.equal(activation(probe), nn.functional.silu(probe))


def gated_rows(gate: nn.Linear, up: nn.Linear, index: Tensor, x: Tensor, activation: nn.Module, silu: bool
               ) -> Tensor:
    """``activation(gate(x)) * up(x)`` at the kept units ``index`` for a batch (B, in): a gated FFN's kept units.
    Triton's kernel reads the gate and up rows of each unit in one pass when the activation is SiLU (``silu``, as
    ``is_silu`` says); otherwise, and on the other backends, two row gathers."""
    kernels = backend(gate.weight)
    if silu and hasattr(kernels, "gated_rows") and (gate.bias is None) == (up.bias is None):
        return kernels.gated_rows(gate.weight, gate.bias, up.weight, up.bias, index, x.contiguous())
    return activation(rows(gate, index, x)) * rows(up, index, x)


def rows_where(linear: nn.Linear, keep: Tensor, x: Tensor) -> Tensor:
    """``linear(x)`` for a batch (B, in), the rows (outputs) where ``keep`` (out,) is False set to 0 and not read
    where the kernels can skip them without the host: Triton's on a grid over every row; the compiled kernel
    (which has no such form) reads the kept rows' indices on the host, free on the CPU."""
    kernels = backend(linear.weight)
    if not hasattr(kernels, "rows_where"):
        index = keep.nonzero().flatten()
        out = x.new_zeros(x.shape[0], linear.out_features)
        return out.index_copy_(1, index, kernels.rows(linear.weight, linear.bias, index, x.contiguous()))
    return kernels.rows_where(linear.weight, linear.bias, keep, x.contiguous())


def columns_nonzero(linear: nn.Linear, x: Tensor) -> Tensor:
    """``linear(x)`` for a batch (B, in), reading only the columns of W where some request's input is not 0 (W
    stored transposed, as for ``columns``): Triton's kernels test the inputs inside the product, on a grid over
    every column, so nothing is read back; the compiled kernel reads the indices of those columns on the host."""
    weight_t = _transposed(linear)
    kernels = backend(weight_t)
    if not hasattr(kernels, "columns_nonzero"):
        index = x.ne(0).any(0).nonzero().flatten()
        return kernels.columns(weight_t, linear.bias, index, x.index_select(1, index).contiguous())
    return kernels.columns_nonzero(weight_t, linear.bias, x.contiguous())


def columns(linear: nn.Linear, index: Tensor, x: Tensor, unit: int = 1) -> Tensor:
    """``x @ W[:, columns]ᵀ + b`` for a batch (B, kept), reading only those columns of W: ``index``, or with
    ``unit`` > 1 the ``unit`` columns of each of its entries (a head's). W is stored transposed (``weight.t()``
    contiguous) so that each column is one contiguous row, read once for the batch."""
    weight_t = _transposed(linear)
    kernels = backend(weight_t)
    index, _, units = _units(kernels, index, unit)
    return kernels.columns(weight_t, linear.bias, index, x.contiguous(), **units)
