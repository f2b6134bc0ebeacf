"""Peak memory of scoring and of predictor training: traces stream to disk in shards, and training reads them
back in blocks of shards, so memory is bounded by the batch and the block, not by the set size.

    python -m shadow.benchmarks.memory                       # opt-mini, plainact, 500 and 5000 examples
    python -m shadow.benchmarks.memory --examples 1000 20000 --max-length 64
    python -m shadow.benchmarks.memory --stage predictor     # OPT-125m-shaped traces, 2048 to 16384 examples

Each size runs in a fresh process. Scoring: opt-mini's calibration examples repeated to the size, truncated to
``--max-length`` tokens so that the large set runs in minutes. Predictor: random traces of OPT-125m's shape (12
layers, 768 features, 12 heads, 3072 neurons) written shard by shard, then one epoch of the ShadowLLM predictor
streaming them in blocks of at most 0.25 GB (``predictor.block_gb``; the default 2 GB holds these sets whole).
The table gives that process's peak resident set size, what it was before the stage, and the traces' size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def child(examples: int, max_length: int, batch_size: int) -> None:
    from shadow.arch import family_of
    from shadow.compose import compose_config
    from shadow.criteria import get_criterion
    from shadow.data import load_calibration
    from shadow.models import load_model, pad_id
    from shadow.traces import compute_traces

    cfg = compose_config(f"calibration.max_length={max_length}")
    model, tokenizer = load_model(cfg.model, cfg.device)
    pool = load_calibration(cfg.calibration, tokenizer, 512)
    data = [pool[i % len(pool)] for i in range(examples)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as out:
        compute_traces(model, data, get_criterion("plainact", "textbook"),
                       family_of(model.config).shape(model.config, cfg.attention_unit), batch_size,
                       pad_id(tokenizer), Path(out))
        size = sum(f.stat().st_size for f in Path(out).iterdir())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"examples": examples, "before_mb": before / 1024, "peak_mb": peak / 1024,
                      "traces_mb": size / 2**20}))


def predictor_child(examples: int) -> None:
    from safetensors.torch import save_file

    from shadow.arch import Shape
    from shadow.compose import compose_config
    from shadow.placements import PLACEMENTS
    from shadow.predictors import fit_predictor
    from shadow.traces import SHARD_SIZE, TraceShards

    shape, hidden = Shape(layers=12, heads=12, kv_heads=12, head_dim=64, neurons=3072), 768
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        for index, start in enumerate(range(0, examples, SHARD_SIZE)):
            n = min(SHARD_SIZE, examples - start)
            save_file({"features": torch.randn(n, shape.layers, hidden, generator=gen),
                       "heads": torch.rand(n, shape.layers, shape.heads, generator=gen),
                       "neurons": torch.rand(n, shape.layers, shape.neurons, generator=gen)},
                      str(Path(out) / f"traces-{index:05d}.safetensors"))
        size = sum(f.stat().st_size for f in Path(out).iterdir())
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cfg = compose_config("predictor.head_epochs=1", "predictor.neuron_epochs=1", "predictor.head_batch_size=64",
                             "predictor.neuron_batch_size=64", "predictor.block_gb=0.25").predictor
        fit_predictor(TraceShards.load(Path(out)), [f"doc{i // 8}" for i in range(examples)], shape,
                      PLACEMENTS["shadow"].groups(shape.layers, 0, False), cfg, 0, False, "cpu")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"examples": examples, "before_mb": before / 1024, "peak_mb": peak / 1024,
                      "traces_mb": size / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["scoring", "predictor"], default="scoring")
    parser.add_argument("--examples", type=int, nargs="+")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.stage == "predictor":
            predictor_child(args.child)
        else:
            child(args.child, args.max_length, args.batch_size)
        return
    sizes = args.examples or ([2048, 8192, 16384] if args.stage == "predictor" else [500, 5000])
    print(f"opt-mini, plainact, batch {args.batch_size}, examples of at most {args.max_length} tokens"
          if args.stage == "scoring" else "predictor training (one epoch) on OPT-125m-shaped random traces")
    print(f"{'examples':>10}{'RSS before MB':>15}{'peak RSS MB':>13}{'traces MB':>11}")
    for n in sizes:
        out = subprocess.run([sys.executable, "-m", "shadow.benchmarks.memory", "--stage", args.stage, "--child",
                              str(n), "--max-length",
                              str(args.max_length), "--batch-size", str(args.batch_size)],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{n:>10}{r['before_mb']:>15.0f}{r['peak_mb']:>13.0f}{r['traces_mb']:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
