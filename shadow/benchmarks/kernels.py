"""The Triton gather kernels against the memory's limit, at real models' shapes: each kernel's GB/s of weights read,
beside torch's dense product of the same layer and the bandwidth of a device-to-device copy, in one run.

    python -m shadow.benchmarks.kernels                            # CUDA, float16: OPT-13B and Llama-3.1-8B shapes
    python -m shadow.benchmarks.kernels --archs opt-30b --keep 0.3 0.5 1.0 --batch 1 4 8
    TRITON_INTERPRET=1 python -m shadow.benchmarks.kernels --device cpu --dtype float32 --scale 64 --min-run-time 0
                                                                   # a dry run of every kernel at 1/64 of the shapes

Products of one layer, each at ``--keep`` of its rows (columns) kept: the query rows (E × E), the output columns,
the up rows (F × E; gate and up on Llama), the down columns, TEAL's down product with half of each request's inputs
zero (``columns_nonzero``: the zero test inside the product) and CATS' up rows under a kept-unit mask
(``rows_where``). Rows: ``dense`` is torch's product of the whole weight (cuBLAS), ``triton`` the gather kernel,
with the launch setting its autotuning chose on CUDA (rows and inputs per step, or outputs, columns per step and
per split; warps and stages), tuned at an untimed first call.
GB/s counts the weight bytes a kernel must read (the kept share of the weight; dense: all of it), so the copy's
GB/s is the ceiling. Each product rotates over enough copies of its weight to exceed the cache several times, as
decoding does; times are medians of ``torch.utils.benchmark``.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from shadow.arch import architecture_config, family_of
from shadow.benchmarks.latency import copy_bandwidth, median_ms
from shadow.models import TORCH_DTYPES

CACHE_BYTES = 256 << 20  # the weights one product rotates over: several times an H200's 50 MB L2


def shapes(arch: str, scale: int) -> tuple[int, int]:
    """(E, F) of an architecture, each divided by ``scale`` (at least 16)."""
    config = architecture_config(arch)
    shape = family_of(config).shape(config, "kv_group")
    return max(16, shape.attention_width // scale), max(16, shape.neurons // scale)


def products(E: int, F: int, keep: float, batch: int, device: str, dtype: torch.dtype, gen: torch.Generator
             ) -> dict[str, tuple[tuple[int, int], float, dict, object]]:
    """Each product: its weight's (rows, columns), the share of the weight it reads, its kernels, each a function
    of one weight (rows products take it as it is, column products stored transposed), and the Triton kernel's
    autotuner."""
    from shadow.kernels.triton_gather import TritonGather, _batch_rows_kernel, _columns_kernel

    def kept(n: int) -> torch.Tensor:
        return torch.randperm(n, generator=gen)[:max(1, round(n * keep))].sort().values.to(device)

    x = torch.randn(batch, E, generator=gen).to(device, dtype)
    z = torch.randn(batch, F, generator=gen).to(device, dtype)
    half_zero = z * (torch.rand(batch, F, generator=gen) < 0.5).to(device, dtype)
    rows_e, rows_f, cols_e, cols_f = kept(E), kept(F), kept(E), kept(F)
    units = torch.zeros(F, dtype=torch.bool, device=device).index_fill_(0, rows_f, True)
    y, u = x.index_select(1, cols_e).contiguous(), z.index_select(1, cols_f).contiguous()
    return {
        "query rows": ((E, E), len(rows_e) / E, {"dense": lambda w: nn.functional.linear(x, w),
                                                 "triton": lambda w: TritonGather.rows(w, None, rows_e, x)},
                       _batch_rows_kernel),
        "output columns": ((E, E), len(cols_e) / E, {"dense": lambda w: x @ w,
                                                     "triton": lambda w: TritonGather.columns(w, None, cols_e, y)},
                           _columns_kernel),
        "up rows": ((F, E), len(rows_f) / F, {"dense": lambda w: nn.functional.linear(x, w),
                                              "triton": lambda w: TritonGather.rows(w, None, rows_f, x)},
                    _batch_rows_kernel),
        "down columns": ((F, E), len(cols_f) / F, {"dense": lambda w: z @ w,
                                                   "triton": lambda w: TritonGather.columns(w, None, cols_f, u)},
                         _columns_kernel),
        "teal down (nonzero)": ((F, E), float(half_zero.ne(0).any(0).float().mean()),
                                {"dense": lambda w: half_zero @ w,
                                 "triton": lambda w: TritonGather.columns_nonzero(w, None, half_zero)},
                                _columns_kernel),
        "cats up (mask)": ((F, E), float(units.float().mean()),
                           {"dense": lambda w: nn.functional.linear(x, w),
                            "triton": lambda w: TritonGather.rows_where(w, None, units, x)}, _batch_rows_kernel),
    }


def setting(config) -> str:
    """A launch setting in a few characters: its block sizes, warps and stages."""
    return f"{'×'.join(map(str, config.kwargs.values()))} {config.num_warps}w{config.num_stages}s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["opt-13b", "llama-3.1-8b"])
    parser.add_argument("--keep", nargs="+", type=float, default=[0.5, 1.0], help="shares of rows (columns) kept")
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=sorted(TORCH_DTYPES))
    parser.add_argument("--scale", type=int, default=1, help="divide E and F by this (a dry run at small sizes)")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per measurement")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible; use --device cpu under TRITON_INTERPRET=1 for a dry run")
    dtype, gen = TORCH_DTYPES[args.dtype], torch.Generator().manual_seed(0)
    copy = copy_bandwidth(torch.device(args.device), args.min_run_time)
    print(f"{args.device}, {args.dtype}: copy {copy / 1e9:.0f} GB/s (read and written)")
    print(f"{'arch':<14}{'product':<22}{'kept':>6}{'batch':>6}{'kernel':>8}{'ms':>9}{'GB/s':>8}{'of copy':>9}"
          f"{'× dense':>9}  setting")
    for arch in args.archs:
        E, F = shapes(arch, args.scale)
        for keep in args.keep:
            for batch in args.batch:
                for product, ((rows, columns), share, kernels, tuner) in products(E, F, keep, batch, args.device,
                                                                                  dtype, gen).items():
                    size = rows * columns * dtype.itemsize
                    weights = [torch.randn(rows, columns, generator=gen).to(args.device, dtype)
                               for _ in range(max(1, math.ceil(CACHE_BYTES / size)) if args.scale == 1 else 1)]
                    times = {}
                    for name, kernel in kernels.items():
                        kernel(weights[0])  # compiles, and on CUDA tunes, untimed
                        times[name] = median_ms(lambda k=kernel, ws=weights: [k(w) for w in ws], args.min_run_time)
                        times[name] /= len(weights)
                    for name, ms in times.items():
                        read = size * (1.0 if name == "dense" else share)
                        print(f"{arch:<14}{product:<22}{keep:>6.0%}{batch:>6}{name:>8}{ms:>9.4f}"
                              f"{read / ms / 1e6:>8.0f}{read / ms / 1e6 / (copy / 1e9):>9.0%}"
                              f"{times['dense'] / ms:>9.2f}  {setting(tuner.best_config) if name != 'dense' else ''}",
                              flush=True)


if __name__ == "__main__":
    main()
