"""What several test modules use: tiny models built in the test, settings composed from conf/, the shadow command
as a user runs it, and the checks that sparse execution equals the masked model."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from torch import Tensor

from shadow import kernels
from shadow.arch import Shape, family_of
from shadow.compose import compose_config
from shadow.criteria import CRITERIA
from shadow.data import Example
from shadow.masking import apply_masks
from shadow.placements import PLACEMENTS
from shadow.policy import Masks, Policy
from shadow.predictors import GriffinMasks, Predictor, spearman
from shadow.sparse import RequestDecoder, ThresholdDecoder, TokenDecoder, pruned
from shadow.thresholds import calibrate, sites, thresholded
from shadow.weights_read import masks_read

ROOT = Path(__file__).resolve().parent.parent
ALL_CASES = [(name, variant) for name in sorted(CRITERIA) for variant in CRITERIA[name] if name != "random"]
HALF_AGREEMENT = {"epenas": 0.85}  # log(|corr| + 1e-5) is ruled by near-zero correlations: rounding opt-mini's
# weights to bfloat16 alone, computing in float32, moves its per-layer ranking to ρ = 0.92
CONF_DIR = str(ROOT / "conf")
FAST_CLI = ("logger=none calibration.limit=8 predictor.head_epochs=2 predictor.neuron_epochs=1 eval.limit=1 "
            "eval.protocols=[token]")  # the opt-mini pipeline in seconds


def run_shadow(args: str, cwd: Path, module: str = "shadow", **env: str) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in a subprocess, as a user types it."""
    return subprocess.run([sys.executable, "-m", module, *args.split()], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=900)


def make_tiny_opt(layers: int = 3, heads: int = 4, hidden: int = 16, ffn: int = 32, vocab: int = 8192,
                  seed: int = 0, dtype: torch.dtype = torch.float32, positions: int = 64, like_350m: bool = False):
    """A random OPT; ``like_350m``: OPT-350m's shape, with LayerNorm after each block and the embeddings
    projected in and out."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=vocab, hidden_size=hidden, word_embed_proj_dim=hidden // 2 if like_350m else hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                       max_position_embeddings=positions, dropout=0.0, attention_dropout=0.0, pad_token_id=1,
                       bos_token_id=2, eos_token_id=2, do_layer_norm_before=not like_350m)
    model = OPTForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # larger than the default init so that every unit matters measurably
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def make_tiny_llama(model_type: str = "llama", layers: int = 3, heads: int = 4, kv_heads: int = 2, hidden: int = 32,
                    ffn: int = 48, vocab: int = 8192, seed: int = 0, dtype: torch.dtype = torch.float32,
                    positions: int = 64, **fields):
    """A random model of the llama family: ``model_type`` llama, mistral, qwen2 (biased query, key and value
    projections) or qwen3 (RMSNorm on query and key heads), with ``heads`` query heads sharing ``kv_heads``
    key-value heads. Norm weights and biases are random too, so that every one of them matters."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=ffn,
                                  max_position_embeddings=positions, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                  tie_word_embeddings=False, **fields)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    return model



def tiny_models() -> dict[str, Callable[[], torch.nn.Module]]:
    """A tiny model of every family and layout shadow knows: OPT, Llama, Mistral with one key-value head, Qwen2's
    biased query, key and value projections, Qwen3's norms on query and key heads."""
    return {"opt": make_tiny_opt, "llama": make_tiny_llama,
            "mistral": lambda: make_tiny_llama("mistral", kv_heads=1),
            "qwen2": lambda: make_tiny_llama("qwen2"), "qwen3": lambda: make_tiny_llama("qwen3", head_dim=8)}

def settings(group: str, **values) -> DictConfig:
    """A config group's section as conf/ sets it (``group`` after ``=`` picks an option: ``eval=tasks``), with
    ``values`` replaced."""
    name, _, option = group.partition("=")
    section = compose_config(*([group] if option else []))[name]
    for key, value in values.items():
        section[key] = value
    return section


def shape_of(model, attention_unit: str = "kv_group") -> Shape:
    return family_of(model.config).shape(model.config, attention_unit)


def request_masks(model, seed: int, sparsity: float = 0.5, attention_unit: str = "kv_group") -> Masks:
    s = shape_of(model, attention_unit)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(1, s.layers, s.heads, generator=gen), torch.rand(1, s.layers, s.neurons, generator=gen)
    return Policy("local", sparsity, sparsity).select(*scores)


def masked_and_pruned_logits(model, masks: Masks, ids, attention_unit: str = "kv_group") -> tuple:
    """Logits under the masking hooks, and with the pruned units' weights removed."""
    with torch.no_grad():
        with apply_masks(model, masks):
            masked = model(ids).logits
        with pruned(model, masks, shape_of(model, attention_unit)):
            return masked, model(ids).logits


def use_triton_kernels(monkeypatch) -> None:
    """Route every gather through the Triton kernels (on CPU tensors in Triton's interpreter, as conftest sets)."""
    pytest.importorskip("triton")  # the test extras install it on Linux
    from shadow.kernels.triton_gather import TritonGather

    monkeypatch.setattr(kernels, "backend", lambda weight: TritonGather)


def token_predictor(model, name: str, lookahead: bool = False, attention_unit: str = "kv_group") -> Predictor:
    torch.manual_seed(7)
    shape = shape_of(model, attention_unit)
    groups = PLACEMENTS[name].groups(shape.layers, 0, lookahead)
    return Predictor(shape, shape.attention_width, groups, "mlp", 32, 32, False).eval()


def calibration_examples(count: int = 12, length: int = 16) -> list[Example]:
    """Of one length: no padding, so the shares kept count only real tokens."""
    gen = torch.Generator().manual_seed(5)
    return [Example(tuple(torch.randint(4, 8192, (length,), generator=gen).tolist()), 1) for _ in range(count)]


def decode_and_check(model, predictor: Predictor, policy: Policy, new_tokens: int = 10, batch: int = 1,
                     static: bool | None = None, dense_key_values: bool = False):
    """Decode per token a batch of prompts; every step's logits must equal the masked model's on the same
    sequences and masks (the batch's union, shared), up to rounding, and so must its greedy tokens where rounding
    cannot decide between two. In float32 the kernels' other summation order moves logits by less than 1e-4. In
    half precision the per-token path may run other kernels than the masked model (it does on CUDA), so its
    rounding is its own: its logits must be at most twice as far from the float32 masked model (the same weights,
    upcast) as the half-precision masked model's are, in root mean square over all logits (a maximum over single
    logits is too noisy to bound). Returns the generation and the (B, S) sequences decoded."""
    ids = torch.randint(4, 8192, (batch, 9), generator=torch.Generator().manual_seed(6))
    out = TokenDecoder(model, predictor, policy, static, dense_key_values).generate(ids, new_tokens)
    assert out.tokens.shape == (batch, new_tokens) and out.logits.shape[:2] == (batch, new_tokens - 1)
    sequences = torch.cat([ids, out.tokens[:, :-1]], 1)
    prompt = ids.shape[1]
    heads = torch.ones(batch, sequences.shape[1], *out.masks.heads.shape[1:], dtype=torch.bool)
    neurons = torch.ones(batch, sequences.shape[1], *out.masks.neurons.shape[1:], dtype=torch.bool)
    heads[:, prompt:], neurons[:, prompt:] = out.masks.heads, out.masks.neurons
    masks = Masks(heads, neurons)
    with torch.no_grad(), apply_masks(model, masks):
        masked = model(sequences.to(model.device)).logits.cpu()
    assert torch.equal(masked[:, prompt - 1].argmax(-1), out.tokens[:, 0])
    if model.dtype == torch.float32:
        torch.testing.assert_close(out.logits, masked[:, prompt:], rtol=1e-4, atol=1e-4)
        top = masked[:, prompt:].topk(2, dim=-1).values
        decided = top[..., 0] - top[..., 1] > 2e-4
        assert decided.any() and torch.equal(out.tokens[:, 1:][decided], masked[:, prompt:].argmax(-1)[decided])
    else:
        full = copy.deepcopy(model).float()
        with torch.no_grad(), apply_masks(full, masks):
            exact = full(sequences.to(full.device)).logits[:, prompt:].cpu()

        def distance(logits: torch.Tensor) -> float:
            return (logits.float() - exact).pow(2).mean().sqrt().item()

        assert distance(out.logits) <= 2 * distance(masked[:, prompt:])
    return out, sequences


def request_decode_and_check(model, batch: int = 1, static: bool | None = None,
                             attention_unit: str = "kv_group", masks_of: Callable[[Tensor], Masks] | None = None
                             ) -> None:
    """Decode a batch of prompts under one mask per request (random ones, or ``masks_of`` the (B, T) prompts): the
    prompt and every step are the masked model's under the batch's union mask (logits up to the kernels'
    summation order, in float32), every step applies that union, and it reads only the kept units' weights."""
    shape = shape_of(model, attention_unit)
    gen = torch.Generator().manual_seed(7)
    scores = torch.rand(batch, shape.layers, shape.heads, generator=gen), torch.rand(batch, shape.layers,
                                                                                      shape.neurons, generator=gen)
    ids = torch.randint(4, 8192, (batch, 9), generator=gen)
    masks = Policy("local", 0.5, 0.5).select(*scores) if masks_of is None else masks_of(ids)
    union = Masks(masks.heads.any(0, keepdim=True), masks.neurons.any(0, keepdim=True))
    decoder = RequestDecoder(model, shape, static)
    out = decoder.generate(ids, 8, masks)
    sequences = torch.cat([ids, out.tokens[:, :-1]], 1)
    with torch.no_grad(), apply_masks(model, union):
        masked = model(sequences.to(model.device)).logits.cpu()
    assert torch.equal(masked[:, ids.shape[1] - 1].argmax(-1), out.tokens[:, 0])
    torch.testing.assert_close(out.logits, masked[:, ids.shape[1]:], rtol=1e-4, atol=1e-4)
    top = masked[:, ids.shape[1]:].topk(2, dim=-1).values
    decided = top[..., 0] - top[..., 1] > 2e-4
    assert decided.any() and torch.equal(out.tokens[:, 1:][decided], masked[:, ids.shape[1]:].argmax(-1)[decided])
    assert torch.equal(out.masks.heads, union.heads.expand_as(out.masks.heads))
    assert torch.equal(out.masks.neurons, union.neurons.expand_as(out.masks.neurons))
    assert decoder.share_read(out) == pytest.approx(masks_read(model, union)) and masks_read(model, union) < 1


def griffin_decode_and_check(model) -> None:
    """GRIFFIN's order, on two prompts: the prompt on the whole model, its statistic read in that same pass (the
    masks equal those of evaluation's own pass), then every generated token on the batch's kept units: the model
    under those masks at the generated positions only (logits up to the kernels' summation order, in float32)."""
    shape = shape_of(model)
    ids = torch.randint(4, 8192, (2, 9), generator=torch.Generator().manual_seed(3))
    griffin = GriffinMasks(model, shape, Policy("local", 0.0, 0.5), 1)
    chosen = griffin.policy.select(*griffin.statistics(ids, torch.ones_like(ids)))
    union = Masks(chosen.heads.any(0, keepdim=True), chosen.neurons.any(0, keepdim=True))
    out = RequestDecoder(model, shape).generate(ids, 6, griffin)
    assert torch.equal(out.masks.neurons, union.neurons.expand_as(out.masks.neurons)) and not union.neurons.all()
    sequences = torch.cat([ids, out.tokens[:, :-1]], 1).to(model.device)
    prompt = ids.shape[1]
    generated = (torch.arange(sequences.shape[1]) >= prompt).expand(len(ids), -1)
    with torch.no_grad():
        dense = model(ids.to(model.device)).logits[:, -1].cpu()
        with apply_masks(model, union, generated):
            reference = model(sequences).logits.cpu()
    assert torch.equal(out.tokens[:, 0], dense.argmax(-1))  # the first token is the dense prompt's
    torch.testing.assert_close(out.logits, reference[:, prompt:], rtol=1e-4, atol=1e-4)


def threshold_decode_and_check(model, method: str, static: bool | None = None) -> None:
    """TEAL or CATS per token, two requests, thresholds at half of each site's calibration entries: the prompt and
    every step are the thresholded model's on the same sequences (logits up to the kernels' summation order),
    while each step reads only some of each site's channels, the union of the two requests' (TEAL's sites keep
    about half each)."""
    found = sites(model, method)
    limits = calibrate(model, calibration_examples(), method, 4, 1).thresholds([0.5] * len(found))
    ids = torch.randint(4, 8192, (2, 9), generator=torch.Generator().manual_seed(6))
    decoder = ThresholdDecoder(model, method, limits, static)
    out = decoder.generate(ids, 8)
    assert out.tokens.shape == (2, 8) and out.kept.shape == (7, len(found), len(layers_of(model)))
    sequences = torch.cat([ids, out.tokens[:, :-1]], 1)
    with torch.no_grad(), thresholded(model, method, limits):
        expected = model(sequences.to(model.device)).logits.cpu()
    assert torch.equal(expected[:, 8].argmax(-1), out.tokens[:, 0])
    torch.testing.assert_close(out.logits, expected[:, 9:], rtol=1e-4, atol=1e-4)
    assert (out.kept < 1).any() and (out.kept > 0).all()
    if method == "teal":
        assert 0.3 < out.kept[:, 0].mean() < 0.9  # layer inputs: half each, the union of two a little more
    assert decoder.share_read(out) < 1


def per_layer_agreement(half: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """(L,) Spearman ρ of each layer's units, averaged over examples; a layer whose float32 scores are all equal
    (nothing to rank) agrees when the half scores are equal too."""
    B, L, U = full.shape
    rho = spearman(half.reshape(B * L, U), full.reshape(B * L, U)).view(B, L)
    flat = (full == full[..., :1]).all(-1)
    rho = torch.where(flat, (half == half[..., :1]).all(-1).float(), rho)
    return rho.mean(0)


def layers_of(model):
    return family_of(model.config).layers(model)
