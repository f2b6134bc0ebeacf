"""Tables and plots of sweep results: ``python -m shadow.report <sweep dirs…> [--metrics a,b] [--out DIR]``.

Reads each directory's results.jsonl (one line per job) and writes into ``--out`` (default: the first directory):
- results.csv and results.md, printed too: one row per job, the config keys that vary, then the metrics;
- results_by_seed.md, where seeds vary (printed too): one row per setting, each metric's mean and [min, max]
  over the seeds; within the settings that differ only in ``--compare`` (default: predictor), each quality
  metric's best mean in bold and the values whose band overlaps the best one's marked ≈ (a difference inside the
  spread);
- <metric>_by_criterion.png and <metric>_by_predictor.png for accuracy and perplexity: the metric against
  sparsity, one line per criterion (a panel per predictor) and one line per predictor (a panel per criterion);
  other keys that vary (policy, model, head or neuron sparsity unlike sparsity, …) split lines further, with
  one colour and marker per line in every panel and one legend. Repeats of a point (seeds) give the line their
  mean and a shaded band from their min to their max. The dense run (``predictor=dense``: no masks, whatever
  its sparsity) is a dotted horizontal line labelled "dense" with its value; the oracle is dashed: in its
  criterion's colour on every predictor panel, and its own line on the criterion panels. Perplexity spanning
  more than 3× is on a log axis; ticks read as plain numbers (30, 50, 100, 200);
- <metric>_by_weights_read.png: the same metric against the weights read per token (the share of the dense
  step's parameters, ``shadow.weights_read``), one line per predictor (a panel per criterion): the axis on
  which methods that skip different things (heads and neurons, input or intermediate channels) compare; each
  point sits at its repeats' mean weights read;
- layer_sparsity.png: heatmaps of the achieved head and neuron sparsity of every job (rows, seeds averaged,
  dense runs left out) in every layer (columns), one shared colour bar; the figure grows with jobs and layers,
  cells carry their values up to 16 layers, layer ticks are thinned beyond.
Lines and rows are labelled by the keys that vary only: values that name themselves (criterion, predictor,
model, dtype) bare, others as key=value, sparsity as s=…, head and neuron sparsity only where they differ from it.
W&B runs carry the same keys (README: Comparing runs), so its dashboard gives the same views.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CONFIG_KEYS = ("model", "criterion", "criterion_variant", "predictor", "granularity", "allocation", "policy",
               "layer_scale", "attention_unit", "dense_first_layer", "compat", "calibration", "dtype", "sparsity",
               "head_sparsity", "neuron_sparsity", "eval", "mask_from", "seed")
DEFAULT_METRICS = ("tasks/mean_acc", "token_perplexity", "word_perplexity", "achieved_head_sparsity",
                   "achieved_neuron_sparsity", "weights_read", "weights_read_effective", "kv_read",
                   "predictor/heads_val_spearman", "predictor/neurons_val_spearman")
PLOTTED = ("tasks/mean_acc", "token_perplexity", "word_perplexity")
METRIC_NAMES = {"tasks/mean_acc": "mean task accuracy", "token_perplexity": "token perplexity",
                "word_perplexity": "word perplexity"}
X_NAMES = {"sparsity": "sparsity", "weights_read": "weights read per token (share of the dense step)"}
BARE = ("model", "criterion", "predictor", "dtype")  # values that say what they are (others: compat=none, …)
SHORT = {"sparsity": "s", "head_sparsity": "heads", "neuron_sparsity": "neurons", "criterion_variant": "variant"}
DENSE_KEYS = ("model", "dtype", "eval", "compat")  # what changes a dense run's result: it has no masks
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
PARTS = ("head_sparsity", "neuron_sparsity")  # per layer; in labels and lines only where unlike ``sparsity``
ANNOTATED_LAYERS = 16  # up to this many layers a cell is wide enough for its value


def load_rows(dirs: list[Path]) -> list[dict]:
    """One row per job: a job run again into the same directory (a sweep resumed) counts once, as last run."""
    records: dict[str, dict] = {}
    for directory in dirs:
        path = directory / "results.jsonl"
        if not path.is_file():
            raise SystemExit(f"error: {path} does not exist; pass a sweep directory that holds results.jsonl")
        for number, line in enumerate(path.read_text().splitlines()):
            record = json.loads(line)
            records[record.get("output_dir") or f"{path}:{number}"] = record
    return [{**{k: record.get(k) for k in CONFIG_KEYS}, **record["metrics"],
             "layers": record.get("sparsity_per_layer") or {}} for record in records.values()]


def varying_keys(rows: list[dict]) -> list[str]:
    return [k for k in CONFIG_KEYS if len({json.dumps(r.get(k)) for r in rows}) > 1]  # older records lack some


def label(row: dict, keys: list[str]) -> str:
    """A compact name of the row from ``keys`` (those that vary): "plainact, shadow, s=0.5, heads=0.3"."""
    parts = []
    for key in keys:
        value = row.get(key)
        if value is None or (key in PARTS and value == row.get("sparsity")):
            continue
        parts.append(str(value) if key in BARE else f"{SHORT.get(key, key)}={value}")
    return ", ".join(parts) or "all"


def table(rows: list[dict], metrics: list[str]) -> tuple[list[str], list[list]]:
    columns = varying_keys(rows) + [m for m in metrics if any(m in r for r in rows)]
    body = sorted(([r.get(c) for c in columns] for r in rows), key=lambda row: [str(x) for x in row])
    return columns, body


LOWER_BETTER = ("perplexity", "bits_per_byte", "_mse")  # quality metrics where less is better; the others: more
NOT_QUALITY = ("sparsity", "_read", "_examples", "_documents")  # what a run spends or uses, not how well it does


def better(metric: str) -> int:
    """+1 where a larger value of ``metric`` is better, -1 where a smaller one is, 0 where it is not a quality."""
    if any(part in metric for part in NOT_QUALITY):
        return 0
    return -1 if any(part in metric for part in LOWER_BETTER) else 1


def seed_table(rows: list[dict], metrics: list[str], compare: str = "predictor") -> tuple[list[str], list[list]]:
    """One row per setting, seeds aggregated: each metric as ``mean [min, max] (n)`` over the seeds. Within each
    group of settings that differ only in ``compare``, the best mean of each quality metric is in bold, and a value
    whose [min, max] band overlaps the best one's is marked ≈: the difference lies inside the spread over seeds (a
    single run is a band of one point: the deterministic placements' results have no seed spread)."""
    keys = [k for k in varying_keys(rows) if k != "seed"]
    metrics = [m for m in metrics if any(m in r for r in rows)]
    settings: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        settings[tuple(json.dumps(r.get(k)) for k in keys)].append(r)
    stats = {}
    for setting, repeats in settings.items():
        for m in metrics:
            values = [r[m] for r in repeats if isinstance(r.get(m), int | float)]
            if values:
                stats[setting, m] = (sum(values) / len(values), min(values), max(values), len(values))
    rivals: dict[tuple, list[tuple]] = defaultdict(list)  # settings alike but for ``compare``
    where = keys.index(compare) if compare in keys else None
    for setting in settings:
        rivals[setting[:where] + setting[where + 1:] if where is not None else ()].append(setting)

    def cell(setting: tuple, m: str) -> str:
        if (setting, m) not in stats:
            return ""
        mean, low, high, n = stats[setting, m]
        text = f"{mean:.4g}" if n == 1 else f"{mean:.4g} [{low:.4g}, {high:.4g}] ({n})"
        group = [other for other in rivals[setting[:where] + setting[where + 1:] if where is not None else ()]
                 if (other, m) in stats]
        if len(group) < 2 or not better(m):
            return text
        best = max(group, key=lambda other: better(m) * stats[other, m][0])
        if best == setting:
            return f"**{text}**"
        _, best_low, best_high, _ = stats[best, m]
        return f"≈ {text}" if low <= best_high and best_low <= high else text

    body = [[json.loads(v) for v in setting] + [cell(setting, m) for m in metrics]
            for setting in sorted(settings, key=lambda s: [str(x) for x in s])]
    return keys + metrics, body


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


class Point(NamedTuple):
    """One point of a line: the mean of the repeats at this sparsity, and their min and max (the band); ``x``: the
    sparsity, or the repeats' mean of another x (weights read)."""
    x: float
    mean: float
    low: float
    high: float


def series(rows: list[dict], metric: str, keys: list[str], x: str = "sparsity") -> dict[str, list[Point]]:
    """The metric against ``x``, one line per label of ``keys``; repeats (seeds) of a sparsity are aggregated
    into a Point at their mean ``x``."""
    values: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        values[label(r, keys)][r["sparsity"]].append(r)
    lines = {}
    for name, by_sparsity in values.items():
        points = []
        for sparsity, repeats in by_sparsity.items():
            ys = [r[metric] for r in repeats]
            at = sparsity if x == "sparsity" else sum(r[x] for r in repeats) / len(repeats)
            points.append(Point(at, sum(ys) / len(ys), min(ys), max(ys)))
        lines[name] = sorted(points)
    return lines


def log_ticks(low: float, high: float) -> list[float]:
    """Round numbers between low and high for a log axis: the coarsest set of at least five."""
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for steps in ((1,), (1, 2, 5), (1, 2, 3, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [s * 10.0 ** d for d in decades for s in steps if low <= s * 10.0 ** d <= high]
        if len(ticks) >= 5:
            break
    return ticks


def plain(value: float, _position: int | None = None) -> str:
    """A tick label as a reader writes it (120, 0.5), never 1.2×10²; ``_position``: FuncFormatter's."""
    return f"{value:.0f}" if value >= 10 else f"{value:g}"


def y_axis(ax: Axes, metric: str, values: list[float]) -> None:
    """Perplexity that spans more than 3× on a log axis (it explodes at high sparsity); plain numbers either way."""
    from matplotlib.ticker import FuncFormatter, NullFormatter, ScalarFormatter

    if "perplexity" in metric and min(values) > 0 and max(values) / min(values) > 3:
        ax.set_yscale("log")
        ax.autoscale_view()
        ax.set_yticks(log_ticks(*ax.get_ylim()))
        ax.yaxis.set_major_formatter(FuncFormatter(plain))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel(f"{METRIC_NAMES.get(metric, metric)} (log scale)")
    else:
        ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))
        ax.set_ylabel(METRIC_NAMES.get(metric, metric))


def plot_metric(rows: list[dict], metric: str, lines_by: str, panels_by: str, x: str = "sparsity") -> Figure:
    """The metric against ``x`` (sparsity, or weights read): a panel per value of ``panels_by``, a line per value
    of ``lines_by`` and of the other varying keys (not seeds: their mean is the line, their min–max the band);
    dense and oracle as references."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    rows = [r for r in rows if metric in r and x in r]
    dense = [r for r in rows if r["predictor"] == "dense"]
    masked = [r for r in rows if r["predictor"] != "dense"]
    # the oracle bounds every predictor: drawn on each predictor's panel rather than in a panel of its own
    overlay = panels_by == "predictor" and any(r["predictor"] != "oracle" for r in masked)
    split = [lines_by] + [k for k in varying_keys(masked) if k not in ("sparsity", "seed", panels_by, lines_by)
                          and (k not in PARTS or any(r[k] != r["sparsity"] for r in masked))]
    predicted = {label(r, split) for r in masked if r["predictor"] != "oracle"}
    names = sorted(predicted) + sorted({label(r, split) for r in masked} - predicted)  # the oracle's colours last
    colours = plt.get_cmap("tab10").colors
    styles = {name: (colours[i % len(colours)], MARKERS[i % len(MARKERS)]) for i, name in enumerate(names)}
    panels = sorted({str(r[panels_by]) for r in masked if not (overlay and r["predictor"] == "oracle")}) or ["all"]
    dense_keys = [k for k in DENSE_KEYS if k in varying_keys(dense)]
    baselines: dict[str, list[float]] = defaultdict(list)
    for r in dense:
        baselines[label(r, dense_keys)].append(r[metric])
    entries = len(names) + len(baselines) + 1  # the legend's lines: the figure is as tall as it needs
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels) + 2, max(3.2, 0.8 + 0.22 * entries)),
                             squeeze=False, sharey=True, layout="constrained")
    legend: dict[str, Line2D] = {}
    ys = []
    for ax, panel in zip(axes[0], panels, strict=True):
        for oracle in (False, True):
            members = [r for r in masked if (r["predictor"] == "oracle") == oracle
                       and (str(r[panels_by]) == panel or (overlay and oracle))]
            for name, points in sorted(series(members, metric, split, x).items()):
                colour, marker = styles[name]
                xs, mean, low, high = (list(column) for column in zip(*points, strict=True))
                ax.plot(xs, mean, color=colour, marker=marker, markersize=4, linestyle="--" if oracle else "-",
                                label=f"{name} (oracle)" if overlay and oracle else name)
                if low != high:
                    ax.fill_between(xs, low, high, color=colour, alpha=0.15, linewidth=0)
                legend.setdefault(name, Line2D([], [], color=colour, marker=marker,
                                               linestyle="-" if name in predicted else "--"))
                if overlay and oracle:
                    legend.setdefault("oracle", Line2D([], [], color="grey", linestyle="--"))
                ys += low + high
        for i, (name, values) in enumerate(sorted(baselines.items())):
            text = "dense" if len(baselines) == 1 else f"dense ({name})"
            mean, colour = sum(values) / len(values), ("black", "dimgrey", "darkgrey")[i % 3]
            legend[text] = ax.axhline(mean, color=colour, linestyle=":", linewidth=1.5, label=text)
            ax.text(0.98, mean, f"{text} {mean:.1f}" if mean >= 10 else f"{text} {mean:.3g}", color=colour,
                    transform=ax.get_yaxis_transform(), ha="right", va="bottom", fontsize="small")
            ys += values
        ax.set(title=f"{panels_by}: {panel}", xlabel=X_NAMES[x])
        ax.grid(alpha=0.3)
    xs = sorted({r["sparsity"] for r in masked})
    for ax in axes[0] if len(xs) <= 8 and x == "sparsity" else ():  # the sweep's sparsities, when they are few
        ax.set_xticks(xs, [plain(x) for x in xs])
    if ys:
        y_axis(axes[0][0], metric, ys)  # the panels share it (sharey)
    order = [*styles, "oracle"]
    handles = sorted(legend.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))
    fig.legend([h for _, h in handles], [n for n, _ in handles], loc="outside right center", fontsize="small",
               title=", ".join(k for k in split if k in BARE), frameon=False)  # the others say key=value
    return fig


def plot_layers(rows: list[dict]) -> Figure:
    """Achieved head and neuron sparsity per layer (columns) of every job (rows): the jobs that differ only by seed
    averaged into one row; dense runs, whose rows would be all zeros, left out."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in rows if r["layers"] and r["predictor"] != "dense"]
    keys = [k for k in varying_keys(rows) if k != "seed"]
    jobs: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: [(0, r[k]) if isinstance(r[k], int | float) else (1, str(r[k])) for k in keys]):
        jobs[label(r, keys)].append(r)
    depth = max(len(r["layers"][kind]) for r in rows for kind in PARTS)
    grids = {kind: np.full((len(jobs), depth), np.nan) for kind in PARTS}  # NaN: a smaller model's missing layers
    for i, group in enumerate(jobs.values()):
        for kind, grid in grids.items():
            per_layer = np.mean([r["layers"][kind] for r in group], axis=0)
            grid[i, :len(per_layer)] = per_layer
    # rules between groups of the first key (criterion, …), when other keys vary within them
    groups = [str(group[0][keys[0]]) if len(keys) > 1 else "" for group in jobs.values()]
    annotate = depth <= ANNOTATED_LAYERS
    panel_width = min(max((0.45 if annotate else 0.3) * depth, 2.5), 8.0)
    label_width = 0.07 * max(len(name) for name in jobs)  # row labels at 8 pt
    fig, axes = plt.subplots(1, 2, figsize=(label_width + 2 * panel_width + 1.5, 1.4 + 0.25 * len(jobs)),
                             sharey=True, layout="constrained")
    for ax, (kind, grid) in zip(axes, grids.items(), strict=True):
        image = ax.imshow(grid, vmin=0, vmax=1, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set(title=f"achieved {kind.replace('_', ' ')}", xlabel="layer")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=16, integer=True))
        for (i, j), value in np.ndenumerate(grid) if annotate else ():
            if not np.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6.5,
                        color="white" if value < 0.6 else "black")  # viridis is dark below ~0.6
        for i in range(1, len(jobs)):
            if groups[i] != groups[i - 1]:
                ax.axhline(i - 0.5, color="white", linewidth=1.5)
    axes[0].set_yticks(range(len(jobs)), list(jobs), fontsize=8)
    fig.colorbar(image, ax=axes, label="achieved sparsity", aspect=40, pad=0.02)
    return fig


def write_plots(rows: list[dict], out: Path) -> list[Path]:
    written = []

    def save(fig: Figure, name: str) -> None:
        fig.savefig(out / name, dpi=150)
        pyplot().close(fig)
        written.append(out / name)

    for metric in PLOTTED:
        if any(metric in r for r in rows):
            stem = metric.replace("/", "_")
            save(plot_metric(rows, metric, "criterion", "predictor"), f"{stem}_by_criterion.png")
            save(plot_metric(rows, metric, "predictor", "criterion"), f"{stem}_by_predictor.png")
            if any(metric in r and "weights_read" in r and r["predictor"] != "dense" for r in rows):
                save(plot_metric(rows, metric, "predictor", "criterion", "weights_read"),
                     f"{stem}_by_weights_read.png")
    if any(r["layers"] and r["predictor"] != "dense" for r in rows):
        save(plot_layers(rows), "layer_sparsity.png")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", default="predictor", help="the key compared in results_by_seed.md")
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
    if "seed" in varying_keys(rows):
        seeds = markdown(*seed_table(rows, args.metrics.split(","), args.compare))
        (out / "results_by_seed.md").write_text(seeds)
        print(f"\nover seeds: mean [min, max] (seeds); best of each {args.compare} comparison in bold, ≈ inside "
              f"its spread\n{seeds}", end="")
    for path in write_plots(rows, out):
        print(f"plot: {path}")


if __name__ == "__main__":
    main()
