"""llama-mini: a real, trained Llama (grouped-query attention, SwiGLU, RoPE, RMSNorm) that loads offline, shares
opt-mini's evaluation data with its own BOS, and runs every sparse path equal to its masked self."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter

import pytest
import torch
from helpers import decode_and_check, masked_and_pruned_logits, request_masks, token_predictor

from shadow.llama_mini import MODEL_DIR
from shadow.opt_mini import CALIBRATION_FILE, PERPLEXITY_FILE
from shadow.policy import Policy


@pytest.fixture(scope="module")
def llama_mini():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval(), AutoTokenizer.from_pretrained(MODEL_DIR)


def test_loads_offline_as_a_standard_llama(llama_mini):
    from transformers import LlamaForCausalLM

    model, tokenizer = llama_mini
    config = model.config
    assert isinstance(model, LlamaForCausalLM) and config.hidden_act == "silu"
    assert config.num_attention_heads == 4 * config.num_key_value_heads  # grouped-query attention
    assert 5e6 <= sum(p.numel() for p in model.parameters()) <= 25e6
    assert sum(f.stat().st_size for f in MODEL_DIR.iterdir()) < 30e6
    ids = tokenizer("Hello")["input_ids"]
    assert ids[0] == config.bos_token_id == tokenizer.bos_token_id == 0  # Llama's <s>, not OPT's </s>
    assert tokenizer.decode(ids[1:]) == "Hello"


def test_files_match_the_model_card_checksums():
    build = json.loads((MODEL_DIR / "build.json").read_text())
    for name, digest in build["files_sha256"].items():
        assert hashlib.sha256((MODEL_DIR / name).read_bytes()).hexdigest() == digest, name


def test_held_out_bits_per_byte_are_below_three_quarters_of_a_unigram_models(llama_mini):
    """On three held-out documents, against a unigram model (add-one smoothed) fitted on other held-out text, the
    calibration split, as the card's is fitted on the training split: bits per byte are ratios of the mean
    log-losses on the same tokens and bytes."""
    model, tokenizer = llama_mini
    text = "\n\n".join(json.loads(line)["page"] for line in PERPLEXITY_FILE.read_text().splitlines()[:3])
    ids = torch.tensor(tokenizer(text)["input_ids"][: 16 * 512]).view(16, 512)
    with torch.no_grad():
        model_nll = model(input_ids=ids, labels=ids).loss.item()
    examples = [json.loads(line) for line in CALIBRATION_FILE.read_text().splitlines()]
    fitted = Counter(token for example in examples for token in
                     tokenizer(example["context"] + example["continuation"], add_special_tokens=False)["input_ids"])
    total = sum(fitted.values()) + len(tokenizer)
    unigram_nll = -sum(math.log((fitted[t] + 1) / total) for t in ids[:, 1:].flatten().tolist()) / ids[:, 1:].numel()
    assert model_nll <= 0.75 * unigram_nll, (model_nll, unigram_nll)


@pytest.mark.parametrize("attention_unit", ["kv_group", "query_head"])
def test_pruned_forward_equals_masked_forward(llama_mini, attention_unit):
    model, _ = llama_mini
    ids = torch.randint(4, 8192, (1, 40), generator=torch.Generator().manual_seed(0))
    masks = request_masks(model, 0, attention_unit=attention_unit)
    masked, sparse = masked_and_pruned_logits(model, masks, ids, attention_unit)
    torch.testing.assert_close(sparse, masked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("placement", ["shadow", "dejavu"])
def test_per_token_decoding_equals_the_masked_model(llama_mini, placement):
    model, _ = llama_mini
    policy = Policy("global" if placement == "shadow" else "local", 0.5, 0.5)
    decode_and_check(model, token_predictor(model, placement, lookahead=placement == "dejavu"), policy)
