"""Tables of sweep results: ``python -m shadow.report <sweep dirs…> [--metrics a,b] [--out DIR]``.

Reads each directory's results.jsonl (one line per job), writes results.csv and results.md into ``--out``
(default: the first directory) and prints the markdown table: one row per job, the config keys that vary
across the jobs, then the metrics.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

CONFIG_KEYS = ("model", "criterion", "criterion_variant", "predictor", "policy", "dense_first_layer", "sparsity",
               "head_sparsity", "neuron_sparsity", "eval", "seed")
DEFAULT_METRICS = ("token_perplexity", "word_perplexity", "achieved_head_sparsity", "achieved_neuron_sparsity",
                   "predictor/heads_val_spearman", "predictor/neurons_val_spearman")


def load_rows(dirs: list[Path]) -> list[dict]:
    rows = []
    for directory in dirs:
        path = directory / "results.jsonl"
        if not path.is_file():
            raise SystemExit(f"error: {path} does not exist; pass a sweep directory that holds results.jsonl")
        for line in path.read_text().splitlines():
            record = json.loads(line)
            rows.append({**{k: record.get(k) for k in CONFIG_KEYS}, **record["metrics"]})
    return rows


def table(rows: list[dict], metrics: list[str]) -> tuple[list[str], list[list]]:
    varying = [k for k in CONFIG_KEYS if len({json.dumps(r[k]) for r in rows}) > 1]
    columns = varying + [m for m in metrics if any(m in r for r in rows)]
    body = sorted(([r.get(c) for c in columns] for r in rows), key=lambda row: [str(x) for x in row])
    return columns, body


def markdown(columns: list[str], body: list[list]) -> str:
    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    columns, body = table(load_rows(args.dirs), args.metrics.split(","))
    out = args.out or args.dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as f:
        csv.writer(f).writerows([columns, *body])
    text = markdown(columns, body)
    (out / "results.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
