"""The results table from sweep directories."""

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
    assert out.splitlines()[0] == "| criterion | sparsity | token_perplexity |"
    assert "| plainact | 0.3 | 31 |" in out and "| l2_norm | 0.5 | 52 |" in out
    rows = list(csv.reader((tmp_path / "a" / "results.csv").open()))
    assert rows[0] == ["criterion", "sparsity", "token_perplexity"] and len(rows) == 4
    table = (tmp_path / "a" / "results.md").read_text()
    assert out.startswith(table)
    assert out[len(table):].split() == ["plot:", str(tmp_path / "a" / "token_perplexity_by_criterion.png"),
                                        "plot:", str(tmp_path / "a" / "token_perplexity_by_predictor.png")]
    assert (tmp_path / "a" / "token_perplexity_by_criterion.png").read_bytes()[:4] == b"\x89PNG"


def test_plots_average_repeats_and_split_lines_by_the_varying_keys():
    from shadow.report import plot_layers, plot_metric

    def row(criterion, predictor, sparsity, acc, seed=0):
        return {"model": "opt-mini", "criterion": criterion, "criterion_variant": "textbook", "predictor": predictor,
                "policy": "global", "dense_first_layer": False, "sparsity": sparsity, "head_sparsity": sparsity,
                "neuron_sparsity": sparsity, "eval": "tasks", "seed": seed, "tasks/mean_acc": acc,
                "layers": {"head_sparsity": [0.0, sparsity], "neuron_sparsity": [sparsity, 1.0]}}
    rows = [row("plainact", "shadow", 0.5, 0.6), row("plainact", "shadow", 0.5, 0.4),  # the same job twice
            row("plainact", "shadow", 0.3, 0.7), row("l2_norm", "shadow", 0.5, 0.5), row("l2_norm", "dejavu", 0.5, 0.3),
            row("l2_norm", "dejavu", 0.5, 0.2, seed=1)]
    fig = plot_metric(rows, "tasks/mean_acc", "criterion", "predictor")
    panels = {ax.get_title(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                               for line in ax.get_lines()} for ax in fig.axes}
    assert panels["predictor=dejavu"] == {"criterion=l2_norm, seed=0": ([0.5], [0.3]),
                                          "criterion=l2_norm, seed=1": ([0.5], [0.2])}
    assert panels["predictor=shadow"]["criterion=l2_norm, seed=0"] == ([0.5], [0.5])
    assert panels["predictor=shadow"]["criterion=plainact, seed=0"] == ([0.3, 0.5], [0.7, pytest.approx(0.5)])
    heatmap = plot_layers(rows).axes[0].images[0].get_array()
    assert heatmap.shape == (6, 2) and heatmap[2].tolist() == [0.0, 0.3]


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
    panels = [p for section in workspace.sections for p in section.panels]
    assert len(panels) == 10
    for panel in panels:
        assert panel.x.name == "sparsity" and panel.groupby.name in config_keys
        assert [y.name for y in panel.y] and all(y.name in DEFAULT_METRICS for y in panel.y)
    assert [g.name for g in workspace.runset_settings.groupby] == ["criterion", "predictor"]
