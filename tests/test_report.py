"""The results table and plots from sweep directories."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest


def write_sweep(directory, rows):
    directory.mkdir()
    lines = [json.dumps({"model": "opt-mini", "criterion": c, "predictor": "shadow", "sparsity": s,
                         "metrics": {"token_perplexity": p}}) for c, s, p in rows]
    (directory / "results.jsonl").write_text("\n".join(lines) + "\n")


def test_report_writes_csv_and_markdown_of_the_varying_keys(tmp_path):
    write_sweep(tmp_path / "a", [("plainact", 0.5, 40.25), ("plainact", 0.3, 31.0)])
    write_sweep(tmp_path / "b", [("l2_norm", 0.5, 52.0)])
    out = subprocess.run([sys.executable, "-m", "shadow.report", str(tmp_path / "a"), str(tmp_path / "b"),
                          "--metrics", "token_perplexity"], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[:3] == ["every job: model=opt-mini, predictor=shadow", "",
                                    "| criterion | sparsity | token_perplexity |"]
    assert "| plainact | 0.3 | 31 |" in out and "| l2_norm | 0.5 | 52 |" in out
    rows = list(csv.reader((tmp_path / "a" / "results.csv").open()))
    assert rows[0] == ["criterion", "sparsity", "token_perplexity"] and len(rows) == 4
    table = (tmp_path / "a" / "results.md").read_text()
    assert out.startswith(table)
    assert out[len(table):].split() == ["plot:", str(tmp_path / "a" / "token_perplexity.png"),
                                        "plot:", str(tmp_path / "a" / "token_perplexity.pdf")]
    assert (tmp_path / "a" / "token_perplexity.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "a" / "token_perplexity.pdf").read_bytes()[:4] == b"%PDF"


def test_the_table_has_weights_read_drops_what_every_job_shares_and_refuses_unknown_metrics(tmp_path):
    lines = [{"model": "opt-mini", "criterion": "plainact", "predictor": "shadow", "sparsity": s, "seed": 0,
              "metrics": {"token_perplexity": p, "weights_read": 1 - s / 2, "kv_read": 0.5}}
             for s, p in ((0.3, 95.0), (0.5, 107.0))]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = subprocess.run([sys.executable, "-m", "shadow.report", str(tmp_path)], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[:4] == ["every job: model=opt-mini, criterion=plainact, predictor=shadow, seed=0, kv_read=0.5",
                       "", "| sparsity | token_perplexity | weights_read |", "|---|---|---|"]
    typo = subprocess.run([sys.executable, "-m", "shadow.report", str(tmp_path), "--metrics",
                           "token_perplexiti,weights_read"], capture_output=True, text=True)
    assert typo.returncode == 1 and typo.stderr == (
        "error: --metrics token_perplexiti: no job recorded it; did you mean token_perplexity? recorded: "
        "kv_read, token_perplexity, weights_read\n")


def job(criterion="plainact", predictor="shadow", sparsity=0.5, seed=0, head=None, policy="global", layers=2,
        method=None, **metrics):
    """A row as load_rows reads it: the config keys, the metrics and the achieved sparsity per layer."""
    head = sparsity if head is None else head
    return {"model": "opt-mini", "criterion": criterion, "criterion_variant": "textbook", "predictor": predictor,
            "method": method,
            "policy": policy, "dense_first_layer": False, "sparsity": sparsity, "head_sparsity": head,
            "neuron_sparsity": sparsity, "eval": "tasks", "seed": seed, **metrics,
            "layers": {"head_sparsity": [head] * layers, "neuron_sparsity": [sparsity + seed / 10] * layers}}


def lines_of(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_labels_name_only_the_keys_that_vary():
    from shadow.report import label, varying_keys

    rows = [job(sparsity=0.3), job(sparsity=0.5, head=0.3), job("l2_norm", "static", 0.5, seed=1)]
    keys = varying_keys(rows)
    assert keys == ["criterion", "predictor", "sparsity", "head_sparsity", "neuron_sparsity", "seed"]
    assert [label(r, keys) for r in rows] == ["plainact, shadow, s=0.3, seed=0",
                                              "plainact, shadow, s=0.5, heads=0.3, seed=0",
                                              "l2_norm, static, s=0.5, seed=1"]
    assert label({"compat": "reference", "policy": "local", "model": "opt-mini"},
                 ["model", "policy", "compat"]) == "opt-mini, policy=local, compat=reference"
    assert label(job(), []) == "all"


def test_seeds_are_one_line_at_their_mean_in_a_min_max_band():
    from matplotlib.colors import to_rgb

    from shadow.report import Point, plot_quality, series

    rows = [job(sparsity=0.3, seed=0, acc=0.7), job(sparsity=0.3, seed=1, acc=0.6), job(sparsity=0.3, seed=2, acc=0.8),
            job(sparsity=0.5, seed=0, acc=0.5), job(sparsity=0.5, seed=1, acc=0.4), job(sparsity=0.5, seed=2, acc=0.45),
            job("l2_norm", sparsity=0.5, acc=0.3)]
    assert series(rows, "acc", ["criterion"]) == {
        "plainact": [Point(0.3, pytest.approx(0.7), 0.6, 0.8), Point(0.5, pytest.approx(0.45), 0.4, 0.5)],
        "l2_norm": [Point(0.5, 0.3, 0.3, 0.3)]}
    ax, = plot_quality(rows, "acc").axes  # no weights read recorded: the sparsity panel alone
    assert lines_of(ax) == {"shadow, plainact": ([0.3, 0.5], [pytest.approx(0.7), pytest.approx(0.45)]),
                            "shadow, l2_norm": ([0.5], [0.3])}
    band, = ax.collections  # l2_norm ran once: no band
    assert band.get_gid() == "band"
    assert {tuple(v) for v in band.get_paths()[0].vertices} == {(0.3, 0.6), (0.3, 0.8), (0.5, 0.4), (0.5, 0.5)}
    plainact, = (line for line in ax.get_lines() if line.get_label() == "shadow, plainact")
    assert tuple(band.get_facecolor()[0][:3]) == pytest.approx(to_rgb(plainact.get_color()))


def panels_of(fig) -> dict[tuple[str, str], object]:
    return {(ax.get_title(), ax.get_xlabel().split()[0]): ax for ax in fig.axes}


def test_quality_against_weights_read_per_model_with_dense_and_the_pareto_frontier():
    """A row of panels per model, each method one colour in all of them; against weights read, points at their
    repeats' mean, dense a star at 1.0 and a dotted line, the frontier through what no other point beats."""
    from shadow.report import plot_quality

    rows = [job(predictor="teal", method="teal", sparsity=0.5, seed=0, token_perplexity=60.0, weights_read=0.62),
            job(predictor="teal", method="teal", sparsity=0.5, seed=1, token_perplexity=64.0, weights_read=0.64),
            job(predictor="shadow", sparsity=0.5, token_perplexity=70.0, weights_read=0.65),
            job(predictor="shadow", sparsity=0.3, token_perplexity=55.0, weights_read=0.8),
            job(predictor="dense", sparsity=0.0, token_perplexity=50.0, weights_read=1.0),
            {**job(predictor="shadow", sparsity=0.5, token_perplexity=130.0, weights_read=0.6), "model": "llama-mini",
             "dense/token_perplexity": 100.0}]
    fig = plot_quality(rows, "token_perplexity")
    panels = panels_of(fig)
    assert list(panels) == [("llama-mini (dense 100.0)", "sparsity"), ("llama-mini (dense 100.0)", "weights"),
                            ("opt-mini (dense 50.0)", "sparsity"), ("opt-mini (dense 50.0)", "weights")]
    read = panels["opt-mini (dense 50.0)", "weights"]
    assert lines_of(read)["teal"] == ([pytest.approx(0.63)], [pytest.approx(62.0)])
    assert lines_of(read)["shadow, plainact"] == ([0.65, 0.8], [70.0, 55.0])
    dense = [line for line in read.get_lines() if line.get_gid() == "dense"]
    assert {(tuple(line.get_xdata()), tuple(line.get_ydata())) for line in dense} == {((0, 1), (50.0, 50.0)),
                                                                                       ((1.0,), (50.0,))}
    front, = (line for line in read.get_lines() if line.get_gid() == "frontier")
    assert list(zip(front.get_xdata(), front.get_ydata(), strict=True)) == [
        (pytest.approx(0.63), pytest.approx(62.0)), (0.8, 55.0), (1.0, 50.0)]  # shadow at 0.65 reads more for less
    assert [line.get_ydata()[0] for line in panels["opt-mini (dense 50.0)", "sparsity"].get_lines()
            if line.get_gid() == "dense"] == [50.0]  # from the dense job
    assert [line.get_ydata()[0] for line in panels["llama-mini (dense 100.0)", "sparsity"].get_lines()
            if line.get_gid() == "dense"] == [100.0]  # from the jobs' recorded dense evaluation
    colours = {(key, line.get_label()): line.get_color() for key, ax in panels.items() for line in ax.get_lines()}
    assert len({c for (_, name), c in colours.items() if name == "shadow, plainact"}) == 1
    legend, = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["shadow, plainact", "teal", "dense", "Pareto frontier"]


def test_frontier_keeps_what_no_point_beats():
    from shadow.report import frontier

    points = [(0.5, 80.0), (0.6, 90.0), (0.7, 70.0), (0.7, 75.0), (1.0, 60.0)]
    assert frontier(points, -1) == [(0.5, 80.0), (0.7, 70.0), (1.0, 60.0)]
    assert frontier([(0.5, 0.6), (0.6, 0.5), (0.8, 0.7)], +1) == [(0.5, 0.6), (0.8, 0.7)]


def test_other_varying_keys_split_a_methods_lines_and_the_oracle_is_dashed():
    from shadow.report import plot_quality

    rows = [job("plainact", "shadow", policy="global", acc=0.6), job("plainact", "shadow", policy="local", acc=0.5),
            job("l2_norm", "shadow", acc=0.4), job("l2_norm", "shadow", head=0.3, acc=0.2),
            job("plainact", "oracle", acc=0.7)]
    ax, = plot_quality(rows, "acc").axes
    styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
    assert styles == {"oracle, plainact, policy=global": "--", "shadow, l2_norm, policy=global": "-",
                      "shadow, l2_norm, policy=global, heads=0.3": "-", "shadow, plainact, policy=global": "-",
                      "shadow, plainact, policy=local": "-"}
    assert len({line.get_color() for line in ax.get_lines()}) == 5


def test_perplexity_ticks_read_as_plain_numbers():
    from shadow.report import log_ticks, plot_quality

    assert log_ticks(27, 650) == [30, 50, 100, 200, 300, 500]
    wide = [job(sparsity=s, token_perplexity=p) for s, p in ((0.3, 31.0), (0.5, 117.5), (0.7, 612.0))]
    narrow = [job(sparsity=s, token_perplexity=p) for s, p in ((0.3, 101.0), (0.5, 117.5), (0.7, 131.0))]
    for rows, scale in ((wide, "log"), (narrow, "linear")):
        fig = plot_quality(rows, "token_perplexity")
        fig.canvas.draw()
        ax = fig.axes[0]
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        assert ax.get_yscale() == scale and len(labels) >= 4
        assert all(label.isdigit() for label in labels), labels  # 100, not 1×10² nor $\mathdefault{10^{2}}$
        assert not any(t.get_text() for t in ax.get_yticklabels(minor=True))
        assert ax.yaxis.get_offset_text().get_text() == ""


def test_heatmap_grows_with_layers_and_jobs_and_annotates_only_small_ones():
    from shadow.report import plot_layers

    small = [job(sparsity=s, seed=seed, layers=4) for s in (0.3, 0.5) for seed in (0, 1)] + [job(predictor="dense")]
    fig = plot_layers(small)
    heads, neurons, colorbar = fig.axes
    assert [t.get_text() for t in heads.get_yticklabels()] == ["s=0.3", "s=0.5"]  # seeds averaged, dense left out
    assert neurons.images[0].get_array().tolist() == [[pytest.approx(0.35)] * 4, [pytest.approx(0.55)] * 4]
    assert len(heads.texts) == len(neurons.texts) == 2 * 4 and heads.texts[0].get_text() == "0.30"
    assert colorbar.get_ylabel() == "achieved sparsity"
    big = [job(c, p, s, layers=64) for c in ("plainact", "l2_norm", "snip") for p in ("shadow", "static", "oracle")
           for s in (0.3, 0.5, 0.7)]
    large = plot_layers(big)
    assert not large.axes[0].texts and large.axes[0].images[0].get_array().shape == (27, 64)
    assert large.get_figwidth() > fig.get_figwidth() and large.get_figheight() > 3 * fig.get_figheight()
    assert len([t for t in large.axes[0].get_xticks() if 0 <= t < 64]) <= 17
    assert large.axes[0].get_yticklabels()[0].get_text() == "l2_norm, oracle, s=0.3"


def test_report_names_a_missing_results_file(tmp_path):
    result = subprocess.run([sys.executable, "-m", "shadow.report", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {tmp_path}/results.jsonl does not exist; pass a sweep directory " \
                                    "that holds results.jsonl"


def test_wandb_workspace_uses_the_keys_runs_log(compose_cfg):
    from shadow.report import DEFAULT_METRICS
    from shadow.tracking import flat_config
    from shadow.workspace import build_workspace

    config_keys = set(flat_config(compose_cfg("+criterion=plainact")))
    workspace = build_workspace("someone", "shadow")
    first, *others = workspace.sections
    assert first.name == "Quality against weights read"
    for panel in first.panels:
        assert panel.x.name == "weights_read" and panel.groupby is None  # grouped as the runs are
        assert [y.name for y in panel.y] in (["tasks/mean_acc"], ["token_perplexity"], ["word_perplexity"])
    assert [g.name for g in workspace.runset_settings.groupby] == ["model", "method"]
    assert {g.name for g in workspace.runset_settings.groupby} <= config_keys
    panels = [p for section in others for p in section.panels]
    assert len(panels) == 10
    for panel in panels:
        assert panel.x.name == "sparsity" and panel.groupby.name in config_keys
        assert [y.name for y in panel.y] and all(y.name in DEFAULT_METRICS for y in panel.y)


def test_the_seed_table_marks_differences_inside_the_spread():
    """Seeds aggregate into mean [min, max] (n); within each sparsity the best predictor is bold, one whose band
    overlaps it is marked ≈, one clear of it is not; a metric where less is better ranks the other way."""
    from shadow.report import seed_table

    rows = [job(predictor="shadow", seed=s, token_perplexity=p) for s, p in enumerate((80.0, 82.0, 84.0))]
    rows += [job(predictor="dejavu", seed=s, token_perplexity=p) for s, p in enumerate((83.0, 85.0, 87.0))]
    rows += [job(predictor="static", token_perplexity=95.0)]
    rows += [job(predictor="shadow", sparsity=0.7, seed=s, token_perplexity=p) for s, p in enumerate((100, 101))]
    rows += [job(predictor="static", sparsity=0.7, token_perplexity=100.8)]
    columns, body = seed_table(rows, ["token_perplexity", "acc"])
    assert columns[-1] == "token_perplexity" and "seed" not in columns  # acc: in no row
    cells = {(row[columns.index("predictor")], row[columns.index("sparsity")]): row[-1] for row in body}
    assert cells["shadow", 0.5] == "**82 [80, 84] (3)**"
    assert cells["dejavu", 0.5] == "≈ 85 [83, 87] (3)"  # 83 ≤ 84: inside shadow's band
    assert cells["static", 0.5] == "95"  # clear of it
    assert cells["shadow", 0.7] == "**100.5 [100, 101] (2)**" and cells["static", 0.7] == "≈ 100.8"
    columns, body = seed_table([job(predictor="shadow", acc=0.6, weights_read=0.5),
                                job(predictor="dejavu", acc=0.7, weights_read=0.6)], ["acc", "weights_read"])
    assert [row[-2:] for row in body] == [["**0.7**", "0.6"], ["0.6", "0.5"]]  # more is better; what a run reads is
    # not a quality; a single run is a point


def test_a_job_run_again_into_its_sweep_counts_once(tmp_path):
    """A resumed sweep appends a job's line again: the table and the seed bands count it once, as last run."""
    from shadow.report import load_rows

    tmp_path.joinpath("s").mkdir()
    line = {"model": "opt-mini", "criterion": "plainact", "predictor": "shadow", "sparsity": 0.5}
    lines = [{**line, "output_dir": "s/0", "metrics": {"token_perplexity": 50.0}},
             {**line, "output_dir": "s/1", "seed": 1, "metrics": {"token_perplexity": 60.0}},
             {**line, "output_dir": "s/0", "metrics": {"token_perplexity": 52.0}}]
    (tmp_path / "s" / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert sorted(r["token_perplexity"] for r in load_rows([tmp_path / "s"])) == [52.0, 60.0]
