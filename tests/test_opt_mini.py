"""opt-mini: a real, trained OPT that loads offline, with evaluation data that lm-eval reads from anywhere."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter

import pytest
import torch

from shadow.opt_mini import (
    CALIBRATION_FILE,
    DATA_DIR,
    MODEL_DIR,
    PERPLEXITY_FILE,
    PERPLEXITY_TASK,
    TASK_NAMES,
    TASKS_DIR,
)


@pytest.fixture(scope="module")
def opt_mini():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval(), AutoTokenizer.from_pretrained(MODEL_DIR)


def test_loads_offline_as_a_standard_opt(opt_mini):
    from transformers import OPTForCausalLM

    model, tokenizer = opt_mini
    assert isinstance(model, OPTForCausalLM) and model.config.activation_function == "relu"
    assert 5e6 <= sum(p.numel() for p in model.parameters()) <= 25e6
    layer = model.model.decoder.layers[0]
    assert {"self_attn.out_proj", "fc1", "fc2"} <= {n for n, _ in layer.named_modules()}
    assert model.config.num_hidden_layers >= 4 and model.config.num_attention_heads >= 4
    assert tokenizer("Hello")["input_ids"][0] == model.config.bos_token_id == 2  # OPT's </s> prefix
    assert sum(f.stat().st_size for f in MODEL_DIR.iterdir()) < 30e6


def test_files_match_the_model_card_checksums():
    build = json.loads((MODEL_DIR / "build.json").read_text())
    for name, digest in build["files_sha256"].items():
        assert hashlib.sha256((MODEL_DIR / name).read_bytes()).hexdigest() == digest, name


def test_held_out_perplexity_is_far_below_unigram(opt_mini):
    model, tokenizer = opt_mini
    text = "\n\n".join(json.loads(line)["page"] for line in PERPLEXITY_FILE.read_text().splitlines()[:3])
    ids = torch.tensor(tokenizer(text)["input_ids"][: 16 * 512]).view(16, 512)
    with torch.no_grad():
        model_ppl = math.exp(model(input_ids=ids, labels=ids).loss.item())
    counts = Counter(ids[:, 1:].flatten().tolist())  # a unigram model fitted on the very text it scores
    total = sum(counts.values())
    unigram_ppl = math.exp(-sum(c * math.log(c / total) for c in counts.values()) / total)
    assert model_ppl < unigram_ppl / 3, (model_ppl, unigram_ppl)


def test_splits_share_no_document():
    splits = json.loads((DATA_DIR / "splits.json").read_text())
    seen = [doc for docs in splits.values() for doc in docs]
    assert len(seen) == len(set(seen))
    calibration = {json.loads(x)["doc"] for x in CALIBRATION_FILE.read_text().splitlines()}
    assert calibration <= set(splits["calibration"])
    assert {json.loads(x)["doc"] for x in PERPLEXITY_FILE.read_text().splitlines()} == set(splits["perplexity"])


@pytest.mark.slow
def test_tasks_load_from_any_directory_and_score_above_chance(opt_mini, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)
    model, tokenizer = opt_mini
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert set(TASK_NAMES) | {PERPLEXITY_TASK} <= set(manager.all_tasks)
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=32),
                                  tasks=list(TASK_NAMES), task_manager=manager, limit=200)
    for task in TASK_NAMES:
        acc = out["results"][task]["acc,none"]
        assert acc > 0.25 + 3 * math.sqrt(0.25 * 0.75 / 200), (task, acc)  # three sigmas above chance
