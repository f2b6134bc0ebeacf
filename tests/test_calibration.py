"""Calibration examples: opt-mini's split and lm-eval tasks' documents, as ShadowLLM calibrates.

Local lm-eval tasks of every shape the paper's tasks have (multiple choice, a context per option as in
winogrande) and of every split layout (train, validation and test; test only; validation only), made here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import settings

from shadow.compose import compose_config, validate
from shadow.data import load_calibration
from shadow.errors import ConfigError
from shadow.evaluate.tasks import check_tasks, evaluate_tasks
from shadow.opt_mini import CALIBRATION_FILE


def write_task(directory: Path, name: str, splits: dict[str, list[dict]], body: str) -> None:
    files = {}
    for split, rows in splits.items():
        files[split] = directory / f"{name}_{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    split_keys = {"train": "training_split", "validation": "validation_split", "test": "test_split"}
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        + "".join(f"    {s}: {f}\n" for s, f in files.items())
        + "".join(f"{split_keys[s]}: {s}\n" for s in splits) + body)


CHOICE = """output_type: multiple_choice
doc_to_text: "{{q}}"
doc_to_target: "{{label}}"
doc_to_choice: "{{choices}}"
metric_list:
  - metric: acc
"""
FILL_IN = """output_type: multiple_choice
doc_to_text: "{{label}}"
doc_to_target: "{{rest}}"
doc_to_choice: "{{options}}"
target_delimiter: " "
metric_list:
  - metric: acc
"""


def questions(n: int, tag: str) -> list[dict]:
    return [{"q": f"Question {tag}{i}: which?", "choices": [f"yes{tag}{i}", f"no{tag}{i}"], "label": i % 2}
            for i in range(n)]


def fill_ins(n: int) -> list[dict]:
    """winogrande's shape: the options fill a blank, so each option is a context; the answer is the shared rest."""
    return [{"options": [f"Sentence {i} names Alice", f"Sentence {i} names Bob"], "label": i % 2,
             "rest": f"as the winner of round {i}."} for i in range(8)]


@pytest.fixture
def task_dir(tmp_path):
    # fewshot_split named, as many lm-eval tasks do: lm-eval then keeps a document among its own shots
    write_task(tmp_path, "quiz", {"train": questions(6, "t"), "validation": questions(4, "v")},
               CHOICE + "fewshot_split: train\n")
    write_task(tmp_path, "fillin", {"train": fill_ins(8), "validation": fill_ins(3)}, FILL_IN)
    write_task(tmp_path, "testonly", {"test": questions(5, "x")}, CHOICE)
    write_task(tmp_path, "valonly", {"validation": questions(5, "w")}, CHOICE)
    write_task(tmp_path, "valtest", {"validation": questions(5, "c"), "test": questions(5, "e")}, CHOICE)
    return tmp_path


def calibrate(task_dir: Path, tasks: list[str], tokenizer, shots: int = 0, limit: int | None = None):
    cfg = settings("calibration", source="tasks", tasks=tasks, include_path=str(task_dir), num_fewshot=shots,
                   limit=limit)
    return load_calibration(cfg, tokenizer, 512)


def texts(examples, tokenizer) -> list[tuple[str, str]]:
    return [(tokenizer.decode(e.input_ids[1:e.context_len]), tokenizer.decode(e.input_ids[e.context_len:]))
            for e in examples]


def test_opt_mini_examples_carry_their_document(tokenizer):
    examples = load_calibration(settings("calibration", limit=20), tokenizer, 512)
    rows = [json.loads(line) for line in CALIBRATION_FILE.read_text().splitlines()[:20]]
    assert [e.document for e in examples] == [r["doc"] for r in rows]


def test_multiple_choice_calibrates_on_the_gold_answer(task_dir, tokenizer):
    examples = calibrate(task_dir, ["quiz"], tokenizer)
    assert [t for t in texts(examples, tokenizer)] == [
        (f"Question t{i}: which?", f" {'yes' if i % 2 == 0 else 'no'}t{i}") for i in range(6)]
    assert [e.document for e in examples] == [f"quiz/{i}" for i in range(6)]


def test_a_context_per_option_calibrates_on_the_gold_options_context(task_dir, tokenizer):
    examples = calibrate(task_dir, ["fillin"], tokenizer, shots=2)
    for i, (context, continuation) in enumerate(texts(examples, tokenizer)):
        gold = ["Alice", "Bob"][i % 2]
        assert context.endswith(f"Sentence {i} names {gold}") and continuation == f" as the winner of round {i}."
        assert context.count("as the winner of round") == 2  # the two shots, each with its answer


def test_a_document_is_never_among_its_own_shots(task_dir, tokenizer):
    """Six training documents, five shots: the shots must be exactly the other five, whatever lm-eval samples."""
    for i, (context, _) in enumerate(texts(calibrate(task_dir, ["quiz"], tokenizer, shots=5), tokenizer)):
        assert context.count(f"Question t{i}:") == 1 and context.endswith(f"Question t{i}: which?")
        assert all(context.count(f"Question t{j}:") == 1 for j in range(6))


def test_limit_is_per_task(task_dir, tokenizer):
    examples = calibrate(task_dir, ["quiz", "fillin"], tokenizer, limit=3)
    assert [e.document for e in examples] == ["quiz/0", "quiz/1", "quiz/2", "fillin/0", "fillin/1", "fillin/2"]


def test_sample_from_draws_the_limit_at_random_from_the_first_documents_with_the_seed(task_dir, tokenizer):
    """calibration=paper: 500 of each task's first 2500 training documents, at random with the job's seed, as
    ShadowLLM's code drew them (here 3 of fillin's first 6 of 8)."""
    cfg = settings("calibration=paper", tasks=["fillin"], include_path=str(task_dir), num_fewshot=0, limit=3,
                   sample_from=6)
    drawn = {seed: [e.document for e in load_calibration(cfg, tokenizer, 512, seed)] for seed in range(8)}
    assert all(len(d) == 3 and d == sorted(d, key=lambda name: int(name.split("/")[1])) for d in drawn.values())
    assert {name for d in drawn.values() for name in d} == {f"fillin/{i}" for i in range(6)}  # never past the 6th
    assert len({tuple(d) for d in drawn.values()}) > 4 and drawn[1] == [
        e.document for e in load_calibration(cfg, tokenizer, 512, 1)]
    assert settings("calibration=paper").sample_from == 2500 and settings("calibration=paper").limit == 500
    with pytest.raises(ConfigError, match=r"calibration.sample_from=2 draws calibration.limit=3 examples from the "
                                          r"first 2; set calibration.limit to at most 2"):
        validate(compose_config("+criterion=plainact", "calibration.limit=3", "calibration.sample_from=2"))


def test_calibration_never_reads_the_documents_evaluation_scores(task_dir, tokenizer):
    with pytest.raises(ConfigError, match="calibration.tasks: testonly has no training split, and its test split is "
                                          "what evaluation scores; drop testonly from calibration.tasks"):
        calibrate(task_dir, ["quiz", "testonly"], tokenizer)
    with pytest.raises(ConfigError, match="valonly has no training split, and its validation split is what"):
        calibrate(task_dir, ["valonly"], tokenizer)
    examples = calibrate(task_dir, ["valtest"], tokenizer)  # evaluation scores the test split
    assert [c for c, _ in texts(examples, tokenizer)] == [f"Question c{i}: which?" for i in range(5)]


def test_a_task_with_only_a_test_split_evaluates(task_dir, tiny_opt, tokenizer):
    for shots in (0, 3):  # zero-shot needs no few-shot source; with shots, lm-eval's rule draws from test
        cfg = settings("eval=tasks", tasks=["testonly"], include_path=str(task_dir), num_fewshot=shots)
        metrics, _, out = evaluate_tasks(tiny_opt, tokenizer, lambda requests: None, cfg, check_tasks(cfg), seed=0)
        assert 0 <= metrics["testonly/acc"] <= 1 and out["n-shot"]["testonly"] == shots
    with pytest.raises(ConfigError, match="eval.num_fewshot=5 needs more than the 5 documents of testonly"):
        check_tasks(settings("eval=tasks", tasks=["testonly"], include_path=str(task_dir), num_fewshot=5))
