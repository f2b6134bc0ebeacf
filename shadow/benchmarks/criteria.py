"""Cost of collecting each criterion's per-example traces, relative to a plain forward and backward pass.

    python -m shadow.benchmarks.criteria                      # OPT-125m architecture, random weights, CPU
    python -m shadow.benchmarks.criteria --batch 8 --tokens 256 --device cuda

The baseline is what a training step computes on the same batch: forward, loss, backward with weight
gradients. Scoring freezes the weights and computes activation gradients only, so first-order criteria can
cost less than the baseline. Times are medians of ``torch.utils.benchmark`` measurements.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils import benchmark

from shadow.arch import architecture_config, family_of
from shadow.compose import compose_config
from shadow.criteria import CRITERIA, get_criterion
from shadow.data import Example, collate
from shadow.traces import example_loss, score_batch


def opt_125m(device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(architecture_config("opt-125m")).to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-run-time", type=float, default=5.0, help="seconds of measurement per row")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = opt_125m(args.device)
    shape = family_of(model.config).shape(model.config, compose_config().attention_unit)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 50000, (args.batch, args.tokens), generator=gen).tolist()
    batch = collate([Example(tuple(x), args.tokens // 2) for x in ids], pad_id=1)
    device_batch = batch.input_ids.to(args.device), batch.labels.to(args.device)

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        example_loss(model(input_ids=device_batch[0]).logits, device_batch[1]).sum().backward()

    def measure(fn) -> float:
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=args.min_run_time).median * 1e3

    base = measure(train_step)
    model.zero_grad(set_to_none=True)
    print(f"OPT-125m architecture, batch {args.batch} × {args.tokens} tokens, {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'criterion':<28}{'ms':>10}{'× fwd+bwd':>12}")
    print(f"{'forward + backward':<28}{base:>10.1f}{1.0:>12.2f}")
    for name in sorted(CRITERIA):
        for variant in CRITERIA[name]:
            criterion = get_criterion(name, variant)
            if variant != "textbook" and criterion is CRITERIA[name]["textbook"]:
                continue  # the reference computed the textbook form: the same row
            ms = measure(lambda c=criterion: score_batch(model, batch, c, shape, torch.Generator()))
            label = name if variant == "textbook" else f"{name} ({variant})"
            print(f"{label:<28}{ms:>10.1f}{ms / base:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
