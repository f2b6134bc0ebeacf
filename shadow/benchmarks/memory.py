"""Peak memory of scoring: traces stream to disk in shards, so memory is bounded by the batch, not the set size.

    python -m shadow.benchmarks.memory                       # opt-mini, plainact, 500 and 5000 examples
    python -m shadow.benchmarks.memory --examples 1000 20000 --max-length 64

Each size is scored in a fresh process (opt-mini's calibration examples repeated to the size, truncated to
``--max-length`` tokens so that the large set runs in minutes); the table gives that process's peak resident set
size, what it was before scoring, and the traces written.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def child(examples: int, max_length: int, batch_size: int) -> None:
    from shadow.config import CalibrationConfig, ModelConfig
    from shadow.criteria import get_criterion
    from shadow.data import load_calibration
    from shadow.models import Shape, load_model, pad_id
    from shadow.opt_mini import MODEL_DIR
    from shadow.traces import compute_traces

    model, tokenizer = load_model(ModelConfig(name="opt-mini", path=str(MODEL_DIR)))
    pool = load_calibration(CalibrationConfig(max_length=max_length), tokenizer, 512)
    data = [pool[i % len(pool)] for i in range(examples)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as out:
        compute_traces(model, data, get_criterion("plainact", "textbook"), Shape.of(model.config), batch_size,
                       pad_id(tokenizer), Path(out))
        size = sum(f.stat().st_size for f in Path(out).iterdir())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"examples": examples, "before_mb": before / 1024, "peak_mb": peak / 1024,
                      "traces_mb": size / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, nargs="+", default=[500, 5000])
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.max_length, args.batch_size)
        return
    print(f"opt-mini, plainact, batch {args.batch_size}, examples of at most {args.max_length} tokens")
    print(f"{'examples':>10}{'RSS before MB':>15}{'peak RSS MB':>13}{'traces MB':>11}")
    for n in args.examples:
        out = subprocess.run([sys.executable, "-m", "shadow.benchmarks.memory", "--child", str(n), "--max-length",
                              str(args.max_length), "--batch-size", str(args.batch_size)],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{n:>10}{r['before_mb']:>15.0f}{r['peak_mb']:>13.0f}{r['traces_mb']:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
