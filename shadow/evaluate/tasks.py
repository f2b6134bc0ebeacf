"""Zero- and few-shot tasks through lm-eval's public API, on the sparse model.

``SparseHFLM`` is lm-eval's ``HFLM`` with one change: its log-likelihood requests are scored by
``shadow.evaluate.requests.score`` under contextual masks. Each request's mask is predicted from its context
alone (few-shot examples and prompt), never from the continuation being scored, so every choice of a question
is scored under the same mask; each rolling window of a perplexity task (``wikitext``) from the document's text
before the window. Everything else — tasks, prompts, few-shot sampling, metrics, aggregation — is lm-eval's own.
"""

from __future__ import annotations

from typing import Any

from lm_eval.models.huggingface import HFLM
from torch import nn

from shadow.config import TasksEvalConfig
from shadow.data import known_tasks
from shadow.evaluate.requests import MaskFn, Request, rolling_requests, score
from shadow.models import pad_id
from shadow.policy import SparsityMeter
from shadow.weights_read import InputCounter, sparsity_meter


class SparseHFLM(HFLM):
    def __init__(self, model: nn.Module, tokenizer, mask_fn: MaskFn, batch_size: int, meter: SparsityMeter,
                 mask_from: str = "context", inputs: InputCounter | None = None, context: str = "masked"):
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        self.mask_fn, self.meter, self.mask_from, self.inputs = mask_fn, meter, mask_from, inputs
        self.context = context

    def _score(self, requests: list[Request], desc: str, batch_size: int, progress: bool) -> tuple[list, list]:
        return score(self.model, requests, self.mask_fn, batch_size, pad_id(self.tokenizer), self.meter, desc,
                     progress=progress, mask_from=self.mask_from, counter=self.inputs, context=self.context)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        window = self.max_length
        ours = []
        for _, context, continuation in requests:
            tokens = (context + continuation)[-(window + 1):]  # lm-eval's truncation: drop context from the left
            ours.append(Request(tokens, min(len(continuation), len(tokens) - 1), context[-window:]))
        nll, greedy = self._score(ours, "lm-eval requests", override_bs or self.batch_size, not disable_tqdm)
        return [(-n, g) for n, g in zip(nll, greedy, strict=True)]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """lm-eval's rolling windows of each document, each masked from the document's text before the window
        (lm-eval hands each window a one-token context, which would predict every mask from one token)."""
        per_doc = [rolling_requests(self.tok_encode(string), self.prefix_token_id, self.max_length)
                   for (string,) in (r.args for r in requests)]
        nll, _ = self._score([w for windows in per_doc for w in windows], "lm-eval rolling windows",
                             self.batch_size, not disable_tqdm)
        totals, start = [], 0
        for windows in per_doc:
            totals.append(-sum(nll[start:start + len(windows)]))
            start += len(windows)
        return totals


def check_tasks(cfg: TasksEvalConfig) -> Any:
    """The checked task index (names known, enough few-shot documents): call it before any model loads."""
    return known_tasks(tuple(cfg.tasks), cfg.include_path, cfg.num_fewshot, "eval")


def evaluate_tasks(model: nn.Module, tokenizer, mask_fn: MaskFn, cfg: TasksEvalConfig, manager: Any,
                   seed: int, meter: SparsityMeter | None = None, inputs: InputCounter | None = None
                   ) -> tuple[dict[str, float], dict[str, list[float]], dict[str, Any]]:
    """Task metrics (``<task>/<metric>`` and ``tasks/mean_acc``), achieved sparsity per layer, lm-eval's output;
    the masks applied and the tokens scored are counted in ``meter`` (by default a new one), the scored forwards'
    projection inputs in ``inputs``."""
    import lm_eval

    meter = meter or sparsity_meter(model)
    lm = SparseHFLM(model, tokenizer, mask_fn, cfg.batch_size, meter, cfg.mask_from, inputs, cfg.context)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                  task_manager=manager, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    metrics = {f"{task}/{name.split(',')[0]}": value for task, result in out["results"].items()
               for name, value in result.items() if isinstance(value, float) and "stderr" not in name}
    accuracies = [out["results"][task]["acc,none"] for task in cfg.tasks if "acc,none" in out["results"][task]]
    if accuracies:
        metrics["tasks/mean_acc"] = sum(accuracies) / len(accuracies)
    return {**metrics, **meter.overall()}, meter.per_layer(), out
