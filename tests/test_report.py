"""The results table from sweep directories."""

from __future__ import annotations

import csv
import json
import subprocess
import sys


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
    assert (tmp_path / "a" / "results.md").read_text() == out


def test_report_names_a_missing_results_file(tmp_path):
    result = subprocess.run([sys.executable, "-m", "shadow.report", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {tmp_path}/results.jsonl does not exist; pass a sweep directory " \
                                    "that holds results.jsonl"
