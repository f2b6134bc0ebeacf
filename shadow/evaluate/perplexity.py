"""Perplexity of the (sparse) model under two protocols, named so they cannot be confused.

- ``token_perplexity``: the joined test text cut into non-overlapping windows of the context length, every
  token after each window's first scored (SparseGPT/Wanda: WikiText-2's lines joined by blank lines).
- ``word_perplexity`` (with ``byte_perplexity`` and ``bits_per_byte``): lm-eval's ``wikitext`` protocol,
  document-level rolling windows from lm-eval's own window function, normalised by the words of each
  document (what the ShadowLLM paper reports).

Each window is one request with one mask. The mask is predicted from the text up to and including the token
that precedes the window's first scored token, at most one window of it: the predictor never sees a token it
is scored on (``eval.mask_from=scored`` reproduces the reference code's leak instead, for comparison).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from torch import nn

from shadow.config import PerplexityEvalConfig
from shadow.errors import ConfigError
from shadow.evaluate.requests import MaskFn, Request, prompt_before, rolling_requests, score
from shadow.models import pad_id
from shadow.opt_mini import PERPLEXITY_FILE
from shadow.policy import SparsityMeter
from shadow.weights_read import InputCounter, sparsity_meter


@dataclass
class Document:
    text: str  # what the model reads
    words: int  # lm-eval's count, on the original text
    bytes: int


@dataclass
class EvalData:
    text: str  # the token protocol's joined text
    documents: list[Document]  # the word protocol's documents


def document(page: str, text: str | None = None) -> Document:
    """A document scored as ``text`` (default: the page), counted as lm-eval counts the original page."""
    return Document(page if text is None else text, len(re.split(r"\s+", page)), len(page.encode()))


def load_eval_data(cfg: PerplexityEvalConfig) -> EvalData:
    """The evaluation text; fails with a clear error before any model work if it is unreachable."""
    if cfg.dataset == "opt_mini":
        pages = [json.loads(line)["page"] for line in PERPLEXITY_FILE.read_text().splitlines()]
        return EvalData("\n\n".join(pages), [document(p) for p in pages])
    import datasets
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    try:
        lines = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        pages = datasets.load_dataset("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", split="test")
    except Exception as err:  # offline or unreachable hub
        raise ConfigError(f"eval.dataset=wikitext2 could not be loaded ({type(err).__name__}); run where the "
                          "Hugging Face hub is reachable once to cache it, or use eval.dataset=opt_mini") from None
    return EvalData("\n\n".join(lines), [document(d["page"], wikitext_detokenizer(d)) for d in pages])


def token_requests(text: str, tokenizer, seq_len: int, limit: int | None) -> list[Request]:
    stream = tokenizer(text, verbose=False)["input_ids"]  # starts with BOS
    starts = range(0, len(stream) - seq_len + 1, seq_len)
    return [Request(stream[s:s + seq_len], seq_len - 1, prompt_before(stream, s + 1, seq_len))
            for s in list(starts)[:limit]]


def word_requests(doc: Document, tokenizer, seq_len: int) -> list[Request]:
    tokens = tokenizer(doc.text, verbose=False)["input_ids"]  # as lm-eval's HFLM encodes it: with BOS
    return rolling_requests(tokens, tokenizer.bos_token_id, seq_len)


def evaluate_perplexity(model: nn.Module, tokenizer, mask_fn: MaskFn, cfg: PerplexityEvalConfig,
                        data: EvalData, meter: SparsityMeter | None = None, inputs: InputCounter | None = None
                        ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Perplexity metrics with the overall achieved sparsity, and the achieved sparsity of each layer; the masks
    applied and the tokens scored are counted in ``meter`` (by default a new one), the scored forwards'
    projection inputs in ``inputs``."""
    seq_len = cfg.seq_len or model.config.max_position_embeddings
    padding = pad_id(tokenizer)
    metrics: dict[str, float] = {}
    meter = meter or sparsity_meter(model)
    if "token" in cfg.protocols:
        requests = token_requests(data.text, tokenizer, seq_len, cfg.limit)
        nll, _ = score(model, requests, mask_fn, cfg.batch_size, padding, meter, "token perplexity",
                       mask_from=cfg.mask_from, counter=inputs, context=cfg.context)
        metrics["token_perplexity"] = math.exp(sum(nll) / sum(r.n_targets for r in requests))
    if "word" in cfg.protocols:
        subset = data.documents[:cfg.limit]
        per_doc = [word_requests(d, tokenizer, seq_len) for d in subset]
        nll, _ = score(model, [r for rs in per_doc for r in rs], mask_fn, cfg.batch_size, padding, meter,
                       "word perplexity", mask_from=cfg.mask_from, counter=inputs, context=cfg.context)
        total = sum(nll)
        words, n_bytes = sum(d.words for d in subset), sum(d.bytes for d in subset)
        metrics.update(word_perplexity=math.exp(total / words), byte_perplexity=math.exp(total / n_bytes),
                       bits_per_byte=total / n_bytes / math.log(2))
    return {**metrics, **meter.overall()}, meter.per_layer()
