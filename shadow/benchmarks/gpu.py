"""The GPU check: what the CPU tests cannot show, in one command on a CUDA machine, its steps ordered by value, each
under its own time limit and written to the report as it ends (a check cut short keeps what it measured).

    python -m shadow.benchmarks.gpu                       # writes gpu-check.md in the current directory
    python -m shadow.benchmarks.gpu --steps tests kernels latency --archs opt-13b llama-3.1-8b
    python -m shadow.benchmarks.gpu --steps latency --latency new_tokens=64   # some steps, other settings
    python -m shadow.benchmarks.gpu --budget 540          # all it can in 9 minutes

1. ``tests``: the tests marked ``gpu`` (``pytest -m gpu``): per-token and per-request decoding and pruning on CUDA
   against the masked model in three dtypes, a decoding step that never waits for the device, criteria in half
   precision against float32, CPU offload with CUDA execution, two GPUs (about 3 minutes on one H200);
2. ``kernels``: the gather kernels' GB/s at OPT-13B's and Llama-3.1-8B's shapes, 50% and 100% kept, batches of
   1, 4 and 8, beside cuBLAS's dense product and the copy bandwidth, with the launch setting each kernel's
   autotuning chose (``shadow.benchmarks.kernels``; a few minutes, most of it compiling and tuning);
3. ``latency``: the latency table in float16, batch 1, 128 + 128 tokens at 50% of heads and neurons, for each of
   ``--archs`` (random weights, 3 rounds; OPT-13B, Llama-3.1-8B, then OPT-30B, which fits one H200 in 60 GB):
   every row against ``generate``, the same engine's dense step and its weights' time at the copy bandwidth
   (``--latency`` adds or overrides settings, e.g. ``dense_key_values=true`` for the per-token rows with every
   head's keys and values computed densely; about 3 minutes per architecture, OPT-30B more);
4. ``jobs``: the main job on opt-mini (plainact, sparsity 0.5) with device=cuda in float32, float16 and bfloat16:
   token perplexity of each and the half-precision gap to float32.
The report gives the machine, each step's outcome and output. Exit status 0 when every step passed. Without
CUDA it says so in one line and exits 1. ``--budget`` bounds the whole check (a lent device's minutes): each step's
limit is cut to what is left, so a step cut short still reports what it printed, and the steps left with under a
minute are reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from shadow.config import DTYPES

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["tests", "kernels", "latency", "jobs"]  # in order of value
SHORTEST_STEP = 60  # seconds: a step given less would measure nothing
SKIPPED = f"under {SHORTEST_STEP} s of --budget left"


class Budget:
    """The seconds a check may take, from its start (None: no bound): each step's time limit is cut to what is
    left."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def limit(self, step_limit: int) -> int | None:
        """The time limit of a step whose own is ``step_limit``: cut to what is left of the budget; None (skip the
        step) where under ``SHORTEST_STEP`` seconds are left."""
        if self.end is None:
            return step_limit
        left = int(self.end - time.monotonic())
        return min(step_limit, left) if left >= SHORTEST_STEP else None


def step(command: list[str], timeout: int) -> tuple[bool, str, float]:
    """Run ``python -m <command>``: (passed, its output's last lines, seconds)."""
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "PYTHONUNBUFFERED": "1"}  # a step cut short has printed all it measured
    try:
        done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=ROOT)
        passed, output = done.returncode == 0, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:  # what it printed so far comes as bytes, whatever ``text`` says
        printed = "".join(part.decode(errors="replace") for part in (err.stdout, err.stderr) if part)
        passed, output = False, f"{printed}\ntimed out after {timeout} s"
    tail = "\n".join(line for line in output.splitlines() if line.strip())[-3000:]
    return passed, tail, time.perf_counter() - start


def main_jobs(work: Path, budget: Budget) -> tuple[list[str], bool]:
    lines = ["", "## Main job on opt-mini, device=cuda", "", "| dtype | token perplexity | vs float32 | seconds |",
             "|---|---|---|---|"]
    perplexity, ok, failures = {}, True, []
    for dtype in DTYPES:
        out, timeout = work / f"job-{dtype}", budget.limit(240)
        if timeout is None:
            ok = False
            lines.append(f"| {dtype} | skipped: {SKIPPED} | | |")
            continue
        passed, tail, seconds = step(["shadow", "+criterion=plainact", "device=cuda", f"model.dtype={dtype}",
                                      "sparsity=0.5", "logger=none", f"cache_dir={work / 'cache'}",
                                      f"hydra.run.dir={out}"], timeout)
        if passed:
            perplexity[dtype] = json.loads((out / "metrics.json").read_text())["metrics"]["token_perplexity"]
            gap = perplexity[dtype] / perplexity["float32"] - 1 if "float32" in perplexity else 0.0
            lines.append(f"| {dtype} | {perplexity[dtype]:.2f} | {gap:+.2%} | {seconds:.0f} |")
        else:
            ok = False
            lines.append(f"| {dtype} | failed | | {seconds:.0f} |")
            failures += ["", f"{dtype} output:", "```", tail, "```"]
    return lines + failures, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-check.md"))
    parser.add_argument("--archs", nargs="+", default=["opt-13b", "llama-3.1-8b", "opt-30b"])
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=STEPS)
    parser.add_argument("--latency", nargs="*", default=[], metavar="KEY=VALUE",
                        help="settings of the latency benchmark (conf/latency.yaml), after the check's own")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="the seconds the whole check may take: each step's limit is cut to what is left")
    args = parser.parse_args()
    if args.budget is not None and args.budget < SHORTEST_STEP:
        raise SystemExit(f"--budget {args.budget:g}: under {SHORTEST_STEP} s no step can run; give at least "
                         f"{SHORTEST_STEP}, or leave it out for no bound")
    if not torch.cuda.is_available():
        print("no CUDA device is visible (torch.cuda.is_available() is False): the GPU check needs one")
        sys.exit(1)
    budget = Budget(args.budget)
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    report = ["# GPU check", "", f"{torch.cuda.device_count()} GPU(s): {names}; torch {torch.__version__}, CUDA "
              f"{torch.version.cuda}", ""]
    ok = True

    def save(lines: list[str]) -> None:
        report.extend(lines)
        print("\n".join(lines), flush=True)
        args.out.write_text("\n".join(report) + "\n")

    def run(title: str, command: list[str], step_limit: int) -> tuple[bool, str, float] | None:
        """A step under the budget; None, with the report saying so, where too little of it is left."""
        nonlocal ok
        timeout = budget.limit(step_limit)
        if timeout is None:
            ok = False
            save(["", f"## {title}: skipped: {SKIPPED}"])
            return None
        passed, tail, seconds = step(command, timeout)
        ok &= passed
        return passed, tail, seconds

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "tests" in args.steps:
            command = ["pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-n", "0", "tests"]  # one process
            if done := run("Tests marked gpu", command, 300):
                passed, tail, seconds = done
                save(["", f"## Tests marked gpu: {'passed' if passed else 'FAILED'} ({seconds:.0f} s)", "", "```",
                      tail.splitlines()[-1] if passed else tail, "```"])
        if "kernels" in args.steps:
            command = ["shadow.benchmarks.kernels", "--batch", "1", "4", "8", "--min-run-time", "0.1"]
            if done := run("Gather kernels", command, 360):
                passed, tail, seconds = done
                save(["", f"## Gather kernels: {'passed' if passed else 'FAILED'} ({seconds:.0f} s)", "", "```", tail,
                      "```"])
        for arch in args.archs if "latency" in args.steps else []:
            out = work / f"latency-{arch}"
            settings = [f"arch={arch}", "device=cuda", "dtype=float16", "sparsity=[0.5]", "rounds=3",
                        "min_run_time=0.5", "logger=none", *args.latency, f"hydra.run.dir={out}"]
            if done := run(f"Latency, {arch}", ["shadow.benchmarks.latency", *settings], 480):
                passed, tail, seconds = done
                save(["", f"## Latency, {arch} ({seconds:.0f} s; {' '.join(settings[1:-1])})", "",
                      *([(out / "latency.md").read_text()] if passed else ["FAILED", "```", tail, "```"])])
        if "jobs" in args.steps:
            lines, passed = main_jobs(work, budget)
            ok &= passed
            save(lines)
    print(f"{'passed' if ok else 'FAILED'}: report written to {args.out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
