"""The gather kernels in Triton, for CUDA in float32, float16 and bfloat16: the same operations and meanings as
``TorchGather``, reading only the kept rows (columns, cache rows) in place and summing in float32. Index sets come
as device tensors and sizes from their shapes, so nothing is read back to the host. The position a row gather
writes up to and an attention's length may come as 0-d device tensors, read by the kernels, so that a step
launches the same kernels with the same arguments at every position (what a CUDA graph replays). The products of
a batch (``rows``, ``columns`` and their fixed-grid forms ``rows_where`` and ``columns_nonzero``) load each weight
tile once for all of the batch's requests; weights are streamed (evicted first), inputs kept in cache.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels run on CPU tensors: that is how the tests
check them without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_POSITIONS = 32  # cached positions per step of attention
MAX_BLOCK_REQUESTS = 8  # requests of a batch whose products share each weight tile's load
TUNING = "SHADOW_AUTOTUNE"  # 0: each kernel's first candidate, untuned


def _candidates(*configs: triton.Config) -> list[triton.Config]:
    """A kernel's launch settings: on CUDA each product shape's fastest, timed at its first call (and cached on
    disk by Triton); the first alone in the interpreter, which has no clock, or with SHADOW_AUTOTUNE=0."""
    tuned = not triton.knobs.runtime.interpret and os.environ.get(TUNING, "1") != "0"
    return list(configs) if tuned else list(configs[:1])


# Row products: BLOCK_R kept rows per program, BLOCK_K inputs per step for one request (a batch of BLOCK_B requests
# takes BLOCK_K // BLOCK_B each step, so that a program's float32 tile stays BLOCK_R × BLOCK_K).
ROWS = [triton.Config({"BLOCK_R": 16, "BLOCK_K": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_R": 8, "BLOCK_K": 256}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_R": 4, "BLOCK_K": 512}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_R": 32, "BLOCK_K": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_R": 16, "BLOCK_K": 256}, num_warps=8, num_stages=3)]
# Column products: BLOCK_N outputs per program, PER_SPLIT kept columns per split of the sum, BLOCK_I of them per
# step for one request (BLOCK_I // BLOCK_B for a batch).
COLUMNS = [triton.Config({"BLOCK_N": 64, "BLOCK_I": 32, "PER_SPLIT": 256}, num_warps=4, num_stages=3),
           triton.Config({"BLOCK_N": 128, "BLOCK_I": 32, "PER_SPLIT": 256}, num_warps=4, num_stages=3),
           triton.Config({"BLOCK_N": 256, "BLOCK_I": 32, "PER_SPLIT": 512}, num_warps=8, num_stages=3),
           triton.Config({"BLOCK_N": 128, "BLOCK_I": 64, "PER_SPLIT": 512}, num_warps=8, num_stages=4),
           triton.Config({"BLOCK_N": 64, "BLOCK_I": 64, "PER_SPLIT": 128}, num_warps=4, num_stages=4)]


def _requests_block(batch: int) -> int:
    return min(triton.next_power_of_2(max(batch, 1)), MAX_BLOCK_REQUESTS)


@functools.cache
def _arrivals(device: torch.device, tiles: int) -> Tensor:
    """A split column sum's arrival counts, one per output tile: zero between launches (the last arrival sets its
    count back), so one set per device and tile count serves every launch, captured ones included, and is kept."""
    return torch.zeros(tiles, dtype=torch.int32, device=device)


@triton.autotune(configs=_candidates(*ROWS), key=["in_features", "PAIRED", "LAST_IN_MEMORY", "BLOCK_B"],
                 cache_results=True)
@triton.jit
def _rows_kernel(out, weight, bias, out2, weight2, bias2, index, inputs, first, last, kept, unit, in_features, span,
                 requests, out_stride, weight_stride, inputs_stride, HAS_BIAS: tl.constexpr, PAIRED: tl.constexpr,
                 LAST_IN_MEMORY: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Program (r, c): kept rows [r·BLOCK_R, (r+1)·BLOCK_R) for requests [c·BLOCK_B, (c+1)·BLOCK_B), at each
    position p from the earliest of their firsts to last (a value, or where it points), for the rows whose first
    <= p (input row and output column b·span + p), each weight tile loaded once for those requests: a grid that
    does not grow with the context, each program looping over the positions its rows catch up on (one, the
    current, unless a row returns after being skipped). PAIRED: the same rows of a second weight (a key's value
    projection) into ``out2``, in the same pass over the inputs. Kept row ``slot`` is row ``slot % unit`` of entry
    ``index[slot // unit]``'s ``unit`` (a head's ``head_dim`` rows), from its entry's first position."""
    block, chunk = tl.program_id(0), tl.program_id(1)
    slot = block * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = slot < kept
    row = tl.load(index + slot // unit, mask=valid, other=0) * unit + slot % unit
    starts = tl.load(first + slot // unit, mask=valid, other=0)
    limit = tl.load(last) if LAST_IN_MEMORY else last
    lowest = tl.maximum(tl.min(tl.where(valid, starts, span), axis=0), 0)
    b = chunk * BLOCK_B + tl.arange(0, BLOCK_B)
    asked = b < requests
    for position in range(lowest, limit + 1):
        column = b * span + position
        wanted = valid & (starts <= position)
        products = tl.zeros([BLOCK_R, BLOCK_B, BLOCK_K // BLOCK_B], dtype=tl.float32)  # reduced once, after
        paired = tl.zeros([BLOCK_R, BLOCK_B, BLOCK_K // BLOCK_B], dtype=tl.float32)
        for start in range(0, in_features, BLOCK_K // BLOCK_B):
            k = start + tl.arange(0, BLOCK_K // BLOCK_B)
            where = row[:, None] * weight_stride + k[None, :]
            loads = wanted[:, None] & (k[None, :] < in_features)
            x = tl.load(inputs + column[:, None] * inputs_stride + k[None, :],
                        mask=asked[:, None] & (k[None, :] < in_features), other=0.0,
                        eviction_policy="evict_last").to(tl.float32)[None, :, :]
            w = tl.load(weight + where, mask=loads, other=0.0, eviction_policy="evict_first")
            products += w.to(tl.float32)[:, None, :] * x
            if PAIRED:
                w2 = tl.load(weight2 + where, mask=loads, other=0.0, eviction_policy="evict_first")
                paired += w2.to(tl.float32)[:, None, :] * x
        stored = wanted[:, None] & asked[None, :]
        outputs = row[:, None] * out_stride + column[None, :]
        total = tl.sum(products, axis=2)
        if HAS_BIAS:
            total += tl.load(bias + row, mask=wanted, other=0.0).to(tl.float32)[:, None]
        tl.store(out + outputs, total.to(out.dtype.element_ty), mask=stored)
        if PAIRED:
            second = tl.sum(paired, axis=2)
            if HAS_BIAS:
                second += tl.load(bias2 + row, mask=wanted, other=0.0).to(tl.float32)[:, None]
            tl.store(out2 + outputs, second.to(out2.dtype.element_ty), mask=stored)


@triton.autotune(configs=_candidates(*ROWS), key=["out_features", "in_features", "BY_MASK", "GATED", "BLOCK_B"],
                 cache_results=True)
@triton.jit
def _batch_rows_kernel(out, weight, bias, up, up_bias, index, keep, x, kept, unit, out_features, in_features, batch,
                       weight_stride, x_stride, out_stride, HAS_BIAS: tl.constexpr, BY_MASK: tl.constexpr,
                       GATED: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (r, c): slots [r·BLOCK_R, (r+1)·BLOCK_R) for requests [c·BLOCK_B, (c+1)·BLOCK_B): ``out[b, slot] =
    weight[row] · x[b] + bias[row]``, each weight tile loaded once for those requests, the products summed in a float32
    tile reduced once. Rows: row ``slot % unit`` of the ``unit`` rows of entry ``index[slot // unit]``; with BY_MASK the
    slots themselves, those where ``keep`` is False written 0 and not read. GATED: ``silu(that) · (up[row] · x[b] +
    up_bias[row])``, a gated FFN's kept units, both rows read in the same pass (``up`` laid out as ``weight``).
    ``out_features``, the weight's rows: with ``in_features`` the layer's shape, which its launch setting is tuned
    for."""
    block, chunk = tl.program_id(0), tl.program_id(1)
    slot = block * BLOCK_R + tl.arange(0, BLOCK_R)
    present = slot < kept
    if BY_MASK:
        row = slot
        wanted = present & (tl.load(keep + slot, mask=present, other=0) != 0)
    else:
        row = tl.load(index + slot // unit, mask=present, other=0) * unit + slot % unit
        wanted = present
    b = chunk * BLOCK_B + tl.arange(0, BLOCK_B)
    total = tl.zeros([BLOCK_R, BLOCK_B, BLOCK_K // BLOCK_B], dtype=tl.float32)
    gated = tl.zeros([BLOCK_R, BLOCK_B, BLOCK_K // BLOCK_B], dtype=tl.float32)
    work = tl.where(tl.max(wanted.to(tl.int32), axis=0) > 0, in_features, 0)  # no row wanted: no loads
    for start in range(0, work, BLOCK_K // BLOCK_B):
        k = start + tl.arange(0, BLOCK_K // BLOCK_B)
        where = row[:, None] * weight_stride + k[None, :]
        loads = wanted[:, None] & (k[None, :] < in_features)
        w = tl.load(weight + where, mask=loads, other=0.0, eviction_policy="evict_first")
        xs = tl.load(x + b[:, None] * x_stride + k[None, :], mask=(b[:, None] < batch) & (k[None, :] < in_features),
                     other=0.0, eviction_policy="evict_last").to(tl.float32)[None, :, :]
        total += w.to(tl.float32)[:, None, :] * xs
        if GATED:
            u = tl.load(up + where, mask=loads, other=0.0, eviction_policy="evict_first")
            gated += u.to(tl.float32)[:, None, :] * xs
    result = tl.sum(total, axis=2)
    if HAS_BIAS:
        result += tl.load(bias + row, mask=wanted, other=0.0).to(tl.float32)[:, None]
    if GATED:
        second = tl.sum(gated, axis=2)
        if HAS_BIAS:
            second += tl.load(up_bias + row, mask=wanted, other=0.0).to(tl.float32)[:, None]
        result = result * tl.sigmoid(result) * second
    result = tl.where(wanted[:, None], result, 0.0)
    tl.store(out + b[None, :] * out_stride + slot[:, None], result.to(out.dtype.element_ty),
             mask=present[:, None] & (b[None, :] < batch))


@triton.autotune(configs=_candidates(*COLUMNS), key=["in_features", "out_features", "BY_NONZERO", "BLOCK_B"],
                 cache_results=True)
@triton.jit
def _columns_kernel(out, partials, arrivals, weight_t, bias, index, scale, kept, unit, in_features, out_features,
                    batch, weight_stride, scale_stride, HAS_BIAS: tl.constexpr, BY_NONZERO: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, PER_SPLIT: tl.constexpr):
    """Program (n, s, c): requests [c·BLOCK_B, (c+1)·BLOCK_B)' outputs [n·BLOCK_N, (n+1)·BLOCK_N) summed over split s of
    the kept columns, each weight tile loaded once for those requests; split 0 adds the bias. Columns: row ``slot %
    unit`` of the ``unit`` rows of entry ``index[slot // unit]``, scaled by ``scale[b, slot]``; with BY_NONZERO every
    column, scaled by ``scale[b, column]`` and read only where some request's scale is not 0. With one split the program
    writes its tile of ``out``; with more, each stores its float32 sum in ``partials`` (splits, B, out_features) and the
    last of a tile's splits to arrive (counted in ``arrivals``, which it sets back to 0) adds them up and writes the
    tile: one launch. ``in_features``, the transposed weight's rows: with ``out_features`` the layer's shape, which its
    launch setting is tuned for."""
    block, split, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    splits = tl.num_programs(1)
    column = block * BLOCK_N + tl.arange(0, BLOCK_N)
    b = chunk * BLOCK_B + tl.arange(0, BLOCK_B)
    total = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    end = tl.minimum((split + 1) * PER_SPLIT, kept)
    for start in range(split * PER_SPLIT, end, BLOCK_I // BLOCK_B):
        slot = start + tl.arange(0, BLOCK_I // BLOCK_B)
        present = slot < end
        s = tl.load(scale + b[:, None] * scale_stride + slot[None, :], mask=(b[:, None] < batch) & present[None, :],
                    other=0.0, eviction_policy="evict_last").to(tl.float32)  # (BLOCK_B, BLOCK_I // BLOCK_B)
        if BY_NONZERO:
            row = slot
            present = present & (tl.max((s != 0).to(tl.int32), axis=0) > 0)
        else:
            row = tl.load(index + slot // unit, mask=present, other=0) * unit + slot % unit
        w = tl.load(weight_t + row[:, None] * weight_stride + column[None, :],
                    mask=present[:, None] & (column[None, :] < out_features), other=0.0,
                    eviction_policy="evict_first").to(tl.float32)  # (BLOCK_I // BLOCK_B, BLOCK_N)
        total += tl.sum(s[:, :, None] * w[None, :, :], axis=1)
    if HAS_BIAS:
        total += tl.where(split == 0, tl.load(bias + column, mask=column < out_features, other=0.0).to(tl.float32),
                          0.0)[None, :]
    outputs = b[:, None] * out_features + column[None, :]
    wanted = (b[:, None] < batch) & (column[None, :] < out_features)
    if splits > 1:
        tl.store(partials + split * batch * out_features + outputs, total, mask=wanted)
        tl.debug_barrier()  # every thread's partial sum is stored before the arrival releases them
        tile = chunk * tl.num_programs(0) + block
        if tl.atomic_add(arrivals + tile, 1, sem="acq_rel") == splits - 1:
            total = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
            for other in range(0, splits):  # read through L2 (.cg): the other splits ran on other SMs
                total += tl.load(partials + other * batch * out_features + outputs, mask=wanted, other=0.0,
                                 cache_modifier=".cg")
            tl.atomic_xchg(arrivals + tile, 0)
            tl.store(out + outputs, total.to(out.dtype.element_ty), mask=wanted)
    else:
        tl.store(out + outputs, total.to(out.dtype.element_ty), mask=wanted)


@triton.jit
def _attend_kernel(out, queries, keys, values, heads, last, table, norm, eps, query_scale, group_size, head_dim,
                   span, key_stride, query_stride, out_stride, table_stride, LAST_IN_MEMORY: tl.constexpr,
                   ROTARY: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (j, b): the attention output of query j of request b (``queries[b, j·head_dim:]``) at position
    ``last`` (a value, or where it points) over positions [0, last] of its key-value head ``heads[j] //
    group_size``'s cache rows in request b's span; the query first RMS-normalised by ``norm`` (HAS_NORM) and
    rotated by ``table``'s row ``last`` as ``rotated`` does (ROTARY), then scaled by ``query_scale``. A running
    maximum makes the softmax one pass."""
    j, b = tl.program_id(0), tl.program_id(1)
    length = (tl.load(last) if LAST_IN_MEMORY else last) + 1
    base = (tl.load(heads + j) // group_size).to(tl.int64) * head_dim * key_stride + b * span
    d = tl.arange(0, BLOCK_D)
    present = d < head_dim
    at = queries + b * query_stride + j * head_dim
    q = tl.load(at + d, mask=present, other=0.0).to(tl.float32)
    if ROTARY:
        half = head_dim // 2
        partner = tl.load(at + tl.where(d < half, d + half, d - half), mask=present, other=0.0).to(tl.float32)
        if HAS_NORM:
            gain = tl.load(norm + d, mask=present, other=0.0).to(tl.float32)
            partner_gain = tl.load(norm + tl.where(d < half, d + half, d - half), mask=present,
                                   other=0.0).to(tl.float32)
            rms = tl.rsqrt(tl.sum(q * q, axis=0) / head_dim + eps)
            q, partner = q * rms * gain, partner * rms * partner_gain
        angles = table + (length - 1) * head_dim + d
        cos = tl.load(angles, mask=present, other=0.0).to(tl.float32)
        sin = tl.load(angles + table_stride, mask=present, other=0.0).to(tl.float32)
        q = q * cos + tl.where(d < half, -partner, partner) * sin
    q = q.to(queries.dtype.element_ty).to(tl.float32) * query_scale  # rounded as the model's query
    highest = tl.max(tl.full([BLOCK_T], float("-inf"), tl.float32), axis=0)
    mass = tl.sum(tl.zeros([BLOCK_T], tl.float32), axis=0)
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, length, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        where = base + d[:, None] * key_stride + t[None, :]
        loaded = present[:, None] & (t[None, :] < length)
        k = tl.load(keys + where, mask=loaded, other=0.0).to(tl.float32)
        score = tl.where(t < length, tl.sum(k * q[:, None], axis=0), float("-inf"))
        new_highest = tl.maximum(highest, tl.max(score, axis=0))
        decay = tl.exp(highest - new_highest)
        weight = tl.exp(score - new_highest)
        v = tl.load(values + where, mask=loaded, other=0.0).to(tl.float32)
        total = total * decay + tl.sum(v * weight[None, :], axis=1)
        mass = mass * decay + tl.sum(weight, axis=0)
        highest = new_highest
    tl.store(out + b * out_stride + j * head_dim + d, (total / mass).to(out.dtype.element_ty), mask=present)


@triton.jit
def _rotate_kernel(keys, heads, first, last, table, norm, eps, head_dim, span, key_stride, table_stride, first_stride,
                   LAST_IN_MEMORY: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (i, b): the keys of key-value head ``heads[i]`` in request b at positions [first[i], last] (a value,
    or where it points), in place: RMS-normalised over the head by ``norm``'s weights (HAS_NORM), then dimension d
    < head_dim / 2 and its partner d + head_dim / 2 rotated by the cosines and sines of ``table`` (2, span,
    head_dim), in float32, rounded once."""
    i, b = tl.program_id(0), tl.program_id(1)
    half = head_dim // 2
    d = tl.arange(0, BLOCK_D)
    present = d < half
    lower = (tl.load(heads + i).to(tl.int64) * head_dim + d) * key_stride + b * span
    upper = lower + half * key_stride
    limit = tl.load(last) if LAST_IN_MEMORY else last
    if HAS_NORM:
        w1 = tl.load(norm + d, mask=present, other=0.0).to(tl.float32)
        w2 = tl.load(norm + half + d, mask=present, other=0.0).to(tl.float32)
    for position in range(tl.load(first + i * first_stride), limit + 1):
        x1 = tl.load(keys + lower + position, mask=present, other=0.0).to(tl.float32)
        x2 = tl.load(keys + upper + position, mask=present, other=0.0).to(tl.float32)
        if HAS_NORM:
            scale = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / head_dim + eps)
            x1, x2 = x1 * scale * w1, x2 * scale * w2
        angles = table + position * head_dim + d
        cos1 = tl.load(angles, mask=present, other=0.0).to(tl.float32)
        cos2 = tl.load(angles + half, mask=present, other=0.0).to(tl.float32)
        sin1 = tl.load(angles + table_stride, mask=present, other=0.0).to(tl.float32)
        sin2 = tl.load(angles + table_stride + half, mask=present, other=0.0).to(tl.float32)
        tl.store(keys + lower + position, (x1 * cos1 - x2 * sin1).to(keys.dtype.element_ty), mask=present)
        tl.store(keys + upper + position, (x2 * cos2 + x1 * sin2).to(keys.dtype.element_ty), mask=present)


class TritonGather:
    """``TorchGather``'s operations as Triton kernels (see there for each one's meaning)."""

    positions_on_device = True  # ``last`` may be a 0-d device tensor
    units_in_kernel = True  # an index entry may name ``unit`` consecutive rows (a head's), expanded in the kernels

    @staticmethod
    def rows_into(out: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor, inputs: Tensor, first: Tensor,
                  last: int | Tensor, requests: int = 1, unit: int = 1) -> None:
        """``out[r, b·span + p] = weight[r] · inputs[b·span + p] + bias[r]`` for the ``unit`` rows r of each entry
        ``index[i]`` (rows [index[i]·unit, (index[i] + 1)·unit)), p in [first[i], last] and each request b: one
        program per block of kept rows and of requests, looping over the positions its rows need up to ``last``
        (an int, or a 0-d device tensor the kernel reads), so that the grid is the same at every position and
        does not grow with the context."""
        TritonGather._rows_into(out, weight, bias, None, None, None, index, inputs, first, last, requests, unit)

    @staticmethod
    def rows_into_pair(out: Tensor, weight: Tensor, bias: Tensor | None, out2: Tensor, weight2: Tensor,
                       bias2: Tensor | None, index: Tensor, inputs: Tensor, first: Tensor, last: int | Tensor,
                       requests: int = 1, unit: int = 1) -> None:
        """``rows_into`` of two weights of one shape (a layer's key and value projections) at the same rows and
        positions, into two outputs of one layout, in one pass over the inputs (biases both or neither)."""
        if out2.stride() != out.stride():
            raise ValueError("rows_into_pair writes two outputs of one layout: out and out2 must have equal strides")
        TritonGather._rows_into(out, weight, bias, out2, weight2.contiguous(), bias2, index, inputs, first, last,
                                requests, unit)

    @staticmethod
    def _rows_into(out: Tensor, weight: Tensor, bias: Tensor | None, out2: Tensor | None, weight2: Tensor | None,
                   bias2: Tensor | None, index: Tensor, inputs: Tensor, first: Tensor, last: int | Tensor,
                   requests: int, unit: int) -> None:
        if out.stride(1) != 1:
            raise ValueError("rows_into writes in place: out must have contiguous rows")
        if len(index):
            span, block_b, kept = out.shape[1] // requests, _requests_block(requests), len(index) * unit
            weight, inputs = weight.contiguous(), inputs.contiguous()  # no copy when they are (as the decoder's are)
            _rows_kernel[lambda meta: (triton.cdiv(kept, meta["BLOCK_R"]), triton.cdiv(requests, block_b))](
                out, weight, bias, out2, weight2, bias2, index, inputs, first.contiguous(), last, kept, unit,
                weight.shape[1], span, requests, out.stride(0), weight.stride(0), inputs.stride(0),
                HAS_BIAS=bias is not None, PAIRED=out2 is not None, LAST_IN_MEMORY=isinstance(last, Tensor),
                BLOCK_B=block_b)

    @staticmethod
    def rows(weight: Tensor, bias: Tensor | None, index: Tensor, x: Tensor, unit: int = 1) -> Tensor:
        """``(x @ weightᵀ + bias)[:, rows]`` for a batch x (B, in), the ``unit`` rows of each entry of ``index`` in
        order (rows [index[i]·unit, (index[i] + 1)·unit)), computing only those rows, each weight tile loaded once
        for the batch."""
        out = x.new_empty(x.shape[0], len(index) * unit)
        if len(index):
            TritonGather._batch_rows(out, weight, bias, index, None, x, len(index) * unit, unit)
        return out

    @staticmethod
    def gated_rows(gate: Tensor, gate_bias: Tensor | None, up: Tensor, up_bias: Tensor | None, index: Tensor,
                   x: Tensor) -> Tensor:
        """``silu(x @ gateᵀ + gate_bias) · (x @ upᵀ + up_bias)`` at the columns ``index`` for a batch x (B, in): a
        gated FFN's kept units, the gate and up rows of each read in one pass (biases both or neither)."""
        out = x.new_empty(x.shape[0], len(index))
        if len(index):
            TritonGather._batch_rows(out, gate, gate_bias, index, None, x, len(index), 1, up, up_bias)
        return out

    @staticmethod
    def rows_where(weight: Tensor, bias: Tensor | None, keep: Tensor, x: Tensor) -> Tensor:
        """``x @ weightᵀ + bias`` for a batch x (B, in) with the rows where ``keep`` (out,) is False left 0 and not
        read: a grid over every row, so nothing is read back."""
        out = x.new_empty(x.shape[0], weight.shape[0])
        TritonGather._batch_rows(out, weight, bias, None, keep, x, weight.shape[0], 1)
        return out

    @staticmethod
    def _batch_rows(out: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor | None, keep: Tensor | None,
                    x: Tensor, kept: int, unit: int, up: Tensor | None = None, up_bias: Tensor | None = None) -> None:
        weight, x = weight.contiguous(), x.contiguous()
        up = up.contiguous() if up is not None else None
        block_b = _requests_block(x.shape[0])
        _batch_rows_kernel[lambda meta: (triton.cdiv(kept, meta["BLOCK_R"]), triton.cdiv(x.shape[0], block_b))](
            out, weight, bias, up, up_bias, index, keep, x, kept, unit, weight.shape[0], weight.shape[1], x.shape[0],
            weight.stride(0), x.stride(0), out.stride(0), HAS_BIAS=bias is not None, BY_MASK=keep is not None,
            GATED=up is not None, BLOCK_B=block_b)

    @staticmethod
    def columns(weight_t: Tensor, bias: Tensor | None, index: Tensor, scale: Tensor, unit: int = 1) -> Tensor:
        """``bias + Σ_i scale[:, i] · weight_t[rows[i]]`` for a batch of scales (B, kept), the rows the ``unit``
        rows of each entry of ``index`` in order, in one launch: the kept columns split over programs whose float32
        sums the last to finish adds up, each weight tile loaded once for the batch."""
        return TritonGather._columns(weight_t, bias, index, scale, len(index) * unit, unit)

    @staticmethod
    def columns_nonzero(weight_t: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
        """``bias + x @ weight_t`` for a batch x (B, in), reading only the rows of ``weight_t`` (the columns of W)
        where some request's entry is not 0: the zero test inside the product, on a grid over every column, so
        nothing is read back (TEAL's and CATS' thresholded inputs)."""
        return TritonGather._columns(weight_t, bias, None, x, weight_t.shape[0], 1)

    @staticmethod
    def _columns(weight_t: Tensor, bias: Tensor | None, index: Tensor | None, scale: Tensor, kept: int,
                 unit: int) -> Tensor:
        weight_t, scale = weight_t.contiguous(), scale.contiguous()
        batch, out_features = scale.shape[0], weight_t.shape[1]
        out = weight_t.new_empty(batch, out_features)
        block_b, chunks = _requests_block(batch), triton.cdiv(batch, _requests_block(batch))

        def grid(meta: dict) -> tuple[int, int, int]:
            return (triton.cdiv(out_features, meta["BLOCK_N"]), max(1, triton.cdiv(kept, meta["PER_SPLIT"])), chunks)

        most = grid({key: min(c.kwargs[key] for c in COLUMNS) for key in ("BLOCK_N", "PER_SPLIT")})  # any config's
        partials = torch.empty(most[1], batch, out_features, dtype=torch.float32, device=weight_t.device)
        _columns_kernel[grid](out, partials, _arrivals(weight_t.device, most[0] * chunks), weight_t, bias, index,
                              scale, kept, unit, weight_t.shape[0], out_features, batch, weight_t.stride(0),
                              scale.stride(0), HAS_BIAS=bias is not None, BY_NONZERO=index is None,
                              BLOCK_B=block_b)
        return out

    @staticmethod
    def rotate_keys(keys: Tensor, heads: Tensor, first: Tensor, last: int | Tensor, table: Tensor, head_dim: int,
                    requests: int, prompt: int, norm: tuple[Tensor, float] | None) -> None:
        """``TorchGather.rotate_keys`` in one launch, one program per key-value head and request, reading and
        writing only the positions each head's keys were written at (``prompt`` is not needed)."""
        if keys.stride(1) != 1 or table.stride(2) != 1 or table.stride(1) != head_dim:
            raise ValueError("rotate_keys reads the cache and the table in place: both must have contiguous rows")
        if len(heads):
            weight, eps = norm if norm is not None else (None, 0.0)
            _rotate_kernel[(len(heads), requests)](
                keys, heads, first, last, table, weight, eps, head_dim, keys.shape[1] // requests, keys.stride(0),
                table.stride(0), first.stride(0), LAST_IN_MEMORY=isinstance(last, Tensor), HAS_NORM=norm is not None,
                BLOCK_D=triton.next_power_of_2(max(head_dim // 2, 1)))

    @staticmethod
    def attend_queries(queries: Tensor, keys: Tensor, values: Tensor, heads: Tensor, group_size: int, head_dim: int,
                       last: int | Tensor, requests: int, scale: float, table: Tensor | None = None,
                       norm: tuple[Tensor, float] | None = None) -> Tensor:
        """``shadow.kernels.attend_queries`` in one launch: one program per query head and request, the query
        normalised, rotated and scaled in it."""
        if keys.stride(1) != 1 or keys.stride() != values.stride():
            raise ValueError("attend reads the cache in place: keys and values must have contiguous rows alike")
        queries = queries.contiguous()
        out = queries.new_empty(requests, len(heads) * head_dim)
        if len(heads):
            weight, eps = norm if norm is not None else (None, 0.0)
            _attend_kernel[(len(heads), requests)](
                out, queries, keys, values, heads, last, table, weight, eps, scale, group_size, head_dim,
                keys.shape[1] // requests, keys.stride(0), queries.stride(0), out.stride(0),
                table.stride(0) if table is not None else 0, LAST_IN_MEMORY=isinstance(last, Tensor),
                ROTARY=table is not None, HAS_NORM=norm is not None, BLOCK_T=BLOCK_POSITIONS,
                BLOCK_D=triton.next_power_of_2(head_dim))
        return out
