"""Tables and plots of sweep results: ``python -m shadow.report <sweep dirs…> [--metrics a,b] [--out DIR]``.

Reads each directory's results.jsonl (one line per job) and writes into ``--out`` (default: the first directory):
- results.csv and results.md, printed too: one row per job, the config keys that vary, then the metrics that vary
  (weights read among them); what every job shares is one line above the table. A ``--metrics`` name no job
  recorded is an error;
- results_by_seed.md, where seeds vary (printed too): one row per setting, each metric's mean and [min, max]
  over the seeds; within the settings that differ only in ``--compare`` (default: predictor), each quality
  metric's best mean in bold and the values whose band overlaps the best one's marked ≈ (a difference inside the
  spread);
- <metric>.png and .pdf for accuracy and perplexity: a row of panels per model, the metric against sparsity and
  against the weights read per token (the share of the dense step's parameters, ``shadow.weights_read``: the
  axis on which methods that skip different things compare). One line per method (the placement, per token
  where it is, and its criterion where it ranks by one), split further by the other keys that vary (policy, head
  sparsity unlike sparsity, …), one colour and marker per line in every panel; repeats (seeds) give the line
  their mean and a shaded min–max band, each point at their mean weights read. The oracle is dashed. The dense
  model (a ``predictor=dense`` job, else the dense evaluation each job records as ``dense/<metric>``) is a dotted
  line and, against weights read, a star at 1.0; the Pareto frontier (the best quality reached for what is read,
  over every method and dense) is a grey band behind the lines. Perplexity spanning more than 3× is on a log
  axis; ticks read as plain numbers (30, 50, 100, 200);
- layer_sparsity.png and .pdf: heatmaps of the achieved head and neuron sparsity of every job (rows, seeds
  averaged, dense runs left out) in every layer (columns), one shared colour bar; the figure grows with jobs and
  layers, cells carry their values up to 16 layers, layer ticks are thinned beyond.
Lines and rows are labelled by the keys that vary only: values that name themselves (method, criterion, predictor,
model, dtype) bare, others as key=value, sparsity as s=…, head and neuron sparsity only where they differ from it.
W&B runs carry the same keys (README: Comparing runs), and ``python -m shadow.workspace`` lays out the same views.
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

from shadow.errors import closest

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CONFIG_KEYS = ("model", "criterion", "criterion_variant", "predictor", "granularity", "allocation", "policy",
               "layer_scale", "attention_unit", "dense_first_layer", "compat", "calibration", "dtype", "sparsity",
               "head_sparsity", "neuron_sparsity", "eval", "mask_from", "context", "seed")
DEFAULT_METRICS = ("tasks/mean_acc", "token_perplexity", "word_perplexity", "achieved_head_sparsity",
                   "achieved_neuron_sparsity", "weights_read", "weights_read_effective", "kv_read",
                   "predictor/heads_val_spearman", "predictor/neurons_val_spearman", "dense/tasks/mean_acc",
                   "dense/token_perplexity", "dense/word_perplexity")
PLOTTED = ("tasks/mean_acc", "token_perplexity", "word_perplexity")
METRIC_NAMES = {"tasks/mean_acc": "mean task accuracy", "token_perplexity": "token perplexity",
                "word_perplexity": "word perplexity"}
X_NAMES = {"sparsity": "sparsity", "weights_read": "weights read per token (share of the dense step)"}
BARE = ("model", "method", "criterion", "predictor", "dtype")  # values that say what they are (others: compat=none, …)
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
    return [{**{k: record.get(k) for k in CONFIG_KEYS}, "method": record.get("method"), **record["metrics"],
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


def table_keys(rows: list[dict]) -> list[str]:
    """The config keys that vary, head and neuron sparsity only where some job sets them unlike sparsity."""
    return [k for k in varying_keys(rows) if not (k in PARTS and all(r.get(k) == r.get("sparsity") for r in rows))]


def table(rows: list[dict], metrics: list[str]) -> tuple[list[str], list[list]]:
    """One row per job: the config keys that vary, then the metrics that do (a value every job shares says nothing
    about the comparison: ``constants`` lists them)."""
    columns = table_keys(rows) + [m for m in metrics if any(m in r for r in rows) and not constant(rows, m)]
    body = sorted(([r.get(c) for c in columns] for r in rows), key=lambda row: [str(x) for x in row])
    return columns, body


def constant(rows: list[dict], metric: str) -> bool:
    return len(rows) > 1 and len({json.dumps(r.get(metric)) for r in rows}) == 1


def constants(rows: list[dict], metrics: list[str]) -> dict[str, object]:
    """The settings and metrics every job shares: what the table leaves out."""
    keys = [k for k in CONFIG_KEYS if any(r.get(k) is not None for r in rows) and k not in varying_keys(rows)]
    return {k: rows[0].get(k) for k in keys + [m for m in metrics if m in rows[0] and constant(rows, m)]}


def check_metrics(rows: list[dict], asked: list[str]) -> None:
    """Every metric asked for by name must be one some job recorded: a misspelt name is an error, not a table
    without its column."""
    recorded = sorted({k for r in rows for k, v in r.items() if isinstance(v, int | float) and k not in CONFIG_KEYS})
    for metric in asked:
        if metric not in recorded:
            close = closest(metric, recorded)
            hint = f"did you mean {close}? " if close else ""
            raise SystemExit(f"error: --metrics {metric}: no job recorded it; {hint}recorded: {', '.join(recorded)}")


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
    keys = [k for k in table_keys(rows) if k != "seed"]
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


def method(row: dict) -> str:
    """What made the masks: the record's ``method`` (``Placement.method``: the placement, per token where it is,
    and the criterion where the placement ranks by one), derived the same way for records without it."""
    from shadow.placements import PLACEMENTS

    if row.get("method"):
        return row["method"]
    placement = PLACEMENTS.get(row["predictor"])
    return placement.method(row["criterion"], row.get("granularity") or "request") if placement else \
        f"{row['predictor']}, {row['criterion']}"


def frontier(points: list[tuple[float, float]], sign: int) -> list[tuple[float, float]]:
    """The Pareto frontier of (weights read, quality) points, by weights read: those no other point beats on both
    (reads no more and scores as well, better on one); ``sign``: +1 where more quality is better, -1 where less."""
    best, kept = -math.inf, []
    for x, y in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if sign * y > best:
            best = sign * y
            kept.append((x, y))
    return kept


def dense_reference(rows: list[dict], metric: str) -> float | None:
    """The dense model's value of ``metric``: the mean of dense jobs, else of the jobs' recorded dense evaluation
    (``dense/<metric>``); None where neither exists."""
    values = [r[metric] for r in rows if r["predictor"] == "dense" and metric in r] or \
        [r[f"dense/{metric}"] for r in rows if f"dense/{metric}" in r]
    return sum(values) / len(values) if values else None


def plot_quality(rows: list[dict], metric: str) -> Figure:
    """The metric per model (a row of panels each): against sparsity and, where the jobs recorded it, against the
    weights read per token. A line per method (and per other key that varies: policy, head sparsity, …) in one
    colour across panels, at the mean over seeds in a min–max band; the oracle dashed; the dense model a dotted
    line, and a star at 1.0 of the weights read; the Pareto frontier of every method's points (and dense) a grey
    band behind them."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    rows = [r for r in rows if metric in r]
    models = sorted({str(r["model"]) for r in rows})
    masked = [{**r, "method": method(r)} for r in rows if r["predictor"] != "dense"]
    others = [k for k in varying_keys(masked) if k not in ("model", "sparsity", "seed", "criterion", "predictor",
                                                            "granularity") and
              (k not in PARTS or any(r[k] != r["sparsity"] for r in masked))]
    split = ["method", *others]
    names = sorted({label(r, split) for r in masked}, key=lambda n: ("oracle" in n, n))
    colours = plt.get_cmap("tab10").colors
    styles = {name: (colours[i % len(colours)], MARKERS[i % len(MARKERS)]) for i, name in enumerate(names)}
    axes_x = ["sparsity"] + (["weights_read"] if any("weights_read" in r for r in masked) else [])
    sign = better(metric) or 1
    fig, axes = plt.subplots(len(models), len(axes_x), figsize=(4.2 * len(axes_x) + 2.6, 3.4 * len(models)),
                             squeeze=False, layout="constrained")
    legend: dict[str, Line2D] = {}
    for row_axes, model in zip(axes, models, strict=True):
        mine = [r for r in masked if str(r["model"]) == model]
        dense = dense_reference([r for r in rows if str(r["model"]) == model], metric)
        ys = [] if dense is None else [dense]
        for ax, x in zip(row_axes, axes_x, strict=True):
            reached = []
            for name, points in sorted(series([r for r in mine if x in r], metric, split, x).items()):
                colour, marker = styles[name]
                xs, mean, low, high = (list(column) for column in zip(*points, strict=True))
                dashed = "oracle" in name
                ax.plot(xs, mean, color=colour, marker=marker, markersize=4, linestyle="--" if dashed else "-",
                        label=name)
                if low != high:
                    ax.fill_between(xs, low, high, color=colour, alpha=0.15, linewidth=0, gid="band")
                legend.setdefault(name, Line2D([], [], color=colour, marker=marker, linestyle="--" if dashed else "-"))
                reached += list(zip(xs, mean, strict=True))
                ys += low + high
            if dense is not None:
                ax.axhline(dense, color="black", linestyle=":", linewidth=1.2, label="dense", gid="dense")
                legend["dense"] = Line2D([], [], color="black", linestyle=":", marker="*" if x != "sparsity" else "")
                if x == "weights_read":
                    ax.plot([1.0], [dense], marker="*", markersize=11, color="black", linestyle="", gid="dense")
                    reached.append((1.0, dense))
            if x == "weights_read" and len(reached) > 1:
                front = frontier(reached, sign)
                ax.plot(*zip(*front, strict=True), color="grey", linewidth=7, alpha=0.25, drawstyle="steps-post",
                        zorder=0, label="Pareto frontier", gid="frontier")  # the best reached for what is read
                legend["Pareto frontier"] = Line2D([], [], color="grey", linewidth=7, alpha=0.25)
            reference = "" if dense is None else f" (dense {dense:.1f})" if dense >= 10 else f" (dense {dense:.3g})"
            ax.set(title=f"{model}{reference}", xlabel=X_NAMES[x])
            ax.grid(alpha=0.3)
            sparsities = sorted({r["sparsity"] for r in mine})
            if x == "sparsity" and len(sparsities) <= 8:  # the sweep's sparsities, when they are few
                ax.set_xticks(sparsities, [plain(s) for s in sparsities])
        if ys:
            for ax in row_axes:
                y_axis(ax, metric, ys)
            lows, highs = zip(*(ax.get_ylim() for ax in row_axes), strict=True)
            for ax in row_axes:  # one scale per model
                ax.set_ylim(min(lows), max(highs))
    order = [*names, "dense", "Pareto frontier"]
    fig.legend([legend[n] for n in order if n in legend], [n for n in order if n in legend],
               loc="outside right center", fontsize="small", frameon=False)
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


FORMATS = ("png", "pdf")  # PNG to look at, PDF (vector) for a paper


def write_plots(rows: list[dict], out: Path) -> list[Path]:
    """``<metric>`` for each quality metric the jobs recorded, and the per-layer heatmaps, in every format."""
    written = []

    def save(fig: Figure, stem: str) -> None:
        for kind in FORMATS:
            fig.savefig(out / f"{stem}.{kind}", dpi=150)
            written.append(out / f"{stem}.{kind}")
        pyplot().close(fig)

    for metric in PLOTTED:
        if any(metric in r and r["predictor"] != "dense" for r in rows):
            save(plot_quality(rows, metric), metric.replace("/", "_"))
    if any(r["layers"] and r["predictor"] != "dense" for r in rows):
        save(plot_layers(rows), "layer_sparsity")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--metrics", help=f"comma-separated; default: those of {', '.join(DEFAULT_METRICS)} that "
                        "the jobs recorded")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", default="predictor", help="the key compared in results_by_seed.md")
    args = parser.parse_args()
    rows = load_rows(args.dirs)
    if args.metrics:
        check_metrics(rows, args.metrics.split(","))
    metrics = args.metrics.split(",") if args.metrics else list(DEFAULT_METRICS)
    columns, body = table(rows, metrics)
    out = args.out or args.dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as f:
        csv.writer(f).writerows([columns, *body])
    shared = constants(rows, metrics)
    text = ("every job: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in shared.items()) + "\n\n" if shared else "") + markdown(columns, body)
    (out / "results.md").write_text(text)
    print(text, end="")
    if "seed" in varying_keys(rows):
        seeds = markdown(*seed_table(rows, metrics, args.compare))
        (out / "results_by_seed.md").write_text(seeds)
        print(f"\nover seeds: mean [min, max] (seeds); best of each {args.compare} comparison in bold, ≈ inside "
              f"its spread\n{seeds}", end="")
    for path in write_plots(rows, out):
        print(f"plot: {path}")


if __name__ == "__main__":
    main()
