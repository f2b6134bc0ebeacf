"""The gather kernels of per-token decoding against dense products of the same layers, side by side.

    python -m shadow.benchmarks.gather                         # OPT-1.3B's FFN and attention shapes, 50% kept
    python -m shadow.benchmarks.gather --hidden 4096 --keep 0.3

Each product runs over ``--copies`` distinct weights in turn, more bytes than the CPU's caches hold, so every
call reads its weights from memory, as decoding does. Rows:
  dense          the whole product (torch), what a dense layer reads;
  dense, first   a contiguous block of the kept share of rows: the bandwidth ideal for the kept units;
  torch          the kept rows through torch's sparse kernels (``TorchGather``);
  compiled       the kept rows through the compiled kernel (``shadow/kernels/gather.cpp``).
Times are medians of ``torch.utils.benchmark`` measurements, the kernels' rows interleaved over ``--rounds``.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch.utils import benchmark

from shadow import kernels
from shadow.kernels import TorchGather


def products(rows: bool, native, x: torch.Tensor, scale: torch.Tensor, index: torch.Tensor) -> dict:
    """Each kernel as a function of one weight ((out, in) for rows, the transposed weight for columns)."""
    kept, batch = len(index), x[None]  # the kernels take a batch of one
    if rows:
        return {"dense": lambda w: w @ x, "dense, first": lambda w: w[:kept] @ x,
                "torch": lambda w: TorchGather.rows(w, None, index, batch),
                "compiled": lambda w: native.rows(w, None, index, batch)}
    kept_scale = scale[None, index].contiguous()
    return {"dense": lambda w: w.t() @ scale, "dense, first": lambda w: w[:kept].t() @ scale[:kept],
            "torch": lambda w: TorchGather.columns(w, None, index, kept_scale),
            "compiled": lambda w: native.columns(w, None, index, kept_scale)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048, help="E; the FFN is 4E wide")
    parser.add_argument("--keep", type=float, default=0.5, help="share of rows (neurons, head units) kept")
    parser.add_argument("--copies", type=int, default=24, help="distinct weights per product, read in turn")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    args = parser.parse_args()
    native = kernels.native()
    if native is None:
        raise SystemExit("the compiled gather kernel could not be built here (see the warning above)")
    torch.manual_seed(0)
    E, F = args.hidden, 4 * args.hidden
    shapes = {"up rows": (F, E), "down columns": (F, E), "q/k/v rows": (E, E), "output columns": (E, E)}
    times: dict[tuple[str, str], list[float]] = {}
    for product, (rows, width) in shapes.items():
        weights = [torch.randn(rows, width) for _ in range(args.copies)]  # for columns: the weight transposed
        index = torch.randperm(rows)[:round(rows * args.keep)].sort().values
        runs = products(product.endswith("rows"), native, torch.randn(width), torch.randn(rows), index)
        for _ in range(args.rounds):
            for name, run in runs.items():
                timer = benchmark.Timer(stmt="for w in weights: run(w)", globals={"run": run, "weights": weights},
                                        num_threads=torch.get_num_threads())
                ms = timer.blocked_autorange(min_run_time=args.min_run_time).median * 1e3 / args.copies
                times.setdefault((product, name), []).append(ms)
    print(f"E={E}, F={F}, {args.keep:.0%} of rows kept, float32, {torch.get_num_threads()} threads, "
          f"{args.copies} weights of each shape in turn")
    print(f"{'product':<18}{'kernel':<14}{'ms':>8}{'× dense':>9}{'× ideal':>9}")
    for product in shapes:
        dense, ideal = (statistics.median(times[product, name]) for name in ("dense", "dense, first"))
        for name in ("dense", "dense, first", "torch", "compiled"):
            ms = statistics.median(times[product, name])
            print(f"{product:<18}{name:<14}{ms:>8.3f}{dense / ms:>9.2f}{ideal / ms:>9.2f}")


if __name__ == "__main__":
    main()
