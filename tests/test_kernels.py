"""The gather kernels: each backend against the dense products it replaces, and the compiled one against torch's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from shadow import kernels
from shadow.kernels import TorchGather

BACKENDS = ["native", "torch", "triton"]


def backend_named(name: str):
    if name == "native":
        assert kernels.native() is not None, "the compiled gather kernel must build here (a C++ compiler and ninja)"
        return kernels.native()
    if name == "triton":  # on CPU tensors, in Triton's interpreter (conftest); the test extras install it on Linux
        pytest.importorskip("triton")
        from shadow.kernels.triton_gather import TritonGather

        return TritonGather
    return TorchGather


def backends() -> dict:
    return {name: backend_named(name) for name in BACKENDS}


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_rows_into_writes_exactly_the_asked_entries(name, with_bias):
    gen = torch.Generator().manual_seed(3)
    weight, inputs = torch.randn(40, 37, generator=gen), torch.randn(9, 37, generator=gen)  # 37: not a lane multiple
    bias = torch.randn(40, generator=gen) if with_bias else None
    index = torch.tensor([0, 3, 4, 17, 39])
    first = torch.tensor([0, 5, 8, 9, 2])  # row 17 starts after the last position: nothing to write
    last = 8
    out = torch.full((40, 9), float("nan"))
    backend_named(name).rows_into(out, weight, bias, index, inputs, first, last)
    dense = weight @ inputs.t() + (bias[:, None] if with_bias else 0)
    asked = torch.zeros(40, 9, dtype=torch.bool)
    for row, start in zip(index.tolist(), first.tolist(), strict=True):
        asked[row, start:last + 1] = True
    torch.testing.assert_close(out[asked], dense[asked])
    assert out[~asked].isnan().all()  # nothing else is touched
    # a batch of three requests, each a span of 9 positions: the same rows and positions in every span
    batch = torch.randn(27, 37, generator=gen)
    out = torch.full((40, 27), float("nan"))
    backend_named(name).rows_into(out, weight, bias, index, batch, first, last, 3)
    dense, asked = weight @ batch.t() + (bias[:, None] if with_bias else 0), asked.repeat(1, 3)
    torch.testing.assert_close(out[asked], dense[asked])
    assert out[~asked].isnan().all()


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_rows_are_the_kept_outputs(name, with_bias):
    gen = torch.Generator().manual_seed(6)
    linear = torch.nn.Linear(37, 42, bias=with_bias)
    for x in (torch.randn(1, 37, generator=gen), torch.randn(5, 37, generator=gen)):  # a request, a batch
        for index in (torch.tensor([0, 3, 4, 17, 41]), torch.arange(42), torch.tensor([7]), torch.arange(0)):
            got = backend_named(name).rows(linear.weight.detach(), linear.bias, index, x)
            torch.testing.assert_close(got, linear(x).detach()[:, index])


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_columns_sum_exactly_the_kept_columns(name, with_bias):
    gen = torch.Generator().manual_seed(4)
    down = torch.nn.Linear(40, 300, bias=with_bias)  # 300 outputs: the threads split them unevenly
    y = torch.randn(3, 40, generator=gen)  # a batch of three requests
    index = torch.tensor([0, 3, 4, 17, 39])
    weight_t = down.weight.t().contiguous()
    masked = down(y * torch.zeros(40).index_fill_(0, index, 1))
    torch.testing.assert_close(backend_named(name).columns(weight_t, down.bias, index, y[:, index]), masked)
    torch.testing.assert_close(backend_named(name).columns(weight_t, down.bias, index, y[:1, index]), masked[:1])
    empty = backend_named(name).columns(weight_t, down.bias, index[:0], y[:, :0])
    assert torch.equal(empty, (down.bias if with_bias else torch.zeros(300)).expand(3, -1))


def test_compiled_and_torch_kernels_agree_at_model_size():
    gen = torch.Generator().manual_seed(5)
    fc1 = torch.nn.Linear(512, 2048)
    x = torch.randn(1, 512, generator=gen)
    index = torch.randperm(2048, generator=gen)[:1024].sort().values
    out = {name: torch.zeros(2048, 1) for name in backends()}
    for name, backend in backends().items():
        backend.rows_into(out[name], fc1.weight, fc1.bias, index, x, torch.zeros_like(index), 0)
    torch.testing.assert_close(out["native"], out["torch"])
    torch.testing.assert_close(out["triton"], out["torch"])
    torch.testing.assert_close(kernels.rows(fc1, index, x), fc1(x)[:, index])
    weight_t = fc1.weight.detach().contiguous()  # (2048, 512) read as the transposed weight of a 2048 → 512 layer
    z = torch.randn(2, 1024, generator=gen)
    native, *others = [backend.columns(weight_t, None, index, z) for backend in backends().values()]
    for other in others:
        torch.testing.assert_close(other, native, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_kernels_in_half_precision_equal_the_dense_products(dtype):
    """sampled_addmm has no half kernel: the half path must give the dense half products, entry for entry,
    touching nothing else, with ragged catch-up ranges and an empty index."""
    gen = torch.Generator().manual_seed(9)
    weight, bias = torch.randn(40, 37, generator=gen).to(dtype), torch.randn(40, generator=gen).to(dtype)
    inputs = torch.randn(9, 37, generator=gen).to(dtype)
    index, first, last = torch.tensor([0, 3, 4, 17, 39]), torch.tensor([0, 5, 8, 9, 2]), 8
    out = torch.full((40, 9), float("nan"), dtype=dtype)
    TorchGather.rows_into(out, weight, bias, index, inputs, first, last)
    dense = torch.nn.functional.linear(inputs, weight, bias).t()
    asked = torch.zeros(40, 9, dtype=torch.bool)
    for row, start in zip(index.tolist(), first.tolist(), strict=True):
        asked[row, start:last + 1] = True
    torch.testing.assert_close(out[asked], dense[asked])
    assert out[~asked].isnan().all()
    TorchGather.rows_into(out, weight, bias, index[:0], inputs, first[:0], last)  # nothing kept: nothing written
    assert out[~asked].isnan().all()
    torch.testing.assert_close(TorchGather.rows(weight, bias, index, inputs[:2]), dense[index, :2].t())
    y = torch.randn(2, 40, generator=gen).to(dtype)
    masked = torch.nn.functional.linear(y * torch.zeros(40, dtype=dtype).index_fill_(0, index, 1), weight.t())
    torch.testing.assert_close(TorchGather.columns(weight, None, index, y[:, index]), masked, rtol=2e-2, atol=2e-2)
    keys, values = torch.randn(6 * 8, 11, generator=gen).to(dtype), torch.randn(6 * 8, 11, generator=gen).to(dtype)
    query = torch.randn(2 * 8, generator=gen).to(dtype)
    want = TorchGather.attend(query.float(), keys.float(), values.float(), torch.tensor([1, 5]), 8, 7)
    got = TorchGather.attend(query, keys, values, torch.tensor([1, 5]), 8, 7)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_triton_kernels_round_the_float32_products_once(dtype):
    """The Triton kernels sum in float32 and round once: each result is the float32 product of the same operands,
    within a unit in the last place of the dtype; with more kept rows than a program takes, an input length that
    is not a block multiple, ragged and negative catch-up starts, a split column sum, a head size that is not a
    power of two, query heads sharing key-value heads, and empty index sets."""
    TritonGather = backend_named("triton")
    gen = torch.Generator().manual_seed(10)

    def close(got: torch.Tensor, exact: torch.Tensor) -> None:
        assert got.dtype == dtype
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(got.float(), exact, rtol=eps, atol=1e-5 * exact.abs().max().item())

    weight, bias = torch.randn(70, 300, generator=gen).to(dtype), torch.randn(70, generator=gen).to(dtype)
    inputs = torch.randn(12, 300, generator=gen).to(dtype)
    index = torch.randperm(70, generator=gen)[:37].sort().values
    first = torch.randint(-2, 14, (37,), generator=gen)  # 12 and 13: past the last position, nothing to write
    last = 11
    exact = (inputs.float() @ weight.float().t() + bias.float()).t()
    out = torch.full((70, 12), float("nan"), dtype=dtype)
    TritonGather.rows_into(out, weight, bias, index, inputs, first, last)
    asked = torch.zeros(70, 12, dtype=torch.bool)
    for row, start in zip(index.tolist(), first.clamp(min=0).tolist(), strict=True):
        asked[row, start:last + 1] = True
    close(out[asked], exact[asked])
    assert out[~asked].isnan().all()
    TritonGather.rows_into(out, weight, bias, index[:0], inputs, first[:0], last)
    assert out[~asked].isnan().all()
    out = torch.full((70, 12), float("nan"), dtype=dtype)  # two requests of 6 positions
    TritonGather.rows_into(out, weight, bias, index, inputs, first.clamp(max=6) - 1, 4, 2)
    asked = torch.zeros(70, 6, dtype=torch.bool)
    for row, start in zip(index.tolist(), (first.clamp(max=6) - 1).clamp(min=0).tolist(), strict=True):
        asked[row, start:5] = True
    close(out[asked.repeat(1, 2)], exact[asked.repeat(1, 2)])
    assert out[~asked.repeat(1, 2)].isnan().all()
    close(TritonGather.rows(weight, None, index, inputs[3:5]), (inputs[3:5].float() @ weight.float().t())[:, index])
    assert TritonGather.rows(weight, bias, index[:0], inputs[3:5]).shape == (2, 0)

    weight_t = torch.randn(600, 100, generator=gen).to(dtype)  # 300 kept rows: two splits of the sum
    kept = torch.randperm(600, generator=gen)[:300].sort().values
    scale, out_bias = torch.randn(2, 300, generator=gen).to(dtype), torch.randn(100, generator=gen).to(dtype)
    close(TritonGather.columns(weight_t, out_bias, kept, scale),
          scale.float() @ weight_t.float()[kept] + out_bias.float())
    close(TritonGather.columns(weight_t, out_bias, kept[:0], scale[:, :0]), out_bias.float().expand(2, -1))

    D, positions, length = 24, 50, 45  # two blocks of positions
    keys, values = (torch.randn(3 * D, positions, generator=gen).to(dtype) for _ in range(2))
    heads = torch.tensor([0, 0, 2, 2, 1])
    query = torch.randn(len(heads) * D, generator=gen).to(dtype)
    exact = torch.cat([values.float()[h * D:(h + 1) * D, :length] @ torch.softmax(
        query.float()[j * D:(j + 1) * D] @ keys.float()[h * D:(h + 1) * D, :length], dim=0)
        for j, h in enumerate(heads.tolist())])
    close(TritonGather.attend_queries(query[None], keys, values, heads, 1, D, length - 1, 1, 1.0)[0], exact)
    assert TritonGather.attend_queries(query[None, :0], keys, values, heads[:0], 1, D, length - 1, 1,
                                       1.0).shape == (1, 0)
    store_k, store_v = (torch.cat([torch.randn_like(t), t], dim=1) for t in (keys, values))  # request 1 of two
    both = torch.stack([torch.randn_like(query), query])
    close(TritonGather.attend_queries(both, store_k, store_v, heads, 1, D, length - 1, 2, 1.0)[1], exact)


class OutsideKernels(TorchDispatchMode):
    """The torch operations a call makes outside the Triton launches it counts (the interpreter's own copies of a
    launch's arguments are not the call's)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.launches = 0
        self.inside = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside:
            self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

    def count(self, kernel):
        mode = self

        class Counted:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    mode.launches, mode.inside = mode.launches + 1, True
                    try:
                        return kernel[grid](*args, **kwargs)
                    finally:
                        mode.inside = False
                return launch
        return Counted()


@pytest.mark.parametrize("batch", [1, 3])
def test_triton_column_products_are_one_launch(batch, monkeypatch):
    """A column product is one kernel: no zero-fill, bias or cast around it (only allocations), whether its kept
    columns take one program per tile or several splits whose sums the last to arrive adds up; the split counts
    are left at 0 for the next launch, which gives the same result."""
    backend_named("triton")
    from shadow.kernels import triton_gather

    gen = torch.Generator().manual_seed(13)
    weight_t, bias = torch.randn(600, 100, generator=gen), torch.randn(100, generator=gen)
    z = torch.randn(batch, 600, generator=gen) * (torch.rand(batch, 600, generator=gen) < 0.5)
    arrivals = triton_gather._arrivals(torch.device("cpu"), 2)  # 100 outputs: 2 tiles of 64, the batch in one
    for kept in (600, 300, 40, 0):  # three splits, two, one, none
        index = torch.randperm(600, generator=gen)[:kept].sort().values
        scale = z[:, index]
        mode = OutsideKernels()
        monkeypatch.setattr(triton_gather, "_columns_kernel", mode.count(triton_gather._columns_kernel))
        with mode:
            got = triton_gather.TritonGather.columns(weight_t, bias, index, scale)
            again = triton_gather.TritonGather.columns(weight_t, bias, index, scale)
            nonzero = triton_gather.TritonGather.columns_nonzero(weight_t, None, z)
        monkeypatch.undo()
        assert mode.launches == 3 and set(mode.ops) <= {"aten.empty", "aten.new_empty"}, mode.ops
        torch.testing.assert_close(got, scale @ weight_t[index] + bias, rtol=1e-5, atol=1e-5)
        assert torch.equal(again, got) and not arrivals.any()
        torch.testing.assert_close(nonzero, z @ weight_t, rtol=1e-5, atol=1e-5)


def test_other_dtypes_and_the_switch_use_torch_kernels(monkeypatch):
    TritonGather = backend_named("triton")
    assert kernels.backend(torch.zeros(2, dtype=torch.float64)) is TorchGather
    assert kernels.backend(torch.zeros(2)) is kernels.native()
    on_cuda = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float16)  # no tensor: this CPU has no CUDA
    assert kernels.backend(on_cuda) is TritonGather
    kernels.native.cache_clear()
    kernels.triton_kernels.cache_clear()
    monkeypatch.setenv("SHADOW_GATHER", "torch")
    try:
        assert kernels.backend(torch.zeros(2)) is TorchGather
        assert kernels.backend(on_cuda) is TorchGather
    finally:
        kernels.native.cache_clear()
        kernels.triton_kernels.cache_clear()


def test_compiled_kernel_checks_its_inputs():
    with pytest.raises(RuntimeError, match="weight must be a contiguous CPU tensor"):
        kernels.native().rows_into(torch.zeros(4, 1), torch.zeros(2, 4).t(), None, torch.tensor([0]),
                                   torch.zeros(1, 2), torch.tensor([0]), 0)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("rotary", ["none", "rotated", "normalised"])
def test_attend_queries_is_attention_over_the_kept_heads(name, rotary, monkeypatch):
    """``attend_queries`` through ``shadow.kernels`` on every backend (Triton's in one launch; the others rotate
    and scale in torch, then attend each request): for a batch of two requests, query heads sharing key-value
    heads, each query normalised by Qwen3's head norm (``normalised``) and rotated at its position (``rotated``
    too), then scaled, attends over positions [0, last] of its key-value head's cache rows in its own request."""
    from transformers.models.llama.modeling_llama import rotate_half
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    monkeypatch.setattr(kernels, "backend", lambda weight: backend_named(name))
    gen = torch.Generator().manual_seed(8)
    H, D, span, last, B, group, scale = 3, 8, 11, 6, 2, 2, 0.3
    keys, values = torch.randn(H * D, B * span, generator=gen), torch.randn(H * D, B * span, generator=gen)
    heads = torch.tensor([1, 2, 5])  # query heads: key-value heads 0, 1, 2
    queries = torch.randn(B, len(heads) * D, generator=gen)
    angles = torch.randn(span, D // 2, generator=gen).repeat(1, 2)
    table = torch.stack([angles.cos(), angles.sin()])
    norm = Qwen3RMSNorm(D, eps=1e-6)
    norm.weight.data = torch.rand(D, generator=gen) + 0.5
    with torch.no_grad():
        got = kernels.attend_queries(queries, keys, values, heads, group, D, last, B, scale,
                                     None if rotary == "none" else table,
                                     (norm.weight, norm.variance_epsilon) if rotary == "normalised" else None)
        for b in range(B):
            for j, head in enumerate(heads.tolist()):
                q = queries[b, j * D:(j + 1) * D]
                if rotary == "normalised":
                    q = norm(q)
                if rotary != "none":
                    q = q * table[0, last] + rotate_half(q) * table[1, last]
                rows, columns = slice(head // group * D, (head // group + 1) * D), slice(b * span, b * span + last + 1)
                weights = torch.softmax(q * scale @ keys[rows, columns], dim=0)  # later positions are not read
                torch.testing.assert_close(got[b, j * D:(j + 1) * D], values[rows, columns] @ weights)


@pytest.mark.parametrize("name", BACKENDS)
def test_positions_may_come_as_tensors(name, monkeypatch):
    """A static step's positions, 0-d tensors: the same entries as ints, through ``shadow.kernels`` on every
    backend (Triton's read them on the device, launched over every position; the others read them on the host)."""
    monkeypatch.setattr(kernels, "backend", lambda weight: backend_named(name))
    gen = torch.Generator().manual_seed(4)
    linear, inputs = torch.nn.Linear(37, 40), torch.randn(9, 37, generator=gen)
    index, first = torch.tensor([0, 3, 4, 17, 39]), torch.tensor([0, 5, 8, 9, 2])
    for last in (3, 8):
        told, read = torch.full((40, 9), float("nan")), torch.full((40, 9), float("nan"))
        kernels.rows_into(told, linear, index, inputs, first, last)
        kernels.rows_into(read, linear, index, inputs, first, torch.tensor(last))
        assert torch.equal(told.isnan(), read.isnan()) and told[:, last + 1:].isnan().all()
        assert torch.equal(told.nan_to_num(), read.nan_to_num())
    keys, values = torch.randn(6 * 8, 11, generator=gen), torch.randn(6 * 8, 11, generator=gen)
    heads, queries = torch.tensor([1, 2, 5]), torch.randn(1, 3 * 8, generator=gen)
    for last in (0, 6):
        assert torch.equal(kernels.attend_queries(queries, keys, values, heads, 1, 8, last, 1, 0.5),
                           kernels.attend_queries(queries, keys, values, heads, 1, 8, torch.tensor(last), 1, 0.5))


def test_gather_benchmark_prints_every_kernel(monkeypatch, capsys):
    from shadow.benchmarks import gather

    monkeypatch.setattr("sys.argv", ["gather", "--hidden", "64", "--copies", "2", "--rounds", "1",
                                     "--min-run-time", "0.001"])
    gather.main()
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == 16  # 4 products × dense, dense first, torch, compiled
    assert {" ".join(r[:2]) for r in rows} == {"up rows", "down columns", "q/k/v rows", "output columns"}
    dense_rows = [r for r in rows if r[2] == "dense" and r[3] != "first,"]
    assert len(dense_rows) == 4 and all(r[-2] == "1.00" for r in dense_rows)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fixed_grid_products_skip_the_rows_not_kept_and_the_zero_inputs(name, with_bias, monkeypatch):
    """``rows_where`` and ``columns_nonzero`` (TEAL's and CATS' products) through ``shadow.kernels`` on every
    backend: the dense products with the rows not kept 0, for a batch whose requests have zeros of their own and
    for one request. Triton's (a grid over every row or column) and the compiled one (indices read on the host)
    do not read the weights of rows not kept or of columns zero in every request: NaN there changes nothing."""
    monkeypatch.setattr(kernels, "backend", lambda weight: backend_named(name))
    gen = torch.Generator().manual_seed(12)
    up, down = torch.nn.Linear(37, 42, bias=with_bias), torch.nn.Linear(40, 300, bias=with_bias)
    down.weight.data = down.weight.data.t().contiguous().t()  # stored transposed, as the decoders store it
    x = torch.randn(10, 37, generator=gen)  # more requests than a Triton program takes
    keep = torch.rand(42, generator=gen) < 0.5
    z = torch.randn(10, 40, generator=gen) * (torch.rand(10, 40, generator=gen) < 0.3)
    z[:, :5] = 0  # columns no request reads
    with torch.no_grad():
        want_rows, want_columns = up(x) * keep, down(z)
        if name != "torch":  # torch's forms compute everything
            up.weight[~keep] = float("nan")
            down.weight[:, :5] = float("nan")
        for batch in (10, 3, 1):
            torch.testing.assert_close(kernels.rows_where(up, keep, x[:batch]), want_rows[:batch])
            torch.testing.assert_close(kernels.columns_nonzero(down, z[:batch]), want_columns[:batch],
                                       rtol=1e-5, atol=1e-5)
        assert torch.equal(kernels.rows_where(up, torch.zeros(42, dtype=torch.bool), x), torch.zeros(10, 42))
        if name != "torch":
            index = keep.nonzero().flatten()
            torch.testing.assert_close(kernels.rows(up, index, x), want_rows[:, index])
        nothing = kernels.columns_nonzero(down, torch.zeros(2, 40))
        assert torch.equal(nothing, (down.bias if with_bias else torch.zeros(300)).expand(2, -1))


def test_kernel_benchmark_runs_every_product_in_a_dry_run(monkeypatch, capsys):
    """The GPU check's kernel microbenchmark, run through Triton's interpreter at 1/64 of Llama-3.1-8B's shapes:
    every product, dense and Triton, with its GB/s, its share of the copy bandwidth and the Triton kernel's launch
    setting (the first, untuned, in the interpreter)."""
    pytest.importorskip("triton")
    from shadow.benchmarks import kernels as bench

    monkeypatch.setattr("sys.argv", ["kernels", "--device", "cpu", "--dtype", "float32", "--scale", "64",
                                     "--archs", "llama-3.1-8b", "--keep", "0.5", "--min-run-time", "0"])
    bench.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cpu, float32: copy ") and lines[1].split()[:3] == ["arch", "product", "kept"]
    rows = {}
    for line in lines[2:]:
        words = line.split()
        kernel = "triton" if "triton" in words else "dense"
        rows.setdefault(kernel, []).append(words[words.index(kernel) + 1:])  # ms, GB/s, of copy, × dense, setting
    assert len(rows["dense"]) == len(rows["triton"]) == 6
    assert all(r == r[:4] and r[3] == "1.00" for r in rows["dense"]) and all(float(r[0]) > 0 for r in rows["triton"])
    assert {" ".join(r[4:]) for r in rows["triton"]} == {"16×128 4w3s", "64×32×256 4w3s"}  # the first settings


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_gated_rows_are_the_kept_units_of_a_gated_ffn(name, with_bias, monkeypatch):
    """``silu(gate(x)) · up(x)`` at the kept units through ``shadow.kernels`` on every backend (Triton's reads both
    rows of a unit in one pass; the others gather twice), for more requests than a Triton program takes and for
    one; the units not kept are not read; another activation takes the two gathers."""
    monkeypatch.setattr(kernels, "backend", lambda weight: backend_named(name))
    gen = torch.Generator().manual_seed(13)
    gate, up = torch.nn.Linear(37, 42, bias=with_bias), torch.nn.Linear(37, 42, bias=with_bias)
    x, index = torch.randn(10, 37, generator=gen), torch.tensor([0, 3, 4, 17, 41])
    silu, gelu = torch.nn.SiLU(), torch.nn.GELU()
    assert kernels.is_silu(silu) and not kernels.is_silu(gelu)
    with torch.no_grad():
        want = {act: (act(gate(x)) * up(x))[:, index] for act in (silu, gelu)}
        others = torch.ones(42, dtype=torch.bool).index_fill_(0, index, False)
        gate.weight[others], up.weight[others] = float("nan"), float("nan")
        for batch in (10, 1):
            for act in (silu, gelu):
                got = kernels.gated_rows(gate, up, index, x[:batch], act, kernels.is_silu(act))
                torch.testing.assert_close(got, want[act][:batch])
        assert kernels.gated_rows(gate, up, index[:0], x, silu, True).shape == (10, 0)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("last", [8, torch.tensor(8)], ids=["int", "tensor"])
def test_a_key_and_value_pair_writes_what_two_row_gathers_write(name, last, monkeypatch):
    """``rows_into_pair`` (Triton's: one pass over the inputs for both weights) writes exactly the entries two
    ``rows_into`` calls write, batch of two requests, ragged catch-up starts, the last position as an int or as a
    0-d tensor."""
    monkeypatch.setattr(kernels, "backend", lambda weight: backend_named(name))
    gen = torch.Generator().manual_seed(14)
    key, value, inputs = torch.nn.Linear(37, 40), torch.nn.Linear(37, 40), torch.randn(18, 37, generator=gen)
    index, first = torch.tensor([0, 3, 4, 17, 39]), torch.tensor([0, 5, 8, 9, 2])
    paired = [torch.full((40, 18), float("nan")) for _ in range(2)]
    apart = [torch.full((40, 18), float("nan")) for _ in range(2)]
    with torch.no_grad():
        kernels.rows_into_pair(paired[0], key, paired[1], value, index, inputs, first, last, 2)
        for out, linear in zip(apart, (key, value), strict=True):
            kernels.rows_into(out, linear, index, inputs, first, last, 2)
    for got, want in zip(paired, apart, strict=True):
        assert torch.equal(got.isnan(), want.isnan()) and (~got.isnan()).sum() == 2 * (9 - first.clamp(max=9)).sum()
        torch.testing.assert_close(got.nan_to_num(), want.nan_to_num())


ON_CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
@pytest.mark.parametrize("candidate", range(5))
def test_every_launch_setting_computes_the_same_products(candidate, device, monkeypatch):
    """On CUDA each product's launch settings are tuned among candidates; each candidate gives the dense products:
    row gathers plain, gated and under a mask, the key-value catch-up for one request and for a batch wider than a
    program takes, column sums in one split and several (on CUDA, many splits of many tiles, whose last arrival
    adds them up), and TEAL's zero test, for batches of 1, 3 and 10 requests. On CPU tensors in the interpreter."""
    triton_gather = pytest.importorskip("shadow.kernels.triton_gather")
    for kernel, configs in ((triton_gather._rows_kernel, triton_gather.ROWS),
                            (triton_gather._batch_rows_kernel, triton_gather.ROWS),
                            (triton_gather._columns_kernel, triton_gather.COLUMNS)):
        monkeypatch.setattr(kernel, "configs", [configs[candidate]])
    gen = torch.Generator().manual_seed(14)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    def close(got: torch.Tensor, want: torch.Tensor) -> None:  # float32 sums in another order
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()))

    gather = triton_gather.TritonGather
    weight, up, bias = randn(70, 300), randn(70, 300), randn(70)
    index = torch.randperm(70, generator=gen)[:37].sort().values.to(device)
    keep = torch.zeros(70, dtype=torch.bool, device=device).index_fill_(0, index, True)
    columns_in, columns_out = (600, 80) if device == "cpu" else (8192, 1024)  # two tiles of 64 outputs; many
    weight_t, out_bias = randn(columns_in, columns_out), randn(columns_out)
    for batch in (1, 3, 10):
        x = randn(batch, 300)
        dense, dense_up = x @ weight.t() + bias, x @ up.t() + bias
        close(gather.rows(weight, bias, index, x), dense[:, index])
        close(gather.gated_rows(weight, bias, up, bias, index, x),
              (torch.nn.functional.silu(dense) * dense_up)[:, index])
        close(gather.rows_where(weight, bias, keep, x), dense * keep)
        first = torch.randint(-1, 6, (37,), generator=gen).to(device)  # per row: where its catch-up starts
        inputs = randn(batch * 6, 300)  # each request a span of 6 positions
        keys, values = (torch.full((70, batch * 6), float("nan"), device=device) for _ in range(2))
        gather.rows_into_pair(keys, weight, bias, values, up, bias, index, inputs, first, 5, batch)
        asked = torch.zeros(70, 6, dtype=torch.bool, device=device)
        for row, start in zip(index.tolist(), first.clamp(min=0).tolist(), strict=True):
            asked[row, start:] = True
        asked = asked.repeat(1, batch)
        close(keys[asked], (weight @ inputs.t() + bias[:, None])[asked])
        close(values[asked], (up @ inputs.t() + bias[:, None])[asked])
        assert keys[~asked].isnan().all() and values[~asked].isnan().all()
        z = randn(batch, columns_in) * (torch.rand(batch, columns_in, generator=gen) < 0.5).to(device)
        for kept in (columns_in, columns_in // 6, 0):
            chosen = torch.randperm(columns_in, generator=gen)[:kept].sort().values.to(device)
            close(gather.columns(weight_t, out_bias, chosen, z[:, chosen]), z[:, chosen] @ weight_t[chosen] + out_bias)
        close(gather.columns_nonzero(weight_t, None, z), z @ weight_t)


def test_triton_kernels_compile_for_hopper():
    """Every kernel in every launch setting compiles for an H100/H200 (sm_90, float16, with Triton's ptxas) within
    a block's shared memory, for one request and for a batch: what the interpreter cannot show. In a process of
    its own: under the interpreter Triton's own library functions cannot be compiled."""
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_for_hopper.py"))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = done.stdout.split()
    assert len(compiled) == 2 * 3 * 5 + 2 * 2 * 5 + 3, compiled  # batch blocks × variants × settings; 3 more


def test_kernels_are_tuned_on_cuda_unless_switched_off(monkeypatch):
    """Outside the interpreter every launch setting is a candidate, unless SHADOW_AUTOTUNE=0 (as the tests set):
    then, as in the interpreter, the first alone."""
    triton = pytest.importorskip("triton")
    from shadow.kernels.triton_gather import COLUMNS, ROWS, TUNING, _candidates

    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    monkeypatch.setenv(TUNING, "1")
    assert _candidates(*ROWS) == ROWS and _candidates(*COLUMNS) == COLUMNS
    monkeypatch.setenv(TUNING, "0")
    assert _candidates(*ROWS) == ROWS[:1]
    monkeypatch.setattr(triton.knobs.runtime, "interpret", True)
    monkeypatch.setenv(TUNING, "1")
    assert _candidates(*COLUMNS) == COLUMNS[:1]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("with_norm", [False, True])
def test_rotate_keys_rotates_exactly_the_written_keys(name, with_norm, monkeypatch):
    """``rotate_keys`` through ``shadow.kernels`` on every backend (Triton's in one launch over the written
    positions; the others, torch over the span from the prompt) equals Llama's rotation (Qwen3's head norm first,
    ``with_norm``) of each head's keys at [first, last] in every request of a batch, with the last position as a
    value and as a 0-d tensor, and leaves every other key as it was."""
    from transformers.models.llama.modeling_llama import rotate_half
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    monkeypatch.setattr(kernels, "backend", lambda weight: backend_named(name))
    gen = torch.Generator().manual_seed(15)
    D, H, B, span, prompt = 6, 4, 2, 12, 3
    angles = torch.randn(span, D // 2, generator=gen).repeat(1, 2)
    table = torch.stack([angles.cos(), angles.sin()])  # (2, span, D), as rotary_table builds it
    norm = Qwen3RMSNorm(D, eps=1e-6)
    norm.weight.data = torch.rand(D, generator=gen) + 0.5
    heads, first = torch.tensor([0, 2, 3]), torch.tensor([3, 7, 10])  # head 3 writes nothing up to position 9
    for last in (9, torch.tensor(9)):
        keys = torch.randn(H * D, B * span, generator=gen)
        want = keys.clone()
        for i, head in enumerate(heads.tolist()):
            for b in range(B):
                columns = slice(b * span + int(first[i]), b * span + 10)
                states = keys[head * D:(head + 1) * D, columns].t()  # (positions, D)
                if with_norm:
                    states = norm(states)
                cos, sin = table[:, int(first[i]):10]
                want[head * D:(head + 1) * D, columns] = (states * cos + rotate_half(states) * sin).t()
        with torch.no_grad():
            kernels.rotate_keys(keys, heads, first, last, table, D, B, prompt,
                                (norm.weight, norm.variance_epsilon) if with_norm else None)
        torch.testing.assert_close(keys, want)
    # every head's key at one position, the first of each a view of that position (as a dense step writes them)
    keys, position = torch.randn(H * D, B * span, generator=gen), torch.tensor(8)
    want = keys.clone()
    column = torch.arange(B) * span + 8
    states = want.view(H, D, B * span)[:, :, column].permute(0, 2, 1)  # (H, B, D)
    if with_norm:
        states = norm(states)
    rotated = states * table[0, 8] + rotate_half(states) * table[1, 8]
    want.view(H, D, B * span)[:, :, column] = rotated.permute(0, 2, 1)
    with torch.no_grad():
        kernels.rotate_keys(keys, torch.arange(H), position.expand(H), 8, table, D, B, 8,
                            (norm.weight, norm.variance_epsilon) if with_norm else None)
    torch.testing.assert_close(keys, want)


@pytest.mark.parametrize("name", BACKENDS)
def test_heads_given_as_units_read_their_rows(name, monkeypatch):
    """Entries that name ``unit`` rows each (heads of head_dim rows) through ``shadow.kernels`` on every backend
    (Triton's kernels expand them; the others get the rows): the same products as the rows themselves, for row
    gathers, the catch-up of keys and values from each head's own first position in a batch, and column sums."""
    monkeypatch.setattr(kernels, "backend", lambda weight: backend_named(name))
    gen = torch.Generator().manual_seed(16)
    D, B, span = 5, 3, 7
    linear, second = torch.nn.Linear(24, 30), torch.nn.Linear(24, 30)  # 6 heads of 5
    heads, first = torch.tensor([0, 2, 5]), torch.tensor([1, 6, 3])
    rows = kernels.unit_rows(heads, D)
    assert rows.tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 25, 26, 27, 28, 29]
    x, inputs = torch.randn(B, 24, generator=gen), torch.randn(B * span, 24, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(kernels.rows(linear, heads, x, D), kernels.rows(linear, rows, x))
        by_heads, by_rows = (torch.full((30, B * span), float("nan")) for _ in range(2))
        paired = torch.full((30, B * span), float("nan"))
        kernels.rows_into_pair(by_heads, linear, paired, second, heads, inputs, first, 5, B, D)
        kernels.rows_into(by_rows, linear, rows, inputs, first.repeat_interleave(D), 5, B)
        assert torch.equal(by_heads.isnan(), by_rows.isnan())
        torch.testing.assert_close(by_heads.nan_to_num(), by_rows.nan_to_num())
        written = ~paired.isnan()
        torch.testing.assert_close(paired[written], (second(inputs).t())[written])
        assert torch.equal(written, ~by_rows.isnan())
        down = torch.nn.Linear(30, 8)
        down.weight.data = down.weight.data.t().contiguous().t()  # stored transposed, as the decoders store it
        z = torch.randn(B, len(rows), generator=gen)
        torch.testing.assert_close(kernels.columns(down, heads, z, D), kernels.columns(down, rows, z))
