"""Calibration examples: a context and its gold continuation, tokenized and batched with a loss mask."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import Tensor

from shadow.config import CalibrationConfig
from shadow.opt_mini import CALIBRATION_FILE


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


def data_fingerprint(cfg: CalibrationConfig) -> dict:
    return {"file": CALIBRATION_FILE.name, "sha256": hashlib.sha256(CALIBRATION_FILE.read_bytes()).hexdigest(),
            "limit": cfg.limit, "max_length": cfg.max_length}


def encode(context: str, continuation: str, tokenizer, max_length: int) -> Example:
    """Context with BOS, continuation without; contexts too long lose tokens from the left, after BOS."""
    ctx = tokenizer(context)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"][: max_length - 2]
    overflow = len(ctx) + len(cont) - max_length
    if overflow > 0:
        ctx = ctx[:1] + ctx[1 + overflow:]
    return Example(tuple(ctx + cont), len(ctx))


def load_calibration(cfg: CalibrationConfig, tokenizer, model_max_length: int) -> list[Example]:
    rows = [json.loads(line) for line in CALIBRATION_FILE.read_text().splitlines() if line.strip()]
    rows = rows[: cfg.limit] if cfg.limit else rows
    max_length = min(cfg.max_length or model_max_length, model_max_length)
    return [encode(r["context"], r["continuation"], tokenizer, max_length) for r in rows]


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
