"""docs/your-model.md, run as written: its task files, its command on a checkpoint of one's own."""

from __future__ import annotations

import json
import re
import shutil

import torch
from helpers import ROOT, make_tiny_llama, run_shadow

from shadow.compose import compose_config, model_name

DOC = ROOT / "docs" / "your-model.md"
QUICK = "logger=none calibration.limit=8 predictor.head_epochs=2 predictor.neuron_epochs=1"


def test_the_documented_recipe_runs_on_ones_own_model(tmp_path):
    doc = DOC.read_text()
    files = re.findall(r"```\w+\n# (my-tasks/\S+)\n(.*?)```", doc, re.S)
    assert [name for name, _ in files] == ["my-tasks/capitals.yaml", "my-tasks/capitals.jsonl"]
    for name, text in files:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    make_tiny_llama(kv_heads=2, dtype=torch.bfloat16).save_pretrained(tmp_path / "my-model")
    for tokenizer in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "shadow" / "llama_mini" / "model" / tokenizer, tmp_path / "my-model")
    command = next(line for line in doc.splitlines() if line.startswith("python -m shadow") and "my-tasks" in line)
    result = run_shadow(f"{command.removeprefix('python -m shadow ')} {QUICK}", tmp_path,
                        SHADOW_CACHE_DIR=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for path in tmp_path.glob("multirun/*/*/results.jsonl")
               for line in path.read_text().splitlines()]
    assert sorted((r["predictor"], r["sparsity"]) for r in records) == [
        ("shadow", 0.3), ("shadow", 0.5), ("teal", 0.3), ("teal", 0.5)]
    for record in records:
        assert record["model"] == "my-model" and record["dtype"] == "bfloat16"  # named by its path, dtype its own
        assert 0 <= record["metrics"]["capitals/acc"] <= 1 and record["lm_eval"]["capitals"]["alias"] == "capitals"


def test_a_model_is_named_by_its_preset_or_its_checkpoint(tmp_path):
    assert compose_config().model.name == "opt-mini"
    assert compose_config("model=opt-13b").model.name == "opt-13b"
    assert compose_config("model=opt-13b", "model.path=/models/My-OPT/").model.name == "my-opt"
    assert compose_config(f"model.path={ROOT}/shadow/llama_mini/model").model.name == "llama-mini"
    assert compose_config("model.path=./weights/Tiny.Q4_1.gguf", "model.name=tiny").model.name == "tiny"
    assert model_name("./weights/Tiny.Q4_1.gguf") == "tiny.q4_1" and model_name("Qwen/Qwen2.5-7B") == "qwen2.5-7b"
