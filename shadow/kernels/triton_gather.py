"""The gather kernels in Triton, for CUDA in float32, float16 and bfloat16: the same four operations and meanings
as ``TorchGather``, each one launch, reading only the kept rows (columns, cache rows) in place and summing in
float32. Index sets come as device tensors and sizes from their shapes, so nothing is read back to the host. The
position a row gather writes up to and an attention's length may come as 0-d device tensors, read by the kernels,
so that a step launches the same kernels with the same arguments at every position (what a CUDA graph replays).

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels run on CPU tensors: that is how the tests
check them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_ROWS = 16  # kept rows per program of a row gather
BLOCK_K = 128  # inputs per step of a row's dot product
BLOCK_COLUMNS = 64  # outputs per program of a column gather
BLOCK_KEPT = 32  # kept columns per step of a column gather
KEPT_PER_SPLIT = 256  # a column gather splits its kept columns over programs, this many each
BLOCK_POSITIONS = 32  # cached positions per step of attention


@triton.jit
def _rows_kernel(out, weight, bias, index, inputs, first, last, kept, in_features, span, out_stride, column_stride,
                 weight_stride, inputs_stride, SCATTER: tl.constexpr, HAS_BIAS: tl.constexpr,
                 LAST_IN_MEMORY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (r, p, b): kept rows [r·BLOCK_R, (r+1)·BLOCK_R) at position p of request b (input row and output
    column b·span + p), for the rows whose first <= p, if p <= last (a value, or where it points)."""
    block, position, request = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    column = request * span + position
    slot = block * BLOCK_R + tl.arange(0, BLOCK_R)
    row = tl.load(index + slot, mask=slot < kept, other=0)
    limit = tl.load(last) if LAST_IN_MEMORY else last
    wanted = ((slot < kept) & (tl.load(first + slot, mask=slot < kept, other=position + 1) <= position)
              & (position <= limit))
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    work = tl.where(tl.max(wanted.to(tl.int32), axis=0) > 0, in_features, 0)  # no row to catch up: no loads
    for start in range(0, work, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        w = tl.load(weight + row[:, None] * weight_stride + k[None, :],
                    mask=wanted[:, None] & (k[None, :] < in_features), other=0.0)
        x = tl.load(inputs + column * inputs_stride + k, mask=k < in_features, other=0.0)
        total += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    if HAS_BIAS:
        total += tl.load(bias + row, mask=wanted, other=0.0).to(tl.float32)
    target = row if SCATTER else slot
    tl.store(out + target * out_stride + column * column_stride, total.to(out.dtype.element_ty), mask=wanted)


@triton.jit
def _columns_kernel(partial, weight_t, index, scale, kept, out_features, weight_stride, per_split,
                    BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr):
    """Program (n, s, b): request b's outputs [n·BLOCK_N, (n+1)·BLOCK_N) summed over split s of the kept columns,
    added to ``partial`` (float32, (B, out_features)) atomically."""
    block, split, request = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    column = block * BLOCK_N + tl.arange(0, BLOCK_N)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    end = tl.minimum((split + 1) * per_split, kept)
    for start in range(split * per_split, end, BLOCK_I):
        slot = start + tl.arange(0, BLOCK_I)
        present = slot < end
        row = tl.load(index + slot, mask=present, other=0)
        s = tl.load(scale + request * kept + slot, mask=present, other=0.0).to(tl.float32)
        w = tl.load(weight_t + row[:, None] * weight_stride + column[None, :],
                    mask=present[:, None] & (column[None, :] < out_features), other=0.0)
        total += tl.sum(w.to(tl.float32) * s[:, None], axis=0)
    tl.atomic_add(partial + request * out_features + column, total, mask=column < out_features)


@triton.jit
def _attend_kernel(out, query, keys, values, heads, length, positions, head_dim, LENGTH_IN_MEMORY: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program h: attention of kept query head h over positions [0, length) of its cache rows ``heads[h]`` (length
    a value, or where it points), with a running maximum so that the softmax is one pass."""
    h = tl.program_id(0)
    if LENGTH_IN_MEMORY:
        length = tl.load(length)
    base = tl.load(heads + h).to(tl.int64) * head_dim * positions
    d = tl.arange(0, BLOCK_D)
    q = tl.load(query + h * head_dim + d, mask=d < head_dim, other=0.0).to(tl.float32)
    highest = tl.max(tl.full([BLOCK_T], float("-inf"), tl.float32), axis=0)
    mass = tl.sum(tl.zeros([BLOCK_T], tl.float32), axis=0)
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, length, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        where = base + d[:, None] * positions + t[None, :]
        present = (d[:, None] < head_dim) & (t[None, :] < length)
        k = tl.load(keys + where, mask=present, other=0.0).to(tl.float32)
        score = tl.where(t < length, tl.sum(k * q[:, None], axis=0), float("-inf"))
        new_highest = tl.maximum(highest, tl.max(score, axis=0))
        decay = tl.exp(highest - new_highest)
        weight = tl.exp(score - new_highest)
        v = tl.load(values + where, mask=present, other=0.0).to(tl.float32)
        total = total * decay + tl.sum(v * weight[None, :], axis=1)
        mass = mass * decay + tl.sum(weight, axis=0)
        highest = new_highest
    tl.store(out + h * head_dim + d, (total / mass).to(out.dtype.element_ty), mask=d < head_dim)


class TritonGather:
    """``TorchGather``'s operations as Triton kernels (see there for each one's meaning)."""

    positions_on_device = True  # ``last`` and ``length`` may be 0-d device tensors

    @staticmethod
    def rows_into(out: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor, inputs: Tensor, first: Tensor,
                  last: int | Tensor, requests: int = 1) -> None:
        """``out[index[i], b·span + p] = weight[index[i]] · inputs[b·span + p] + bias[index[i]]`` for p in
        [first[i], last] and each request b: one program per block of kept rows, position and request, up to
        ``last`` when the host knows it, over the whole span when it is a 0-d device tensor; a program none of whose
        rows needs its position returns at once."""
        if out.stride(1) != 1:
            raise ValueError("rows_into writes in place: out must have contiguous rows")
        if len(index):
            span = out.shape[1] // requests
            on_device = isinstance(last, Tensor)
            grid = (triton.cdiv(len(index), BLOCK_ROWS), span if on_device else last + 1, requests)
            weight, inputs = weight.contiguous(), inputs.contiguous()  # no copy when they are (as the decoder's are)
            _rows_kernel[grid](out, weight, bias, index, inputs, first.contiguous(), last, len(index),
                               weight.shape[1], span, out.stride(0), 1, weight.stride(0), inputs.stride(0),
                               SCATTER=True, HAS_BIAS=bias is not None, LAST_IN_MEMORY=on_device,
                               BLOCK_R=BLOCK_ROWS, BLOCK_K=BLOCK_K)

    @staticmethod
    def rows(weight: Tensor, bias: Tensor | None, index: Tensor, x: Tensor) -> Tensor:
        """``(x @ weightᵀ + bias)[:, index]`` for a batch x (B, in), computing only those rows."""
        out = x.new_empty(x.shape[0], len(index))
        if len(index):
            weight, x = weight.contiguous(), x.contiguous()
            _rows_kernel[(triton.cdiv(len(index), BLOCK_ROWS), 1, x.shape[0])](
                out, weight, bias, index, x, torch.zeros_like(index), 0, len(index), weight.shape[1], 1, 1,
                len(index), weight.stride(0), x.stride(0), SCATTER=False, HAS_BIAS=bias is not None,
                LAST_IN_MEMORY=False, BLOCK_R=BLOCK_ROWS, BLOCK_K=BLOCK_K)
        return out

    @staticmethod
    def columns(weight_t: Tensor, bias: Tensor | None, index: Tensor, scale: Tensor) -> Tensor:
        """``bias + Σ_i scale[:, i] · weight_t[index[i]]`` for a batch of scales (B, kept), the kept columns split
        over programs that add their partial sums in float32."""
        partial = torch.zeros(scale.shape[0], weight_t.shape[1], dtype=torch.float32, device=weight_t.device)
        if len(index):
            weight_t, scale = weight_t.contiguous(), scale.contiguous()
            splits = triton.cdiv(len(index), KEPT_PER_SPLIT)
            _columns_kernel[(triton.cdiv(weight_t.shape[1], BLOCK_COLUMNS), splits, scale.shape[0])](
                partial, weight_t, index, scale, len(index), weight_t.shape[1], weight_t.stride(0), KEPT_PER_SPLIT,
                BLOCK_N=BLOCK_COLUMNS, BLOCK_I=BLOCK_KEPT)
        out = partial if bias is None else partial + bias.float()
        return out.to(weight_t.dtype)

    @staticmethod
    def attend(query: Tensor, keys: Tensor, values: Tensor, heads: Tensor, head_dim: int,
               length: int | Tensor) -> Tensor:
        """One position's attention output for the kept query heads, each over its cache rows ``heads[i]``; keys and
        values may be column slices of a larger store (rows contiguous); ``length`` perhaps a 0-d device tensor."""
        if keys.stride(1) != 1 or keys.stride() != values.stride():
            raise ValueError("attend reads the cache in place: keys and values must have contiguous rows alike")
        out = query.new_empty(len(heads) * head_dim)
        if len(heads):
            _attend_kernel[(len(heads),)](out, query.contiguous(), keys, values, heads, length, keys.stride(0),
                                          head_dim, LENGTH_IN_MEMORY=isinstance(length, Tensor),
                                          BLOCK_T=BLOCK_POSITIONS,
                                          BLOCK_D=triton.next_power_of_2(head_dim))
        return out
