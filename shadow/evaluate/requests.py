"""Scoring requests under masks: the one loop that every evaluation runs.

A request is a token sequence whose last ``n_targets`` tokens are scored, and the prompt its mask is predicted
from. Requests are batched (right-padded), each with its own mask, and scored by log-likelihood.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn
from tqdm import tqdm

from shadow.data import pad
from shadow.masking import apply_masks
from shadow.offload import input_device
from shadow.policy import Masks, SparsityMeter
from shadow.weights_read import InputCounter


@dataclass
class Request:
    tokens: list[int]  # model input followed by the last target; at most seq_len + 1 tokens
    n_targets: int  # the last n_targets tokens are scored
    prompt: list[int]  # what the mask is predicted from: never a scored token


MaskFn = Callable[[list[Request]], Masks | None]  # requests → one mask per request (None: dense)


def prompt_before(stream: list[int], first_target: int, seq_len: int) -> list[int]:
    """Up to seq_len tokens of stream ending just before index first_target."""
    return stream[max(0, first_target - seq_len):first_target]


def rolling_requests(tokens: list[int], prefix: int, seq_len: int) -> list[Request]:
    """lm-eval's disjoint rolling windows over one document's tokens (its ``loglikelihood_rolling``), each
    masked from the document's text before the window's first scored token (starting with ``prefix``)."""
    stream = [prefix] + tokens  # stream[i + 1] is tokens[i]
    out, first = [], 0
    for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
            token_list=tokens, prefix_token=prefix, max_seq_len=seq_len, context_len=1)):
        out.append(Request((context + continuation)[-(seq_len + 1):], len(continuation),
                           prompt_before(stream, first + 1, seq_len)))
        first += len(continuation)
    return out


@torch.no_grad()
def score(model: nn.Module, requests: list[Request], mask_fn: MaskFn, batch_size: int, pad_id: int,
          meter: SparsityMeter, desc: str, progress: bool = True, mask_from: str = "context",
          counter: InputCounter | None = None, context: str = "masked") -> tuple[list[float], list[bool]]:
    """Each request's summed negative log-likelihood of its targets, and whether every target was the argmax.

    Requests run longest first, so that batches pad little; results come back in the order given. The masks
    used (per-token ones at the real tokens they apply to) and the tokens scored are added to ``meter``, and the
    scored forwards' projection inputs there to ``counter`` (not the passes that compute masks).
    ``mask_from="scored"`` predicts each mask from the request's whole text, scored
    tokens included, as ShadowLLM's reference code did (a leak, for comparison only).
    ``context="dense"`` runs each request's context (the positions before those that predict its targets) on the
    whole model and only the rest under its mask, as GRIFFIN generates: the prompt dense, the new tokens sparse.
    """
    if mask_from == "scored":
        limit = model.config.max_position_embeddings
        requests = [replace(r, prompt=r.tokens[-limit:]) for r in requests]
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].tokens))
    nll, greedy = [0.0] * len(requests), [False] * len(requests)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
        chunk = [requests[i] for i in order[start:start + batch_size]]
        inputs = [r.tokens[:-1] for r in chunk]
        ids, attention = pad(inputs, pad_id)
        masked = attention.bool()
        if context == "dense":  # right-padded: request r's targets are predicted from [len - n_targets, len)
            first = torch.tensor([len(x) - r.n_targets for x, r in zip(inputs, chunk, strict=True)])
            masked &= torch.arange(ids.shape[1]) >= first[:, None]
        device = input_device(model)
        positions = masked.to(device) if context == "dense" else None  # moved once, read by every layer's hooks
        masks = mask_fn(chunk)
        with apply_masks(model, masks, positions), \
                counter.counting(positions) if counter is not None else nullcontext():
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
        for i, r in zip(order[start:start + batch_size], range(len(chunk)), strict=True):
            n, req = len(inputs[r]), chunk[r]
            rows = logits[r, n - req.n_targets:n].float().log_softmax(-1)  # on the device: only two numbers leave it
            targets = torch.tensor(req.tokens[-req.n_targets:], device=rows.device)
            nll[i] = -rows.gather(1, targets[:, None]).sum().item()
            greedy[i] = bool((rows.argmax(-1) == targets).all())
        meter.add(masks, masked, scored=sum(r.n_targets for r in chunk))
    return nll, greedy
