"""Calibration examples: a context and its gold continuation, tokenized and batched with a loss mask.

Two sources: opt-mini's own calibration split (``calibration.source=opt_mini``), or the training split of any
lm-eval tasks (``calibration.source=tasks``) with lm-eval's few-shot contexts and the gold answer as the
continuation, as ShadowLLM calibrates on piqa, copa, openbookqa, winogrande, rte, hellaswag and arc_easy.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shadow.config import CalibrationConfig
from shadow.errors import ConfigError
from shadow.opt_mini import CALIBRATION_FILE, TASKS_DIR


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]  # context (starting with the tokenizer's BOS) + continuation
    context_len: int  # the loss covers input_ids[context_len:]
    document: str = ""  # where it comes from: examples of one document stay on one side of a held-out split


@dataclass
class Batch:
    input_ids: Tensor  # (B, T), right-padded
    attention_mask: Tensor  # (B, T)
    labels: Tensor  # (B, T): the continuation's token ids, -100 elsewhere
    last_context: Tensor  # (B,) index of each example's last context token: the predictor reads it


def examples_fingerprint(examples: list[Example]) -> str:
    """What the traces depend on: exactly these token sequences and loss masks."""
    return hashlib.sha256(json.dumps([(e.input_ids, e.context_len) for e in examples]).encode()).hexdigest()


def encode(context: str, continuation: str, tokenizer, max_length: int, document: str = "") -> Example:
    """Context with BOS, continuation without; contexts too long lose tokens from the left, after BOS."""
    ctx = tokenizer(context)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"][: max_length - 2]
    overflow = len(ctx) + len(cont) - max_length
    if overflow > 0:
        ctx = ctx[:1] + ctx[1 + overflow:]
    return Example(tuple(ctx + cont), len(ctx), document)


def load_tasks(tasks: list[str], include_path: str | None, num_fewshot: int, key: str) -> tuple[Any, dict]:
    """lm-eval's task index and the loaded tasks, checked: names known, enough documents for the few-shot
    examples. The index has opt-mini's tasks and ``include_path``, and lm-eval's own only when a task needs
    them (indexing those takes seconds). ``key`` names the config section in errors."""
    from lm_eval.tasks import TaskManager, get_task_dict

    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"{key}.include_path={include_path!r} is not a directory; point it at a folder of lm-eval "
                          "task YAML files")
    paths = [str(TASKS_DIR)] + ([include_path] if include_path else [])
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not all(t in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"{key}.tasks: {', '.join(unknown)} unknown to lm-eval; use an lm-eval task name "
                          f"(e.g. piqa) or add its directory with {key}.include_path")
    try:
        loaded = get_task_dict(list(tasks), manager)
    except ConnectionError as err:  # datasets' error when a task's data is neither cached nor reachable
        raise ConfigError(f"{key}.tasks: {err}; fetch the task's data where the hub is reachable, or name tasks "
                          f"whose data is local ({key}.include_path)") from None
    if num_fewshot > 0:
        for name in tasks:
            shots = loaded[name].fewshot_docs()  # lm-eval's rule: the few-shot split, else train, validation, test
            if shots is None:
                raise ConfigError(f"{key}.num_fewshot={num_fewshot}: {name} has no split to draw few-shot examples "
                                  f"from; use {key}.num_fewshot=0")
            if num_fewshot >= len(shots):
                raise ConfigError(f"{key}.num_fewshot={num_fewshot} needs more than the {len(shots)} documents of "
                                  f"{name}; lower {key}.num_fewshot")
    return manager, loaded


@functools.cache
def known_tasks(tasks: tuple[str, ...], include_path: str | None, num_fewshot: int, key: str) -> Any:
    """lm-eval's checked task index (``load_tasks``), built once per setting in a process: the check before a
    job and its evaluation share it."""
    return load_tasks(list(tasks), include_path, num_fewshot, key)[0]


def calibration_docs(task, name: str) -> list:
    """The documents a task calibrates on: its training split, or its validation split when evaluation scores the
    test split. Never documents that evaluation scores."""
    if task.has_training_docs():
        return list(task.training_docs())
    if task.has_validation_docs() and task.has_test_docs():
        return list(task.validation_docs())
    scored = "validation" if task.has_validation_docs() else "test"
    raise ConfigError(f"calibration.tasks: {name} has no training split, and its {scored} split is what evaluation "
                      f"scores; drop {name} from calibration.tasks or calibrate on another task")


@contextmanager
def shots_without(task, doc: dict) -> Iterator[None]:
    """Inside the block, the task's few-shot examples never include ``doc`` itself (with its answer): lm-eval
    excludes it only when shots and evaluation share a split, and calibration reads the training split."""
    sampler = task.sampler
    sample = sampler.sample
    sampler.sample = lambda n, eval_doc=None, **kwargs: sample(n, eval_doc=doc, **kwargs)
    try:
        yield
    finally:
        del sampler.sample  # the class's own method again


def gold_pair(task, doc: dict, num_fewshot: int) -> tuple[str, str]:
    """(few-shot context, delimiter + gold answer) of one document. A task with a context per option
    (winogrande: the options fill a blank, the answer is the shared rest) contributes its gold option's context."""
    with shots_without(task, doc) if num_fewshot > 0 else nullcontext():
        context = task.fewshot_context(doc, num_fewshot)
    target = task.doc_to_target(doc)
    if isinstance(context, list):
        context = context[task.doc_to_text(doc)]  # lm-eval's gold index for multiple-input tasks
    elif task.OUTPUT_TYPE == "multiple_choice" and isinstance(target, int):
        target = task.doc_to_choice(doc)[target]
    return context, task.config.target_delimiter + str(target)


def chosen(count: int, cfg: CalibrationConfig, seed: int) -> list[int]:
    """Which of ``count`` documents in file order calibrate: the first ``limit``, or with ``sample_from``, ``limit``
    drawn at random (seeded by the job's seed) from the first ``sample_from``, in file order."""
    if cfg.sample_from is None:
        return list(range(count))[: cfg.limit]
    pool = min(count, cfg.sample_from)
    return sorted(random.Random(seed).sample(range(pool), min(cfg.limit, pool)))


def task_examples(cfg: CalibrationConfig, seed: int = 0) -> list[tuple[str, str, str]]:
    """(context, continuation, document id) for the calibration documents of each task (``chosen``)."""
    _, tasks = load_tasks(list(cfg.tasks), cfg.include_path, cfg.num_fewshot, "calibration")
    docs = {name: calibration_docs(tasks[name], name) for name in cfg.tasks}  # every task checked before work
    return [(*gold_pair(tasks[name], docs[name][index], cfg.num_fewshot), f"{name}/{index}")
            for name in cfg.tasks for index in chosen(len(docs[name]), cfg, seed)]


def load_calibration(cfg: CalibrationConfig, tokenizer, model_max_length: int, seed: int = 0) -> list[Example]:
    """The calibration examples, each tagged with the document it comes from (the predictor's held-out split is
    by document); ``seed``: the job's, for ``calibration.sample_from``."""
    if cfg.source == "tasks":
        rows = task_examples(cfg, seed)
    else:
        lines = [json.loads(line) for line in CALIBRATION_FILE.read_text().splitlines() if line.strip()]
        rows = [(lines[i]["context"], lines[i]["continuation"], lines[i]["doc"])
                for i in chosen(len(lines), cfg, seed)]
    max_length = min(cfg.max_length or model_max_length, model_max_length)
    return [encode(context, continuation, tokenizer, max_length, document)
            for context, continuation, document in rows]


def pad(sequences: list[list[int]] | list[tuple[int, ...]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded (B, T) ids and attention mask."""
    ids = torch.full((len(sequences), max(map(len, sequences))), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, :len(seq)] = torch.tensor(seq)
        attention[i, :len(seq)] = 1
    return ids, attention


def collate(examples: list[Example], pad_id: int) -> Batch:
    ids, mask = pad([e.input_ids for e in examples], pad_id)
    labels = torch.full_like(ids, -100)
    for i, e in enumerate(examples):
        labels[i, e.context_len:len(e.input_ids)] = ids[i, e.context_len:len(e.input_ids)]
    last = torch.tensor([e.context_len - 1 for e in examples])
    return Batch(ids, mask, labels, last)
