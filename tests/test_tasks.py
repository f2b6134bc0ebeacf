"""lm-eval on the sparse model: equal to plain HFLM when dense, one mask per context, no leakage."""

from __future__ import annotations

import json

import lm_eval
import pytest
import torch
from helpers import make_tiny_llama, make_tiny_opt, settings, shape_of
from lm_eval.models.huggingface import HFLM

from shadow.errors import ConfigError
from shadow.evaluate.tasks import SparseHFLM, check_tasks, evaluate_tasks
from shadow.placements import PLACEMENTS
from shadow.policy import Policy, SparsityMeter
from shadow.predictors import PredictedMasks, Predictor

FAST = settings("eval=tasks", limit=12, batch_size=8)


@pytest.fixture
def tiny_opt():
    """Long enough for opt-mini's questions: no request is truncated, as lm-eval and we truncate alike."""
    return make_tiny_opt(positions=512)


def make_masker(model):
    def make(sparsity: float) -> PredictedMasks:
        shape = shape_of(model)
        torch.manual_seed(0)
        predictor = Predictor(shape, shape.attention_width, PLACEMENTS["shadow"].groups(shape.layers, 0, False),
                              "mlp", 32, 32, False)
        return PredictedMasks(model, predictor, Policy("global", sparsity, sparsity), 1, "request")
    return make


@pytest.fixture
def masker(tiny_opt):
    return make_masker(tiny_opt)


def requests(tokenizer):
    contexts = ["The ship sailed at dawn", "Parliament met in the autumn and", "To be or not"]
    out = []
    for context in contexts:
        for continuation in [" and the sea was calm", " to debate the tax", " to be"]:
            out.append(((context, continuation), tokenizer(context)["input_ids"],
                        tokenizer(continuation, add_special_tokens=False)["input_ids"]))
    return out


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_dense_masks_give_exactly_plain_hflm(family, tokenizer):
    """OPT with opt-mini's tokenizer (BOS </s>), a Llama with llama-mini's (BOS <s>)."""
    if family == "llama":
        from transformers import AutoTokenizer

        from shadow.llama_mini import MODEL_DIR

        tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = make_tiny_opt(positions=512) if family == "opt" else make_tiny_llama(positions=512)
    masker = make_masker(model)
    plain = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)._loglikelihood_tokens(requests(tokenizer))
    sparse = SparseHFLM(model, tokenizer, masker(0.0), 4, SparsityMeter())
    ours = sparse._loglikelihood_tokens(requests(tokenizer))
    assert [g for _, g in ours] == [g for _, g in plain]
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in plain], rel=1e-5, abs=1e-5)
    out_plain = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8), tasks=list(FAST.tasks),
        limit=FAST.limit, task_manager=check_tasks(FAST))
    metrics, _, out = evaluate_tasks(model, tokenizer, masker(0.0), FAST, check_tasks(FAST), seed=0)
    for task in FAST.tasks:
        assert out["results"][task]["acc,none"] == out_plain["results"][task]["acc,none"]
        assert metrics[f"{task}/acc"] == out_plain["results"][task]["acc,none"]
    assert metrics["tasks/mean_acc"] == pytest.approx(sum(metrics[f"{t}/acc"] for t in FAST.tasks) / 2)


def test_one_mask_per_context_whatever_the_choice(tiny_opt, tokenizer, masker):
    seen: dict[tuple, list] = {}
    inner = masker(0.5)

    def recording(reqs):
        masks = inner(reqs)
        for i, r in enumerate(reqs):
            seen.setdefault(tuple(r.prompt), []).append((masks.heads[i], masks.neurons[i]))
        return masks

    SparseHFLM(tiny_opt, tokenizer, recording, 4, SparsityMeter())._loglikelihood_tokens(requests(tokenizer))
    assert len(seen) == 3 and all(len(v) == 3 for v in seen.values())  # prompts are the contexts alone
    for masks in seen.values():  # every choice of a question under the same mask: nothing leaks from answers
        assert all(torch.equal(h, masks[0][0]) and torch.equal(n, masks[0][1]) for h, n in masks)
    firsts = [v[0][1] for v in seen.values()]
    assert not torch.equal(firsts[0], firsts[1]) or not torch.equal(firsts[1], firsts[2])


def test_task_directory_outside_the_project(tiny_opt, tokenizer, masker, tmp_path):
    data = tmp_path / "capitals.jsonl"
    rows = [{"q": f"Question {i}: the capital of France is", "choices": [" Paris", " Rome"], "label": 0}
            for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "capitals.yaml").write_text(f"""task: capitals
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
""")
    cfg = settings("eval=tasks", tasks=["capitals"], include_path=str(tmp_path))
    metrics, layers, _ = evaluate_tasks(tiny_opt, tokenizer, masker(0.5), cfg, check_tasks(cfg), seed=0)
    assert 0.0 <= metrics["capitals/acc"] <= 1.0 and metrics["achieved_head_sparsity"] == pytest.approx(0.5)
    assert len(layers["head_sparsity"]) == tiny_opt.config.num_hidden_layers


@pytest.mark.parametrize("overrides,message", [
    ({"tasks": ["no_such_task_here"]}, "eval.tasks: no_such_task_here unknown to lm-eval"),
    ({"include_path": "/nonexistent/tasks"}, "eval.include_path='/nonexistent/tasks' is not a directory"),
    ({"num_fewshot": 10_000}, "eval.num_fewshot=10000 needs more than the 200 documents of opt_mini_nextsent"),
])
def test_bad_task_settings_fail_before_any_model_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_tasks(settings("eval=tasks", **overrides))
