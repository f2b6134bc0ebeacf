"""Tables and plots of sweep results: ``python -m shadow.report <sweep dirs…> [--metrics a,b] [--out DIR]``.

Reads each directory's results.jsonl (one line per job) and writes into ``--out`` (default: the first directory):
- results.csv and results.md, printed too: one row per job, the config keys that vary, then the metrics;
- <metric>_by_criterion.png and <metric>_by_predictor.png for accuracy and perplexity: the metric against
  sparsity, one line per criterion (a panel per predictor) and one line per predictor (a panel per criterion);
  other keys that vary (policy, model, …) split lines further; repeated points (seeds) are averaged;
- layer_sparsity.png: a heatmap of the achieved head and neuron sparsity of every job in every layer.
W&B runs carry the same keys (README: Comparing runs), so its dashboard gives the same views.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

CONFIG_KEYS = ("model", "criterion", "criterion_variant", "predictor", "policy", "dense_first_layer", "compat",
               "calibration", "dtype", "sparsity", "head_sparsity", "neuron_sparsity", "eval", "mask_from", "seed")
DEFAULT_METRICS = ("tasks/mean_acc", "token_perplexity", "word_perplexity", "achieved_head_sparsity",
                   "achieved_neuron_sparsity", "predictor/heads_val_spearman", "predictor/neurons_val_spearman")
PLOTTED = ("tasks/mean_acc", "token_perplexity", "word_perplexity")
DERIVED = ("sparsity", "head_sparsity", "neuron_sparsity")  # the x axis, not a way to split lines


def load_rows(dirs: list[Path]) -> list[dict]:
    rows = []
    for directory in dirs:
        path = directory / "results.jsonl"
        if not path.is_file():
            raise SystemExit(f"error: {path} does not exist; pass a sweep directory that holds results.jsonl")
        for line in path.read_text().splitlines():
            record = json.loads(line)
            rows.append({**{k: record.get(k) for k in CONFIG_KEYS}, **record["metrics"],
                         "layers": record.get("sparsity_per_layer") or {}})
    return rows


def varying_keys(rows: list[dict]) -> list[str]:
    return [k for k in CONFIG_KEYS if len({json.dumps(r.get(k)) for r in rows}) > 1]  # older records lack some


def label(row: dict, keys: list[str]) -> str:
    return ", ".join(f"{k}={row[k]}" for k in keys) or "all"


def table(rows: list[dict], metrics: list[str]) -> tuple[list[str], list[list]]:
    columns = varying_keys(rows) + [m for m in metrics if any(m in r for r in rows)]
    body = sorted(([r.get(c) for c in columns] for r in rows), key=lambda row: [str(x) for x in row])
    return columns, body


def markdown(columns: list[str], body: list[list]) -> str:
    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib's pyplot on the file-only backend (imported late: tables need no plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric(rows: list[dict], metric: str, lines_by: str, panels_by: str):
    """The metric against sparsity: a panel per value of ``panels_by``, a line per value of ``lines_by`` and of the
    other varying keys; points at the same sparsity are averaged."""
    plt = pyplot()
    rows = [r for r in rows if metric in r]
    split = [k for k in varying_keys(rows) if k not in (*DERIVED, panels_by)]
    split = [lines_by] + [k for k in split if k != lines_by]
    panels = sorted({str(r[panels_by]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False, sharey=True)
    for ax, panel in zip(axes[0], panels, strict=True):
        points: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if str(r[panels_by]) == panel:
                points[label(r, split)][r["sparsity"]].append(r[metric])
        for name, by_sparsity in sorted(points.items()):
            xs = sorted(by_sparsity)
            ax.plot(xs, [sum(by_sparsity[x]) / len(by_sparsity[x]) for x in xs], marker="o", label=name)
        ax.set(title=f"{panels_by}={panel}", xlabel="sparsity", ylabel=metric)
        if "perplexity" in metric:
            ax.set_yscale("log")
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_layers(rows: list[dict]):
    """Achieved head and neuron sparsity per layer (columns) of every job (rows)."""
    plt = pyplot()
    rows = [r for r in rows if r["layers"]]
    keys = varying_keys(rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 1 + 0.3 * len(rows)), squeeze=False)
    for ax, kind in zip(axes[0], ("head_sparsity", "neuron_sparsity"), strict=True):
        image = ax.imshow([r["layers"][kind] for r in rows], vmin=0, vmax=1, aspect="auto", cmap="viridis")
        ax.set(title=f"achieved {kind.replace('_', ' ')}", xlabel="layer")
        ax.set_yticks(range(len(rows)), [label(r, keys) for r in rows], fontsize="x-small")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def write_plots(rows: list[dict], out: Path) -> list[Path]:
    written = []

    def save(fig, name: str) -> None:
        fig.savefig(out / name, dpi=120)
        written.append(out / name)

    for metric in PLOTTED:
        if any(metric in r for r in rows):
            stem = metric.replace("/", "_")
            save(plot_metric(rows, metric, "criterion", "predictor"), f"{stem}_by_criterion.png")
            save(plot_metric(rows, metric, "predictor", "criterion"), f"{stem}_by_predictor.png")
    if any(r["layers"] for r in rows):
        save(plot_layers(rows), "layer_sparsity.png")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = load_rows(args.dirs)
    columns, body = table(rows, args.metrics.split(","))
    out = args.out or args.dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as f:
        csv.writer(f).writerows([columns, *body])
    text = markdown(columns, body)
    (out / "results.md").write_text(text)
    print(text, end="")
    for path in write_plots(rows, out):
        print(f"plot: {path}")


if __name__ == "__main__":
    main()
