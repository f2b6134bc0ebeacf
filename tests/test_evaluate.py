"""Perplexity protocols: windows, no leakage into the mask's prompt, agreement with lm-eval, masks applied."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import layers_of, settings, shape_of

from shadow.evaluate.perplexity import (
    EvalData,
    document,
    evaluate_perplexity,
    load_eval_data,
    token_requests,
    word_requests,
)
from shadow.policy import Masks

TEXT = ("It is a truth universally acknowledged that a single man in possession of a good fortune must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering "
        "a neighbourhood, this truth is so well fixed in the minds of the surrounding families.")


def doc(text: str = TEXT):
    return document(text)


def data(*texts: str) -> EvalData:
    return EvalData("\n\n".join(texts), [doc(t) for t in texts])


def test_token_windows_tile_the_stream_and_prompts_precede_targets(tokenizer):
    stream = tokenizer("\n\n".join([TEXT, TEXT]))["input_ids"]
    requests = token_requests("\n\n".join([TEXT, TEXT]), tokenizer, seq_len=16, limit=None)
    assert len(requests) == len(stream) // 16
    for k, r in enumerate(requests):
        assert r.tokens == stream[16 * k:16 * (k + 1)] and r.n_targets == 15
        # the prompt is the text up to the window's first (unscored) token, never a target
        assert r.prompt == stream[max(0, 16 * k + 1 - 16):16 * k + 1]


def test_word_windows_score_every_token_once_and_prompts_precede_targets(tokenizer):
    tokens = tokenizer(TEXT)["input_ids"]
    stream = [tokenizer.bos_token_id] + tokens
    requests = word_requests(doc(), tokenizer, seq_len=16)
    scored = [t for r in requests for t in r.tokens[-r.n_targets:]]
    assert scored == tokens
    first = 0
    for r in requests:
        assert len(r.tokens) - 1 <= 16
        assert r.prompt == stream[max(0, first + 1 - 16):first + 1]  # ends just before the first target
        first += r.n_targets


def test_dense_word_perplexity_equals_lm_eval(tiny_opt, tokenizer):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from shadow.opt_mini import PERPLEXITY_TASK, TASKS_DIR

    cfg = settings("eval", protocols=["word"], limit=2, batch_size=4)
    ours, _ = evaluate_perplexity(tiny_opt, tokenizer, lambda prompts: None, cfg, load_eval_data(cfg))
    lm = HFLM(pretrained=tiny_opt, tokenizer=tokenizer, batch_size=4)
    theirs = lm_eval.simple_evaluate(model=lm, tasks=[PERPLEXITY_TASK], limit=2,
                                     task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    result = theirs["results"][PERPLEXITY_TASK]
    assert ours["word_perplexity"] == pytest.approx(result["word_perplexity,none"], rel=1e-5)
    assert ours["bits_per_byte"] == pytest.approx(result["bits_per_byte,none"], rel=1e-5)


def test_dense_token_perplexity_matches_a_direct_computation(tiny_opt, tokenizer):
    cfg = settings("eval", protocols=["token"], batch_size=3)
    metrics, _ = evaluate_perplexity(tiny_opt, tokenizer, lambda prompts: None, cfg, data(TEXT, TEXT))
    ids = torch.tensor(tokenizer("\n\n".join([TEXT, TEXT]))["input_ids"])
    windows = ids[: len(ids) // 64 * 64].view(-1, 64)
    with torch.no_grad():
        loss = tiny_opt(input_ids=windows, labels=windows).loss  # mean over every window's 63 targets
    assert metrics["token_perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_masks_are_applied_per_request_and_reported(tiny_opt, tokenizer):
    shape = shape_of(tiny_opt)
    seen = []

    def half_masks(prompts):
        seen.extend(prompts)
        gen = torch.Generator().manual_seed(len(seen))
        heads = torch.rand(len(prompts), shape.layers, shape.heads, generator=gen).argsort(-1) < shape.heads // 2
        neurons = torch.rand(len(prompts), shape.layers, shape.neurons, generator=gen).argsort(-1) < 8
        return Masks(heads, neurons)

    cfg = settings("eval", protocols=["token", "word"], seq_len=16, batch_size=2)
    dense, dense_layers = evaluate_perplexity(tiny_opt, tokenizer, lambda prompts: None, cfg, data(TEXT))
    sparse, sparse_layers = evaluate_perplexity(tiny_opt, tokenizer, half_masks, cfg, data(TEXT))
    assert sparse["token_perplexity"] != pytest.approx(dense["token_perplexity"], rel=1e-3)
    assert sparse["word_perplexity"] != pytest.approx(dense["word_perplexity"], rel=1e-3)
    assert sparse["achieved_head_sparsity"] == pytest.approx(0.5)
    assert sparse["achieved_neuron_sparsity"] == pytest.approx(1 - 8 / shape.neurons)
    assert dense["achieved_head_sparsity"] == 0.0 and dense_layers == {}
    assert sparse_layers["head_sparsity"] == pytest.approx([0.5] * shape.layers)
    assert sparse_layers["neuron_sparsity"] == pytest.approx([1 - 8 / shape.neurons] * shape.layers)
    assert len(seen) == len(token_requests(TEXT, tokenizer, 16, None)) + len(word_requests(doc(), tokenizer, 16))


def test_the_reference_leak_predicts_each_mask_from_the_scored_window(tiny_opt, tokenizer):
    """eval.mask_from=scored (compat=reference) hands the mask source each window's whole text, scored tokens
    included, truncated to what the model reads; the default hands it only the text before the window."""
    prompts = {}

    def recording(requests):
        prompts.setdefault("seen", []).extend(r.prompt for r in requests)

    for mask_from in ("context", "scored"):
        prompts.clear()
        cfg = settings("eval", protocols=["word"], seq_len=16, batch_size=2, mask_from=mask_from)
        evaluate_perplexity(tiny_opt, tokenizer, recording, cfg, data(TEXT))
        requests = word_requests(doc(), tokenizer, 16)
        want = [r.prompt for r in requests] if mask_from == "context" else [r.tokens[-64:] for r in requests]
        assert sorted(prompts["seen"]) == sorted(want)
    assert any(len(r.tokens) == 17 for r in requests)  # windows longer than 16: the leak reads scored tokens


def test_a_rolling_lm_eval_task_masks_each_window_from_the_text_before_it(tiny_opt, tokenizer):
    """eval=tasks with a perplexity task (opt_mini_ppl, lm-eval's wikitext shape): each window's mask comes from
    the document before it, as the word protocol's does, and dense scores equal plain HFLM's."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from shadow.evaluate.tasks import check_tasks, evaluate_tasks
    from shadow.opt_mini import PERPLEXITY_TASK

    cfg = settings("eval=tasks", tasks=[PERPLEXITY_TASK], limit=2, batch_size=4)
    prompts = []
    ours, _, _ = evaluate_tasks(tiny_opt, tokenizer, lambda rs: prompts.extend(r.prompt for r in rs), cfg,
                                check_tasks(cfg), seed=0)
    theirs = lm_eval.simple_evaluate(model=HFLM(pretrained=tiny_opt, tokenizer=tokenizer, batch_size=4),
                                     tasks=[PERPLEXITY_TASK], limit=2, task_manager=check_tasks(cfg))
    assert ours[f"{PERPLEXITY_TASK}/word_perplexity"] == pytest.approx(
        theirs["results"][PERPLEXITY_TASK]["word_perplexity,none"], rel=1e-5)
    seq_len = tiny_opt.config.max_position_embeddings
    documents = load_eval_data(settings("eval")).documents[:2]
    want = [r.prompt for d in documents for r in word_requests(d, tokenizer, seq_len)]
    assert sorted(prompts) == sorted(want) and max(map(len, prompts)) == seq_len  # not a one-token context


def test_a_dense_context_runs_whole_and_only_the_scored_positions_are_masked_and_counted(tiny_opt, tokenizer):
    """eval.context=dense (GRIFFIN's order): each request's context positions run on the whole model, the positions
    that predict its targets under its mask; the meter counts the masks as applied there and the input counter
    only those positions."""
    from shadow.evaluate.requests import Request, score
    from shadow.masking import apply_masks
    from shadow.weights_read import InputCounter, sparsity_meter

    shape = shape_of(tiny_opt)
    stream = tokenizer(TEXT)["input_ids"]
    requests = [Request(stream[:14], 3, stream[:11]), Request(stream[5:25], 6, stream[5:19])]
    gen = torch.Generator().manual_seed(4)
    masks = Masks(torch.rand(2, shape.layers, shape.heads, generator=gen) > 0.5,
                  torch.rand(2, shape.layers, shape.neurons, generator=gen) > 0.5)

    def mask_fn(chunk):  # longest first: the order score runs them in
        return Masks(*(m[[requests.index(r) for r in chunk]] for m in (masks.heads, masks.neurons)))

    results = {}
    for context in ("masked", "dense"):
        meter = sparsity_meter(tiny_opt)
        with InputCounter(tiny_opt) as inputs:
            nll, _ = score(tiny_opt, requests, mask_fn, 2, 1, meter, "test", progress=False, counter=inputs,
                           context=context)
        results[context] = nll, meter, inputs.shares()
    down = layers_of(tiny_opt)[1].fc2
    seen = []  # layer 1's down-projection inputs at the scored positions, under the dense context
    for i, r in enumerate(requests):
        n = len(r.tokens) - 1
        positions = (torch.arange(n) >= n - r.n_targets)[None]
        one = Masks(masks.heads[i:i + 1], masks.neurons[i:i + 1])
        ids = torch.tensor([r.tokens[:-1]])
        with torch.no_grad():
            for context, where in (("masked", None), ("dense", positions)):
                with apply_masks(tiny_opt, one, where):  # the hook after the mask's: it sees what fc2 reads
                    handle = down.register_forward_pre_hook(
                        lambda m, args, r=r: seen.append(args[0].reshape(-1, args[0].shape[-1])[-r.n_targets:]))
                    rows = tiny_opt(ids).logits[0, n - r.n_targets:].log_softmax(-1)
                    handle.remove()
                if context == "masked":
                    seen.pop()
                want = -rows.gather(1, torch.tensor(r.tokens[-r.n_targets:])[:, None]).sum().item()
                assert results[context][0][i] == pytest.approx(want, rel=1e-5)
    assert results["dense"][0] != pytest.approx(results["masked"][0], rel=1e-4)
    kept = (masks.neurons.float().mean(-1).mean(0)).tolist()
    for context in ("masked", "dense"):  # one mask per request either way, counted once
        assert results[context][1].per_layer()["neuron_sparsity"] == pytest.approx([1 - k for k in kept])
    nonzero = torch.cat(seen) != 0  # the context's inputs, every unit there, are not counted
    assert results["dense"][2]["down"][1] == pytest.approx(nonzero.float().mean().item(), rel=1e-6)
