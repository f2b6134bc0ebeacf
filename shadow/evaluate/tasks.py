"""Zero- and few-shot tasks through lm-eval's public API, on the sparse model.

``SparseHFLM`` is lm-eval's ``HFLM`` with one change: its log-likelihood requests are scored by
``shadow.evaluate.requests.score`` under contextual masks. Each request's mask is predicted from its context
alone (few-shot examples and prompt), never from the continuation being scored, so every choice of a question
is scored under the same mask. Everything else — tasks, prompts, few-shot sampling, metrics, aggregation — is
lm-eval's own.
"""

from __future__ import annotations

from typing import Any

from lm_eval.models.huggingface import HFLM
from torch import nn

from shadow.config import EvalConfig
from shadow.data import load_tasks
from shadow.evaluate.requests import MaskFn, Request, score
from shadow.models import pad_id
from shadow.policy import SparsityMeter


class SparseHFLM(HFLM):
    def __init__(self, model: nn.Module, tokenizer, mask_fn: MaskFn, batch_size: int, meter: SparsityMeter):
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        self.mask_fn, self.meter = mask_fn, meter

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        window = self.max_length
        ours = []
        for _, context, continuation in requests:
            tokens = (context + continuation)[-(window + 1):]  # lm-eval's truncation: drop context from the left
            ours.append(Request(tokens, min(len(continuation), len(tokens) - 1), context[-window:]))
        nll, greedy = score(self.model, ours, self.mask_fn, override_bs or self.batch_size, pad_id(self.tokenizer),
                            self.meter,
                            "lm-eval requests", progress=not disable_tqdm)
        return [(-n, g) for n, g in zip(nll, greedy, strict=True)]


def check_tasks(cfg: EvalConfig) -> Any:
    """The checked task index (names known, enough few-shot documents): call it before any model loads."""
    return load_tasks(list(cfg.tasks), cfg.include_path, cfg.num_fewshot, "eval")[0]


def evaluate_tasks(model: nn.Module, tokenizer, mask_fn: MaskFn, cfg: EvalConfig, manager: Any,
                   seed: int) -> tuple[dict[str, float], dict[str, list[float]], dict[str, Any]]:
    """Task metrics (``<task>/<metric>`` and ``tasks/mean_acc``), achieved sparsity per layer, lm-eval's output."""
    import lm_eval

    meter = SparsityMeter()
    lm = SparseHFLM(model, tokenizer, mask_fn, cfg.batch_size, meter)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                  task_manager=manager, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    metrics = {f"{task}/{name.split(',')[0]}": value for task, result in out["results"].items()
               for name, value in result.items() if isinstance(value, float) and "stderr" not in name}
    accuracies = [out["results"][task]["acc,none"] for task in cfg.tasks if "acc,none" in out["results"][task]]
    if accuracies:
        metrics["tasks/mean_acc"] = sum(accuracies) / len(accuracies)
    return {**metrics, **meter.overall()}, meter.per_layer(), out
