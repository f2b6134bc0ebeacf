"""Calibration examples: a context and its gold continuation, tokenized and batched with a loss mask.

Two sources: opt-mini's own calibration split (``calibration.source=opt_mini``), or the training split of any
lm-eval tasks (``calibration.source=tasks``) with lm-eval's few-shot contexts and the gold answer as the
continuation, as ShadowLLM calibrates on piqa, copa, openbookqa, winogrande, rte, hellaswag and arc_easy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shadow.config import CalibrationConfig, ConfigError
from shadow.opt_mini import CALIBRATION_FILE, TASKS_DIR


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]  # context (starting with the tokenizer's BOS) + continuation
    context_len: int  # the loss covers input_ids[context_len:]


@dataclass
class Batch:
    input_ids: Tensor  # (B, T), right-padded
    attention_mask: Tensor  # (B, T)
    labels: Tensor  # (B, T): the continuation's token ids, -100 elsewhere
    last_context: Tensor  # (B,) index of each example's last context token: the predictor reads it


def fingerprint(examples: list[Example]) -> str:
    """What the traces depend on: exactly these token sequences and loss masks."""
    return hashlib.sha256(json.dumps([(e.input_ids, e.context_len) for e in examples]).encode()).hexdigest()


def encode(context: str, continuation: str, tokenizer, max_length: int) -> Example:
    """Context with BOS, continuation without; contexts too long lose tokens from the left, after BOS."""
    ctx = tokenizer(context)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"][: max_length - 2]
    overflow = len(ctx) + len(cont) - max_length
    if overflow > 0:
        ctx = ctx[:1] + ctx[1 + overflow:]
    return Example(tuple(ctx + cont), len(ctx))


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
    loaded = get_task_dict(list(tasks), manager)
    for name in tasks:
        task = loaded[name]
        docs = task.training_docs() if task.has_training_docs() else task.validation_docs()
        if num_fewshot >= len(docs):
            raise ConfigError(f"{key}.num_fewshot={num_fewshot} needs more than the {len(docs)} documents of {name}; "
                              f"lower {key}.num_fewshot")
    return manager, loaded


def task_pairs(cfg: CalibrationConfig) -> list[tuple[str, str]]:
    """(few-shot context, delimiter + gold answer) for the first ``limit`` training documents of each task."""
    _, tasks = load_tasks(list(cfg.tasks), cfg.include_path, cfg.num_fewshot, "calibration")
    pairs = []
    for name in cfg.tasks:
        task = tasks[name]
        docs = task.training_docs() if task.has_training_docs() else task.validation_docs()
        for doc in list(docs)[: cfg.limit]:
            target = task.doc_to_target(doc)
            if task.OUTPUT_TYPE == "multiple_choice" and isinstance(target, int):
                target = task.doc_to_choice(doc)[target]
            pairs.append((task.fewshot_context(doc, cfg.num_fewshot), task.config.target_delimiter + str(target)))
    return pairs


def load_calibration(cfg: CalibrationConfig, tokenizer, model_max_length: int) -> list[Example]:
    if cfg.source == "tasks":
        pairs = task_pairs(cfg)
    else:
        rows = [json.loads(line) for line in CALIBRATION_FILE.read_text().splitlines() if line.strip()]
        pairs = [(r["context"], r["continuation"]) for r in rows[: cfg.limit]]
    max_length = min(cfg.max_length or model_max_length, model_max_length)
    return [encode(context, continuation, tokenizer, max_length) for context, continuation in pairs]


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
