"""What only a GPU shows: sparse execution, criteria and masks on CUDA, and models spread over devices or
offloaded to the CPU with CUDA execution. Marked ``gpu``; skipped without CUDA. ``python -m shadow.benchmarks.gpu``
runs them with the rest of the GPU check."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    ALL_CASES,
    HALF_AGREEMENT,
    decode_and_check,
    griffin_decode_and_check,
    make_tiny_llama,
    make_tiny_opt,
    masked_and_pruned_logits,
    per_layer_agreement,
    request_decode_and_check,
    request_masks,
    settings,
    shape_of,
    threshold_decode_and_check,
    token_predictor,
)

from shadow.criteria import get_criterion
from shadow.data import collate
from shadow.policy import Policy
from shadow.sparse import TokenDecoder
from shadow.sparse.steps import UnitStep

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
HALF_AND_FULL = [torch.float32, torch.float16, torch.bfloat16]


def tiny(family: str, dtype: torch.dtype):
    return (make_tiny_opt if family == "opt" else make_tiny_llama)(dtype=dtype).cuda()


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("dtype", HALF_AND_FULL, ids=str)
@pytest.mark.parametrize("name", ["shadow", "dejavu"])
def test_per_token_decoding_on_cuda_equals_the_masked_model(dtype, name, family):
    model = tiny(family, dtype)
    predictor = token_predictor(model, name, lookahead=name == "dejavu").cuda()
    decode_and_check(model, predictor, Policy("local" if name == "dejavu" else "global", 0.5, 0.5))


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_per_request_decoding_on_cuda_equals_the_masked_model(family, monkeypatch):
    """In float32, its steps captured as CUDA graphs and replayed, for one request and for a batch of two."""
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or replay(graph))
    model = tiny(family, torch.float32)
    request_decode_and_check(model)
    request_decode_and_check(model, batch=2)
    assert len(replays) == 2 * 6  # 7 steps each, the first eager


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_griffins_decoding_on_cuda_equals_the_model_masked_after_its_prompt(family):
    """In float32: the statistic read in the dense prompt pass on the device, the steps captured."""
    griffin_decode_and_check(tiny(family, torch.float32))


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("method", ["teal", "wina", "cats"])
def test_thresholded_decoding_on_cuda_equals_the_thresholded_model(family, method):
    """In float32: in half precision, entries at a threshold round to either side of it."""
    threshold_decode_and_check(tiny(family, torch.float32), method)


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("name", ["shadow", "dejavu"])
def test_a_decoding_step_on_cuda_never_waits_for_the_device(family, name, monkeypatch):
    """Under a local policy every eager step runs with CUDA's synchronisation check raising on any host read."""
    from shadow import kernels

    assert kernels.triton_kernels() is not None, "triton must import on a CUDA machine"
    model = tiny(family, torch.float16)
    decoder = TokenDecoder(model, token_predictor(model, name, lookahead=True).cuda().half(),
                           Policy("local", 0.5, 0.5), static=False)
    step, steps = UnitStep.__call__, []

    def strict(*args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            steps.append(args[1])

    monkeypatch.setattr(UnitStep, "__call__", strict)
    decoder.generate(torch.randint(4, 8192, (1, 9), generator=torch.Generator().manual_seed(2)), 6)
    assert len(steps) == 5


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("name", ["shadow", "dejavu"])
def test_steps_replayed_as_cuda_graphs_equal_eager_steps(family, name, monkeypatch):
    """Under a local policy a batch of one decodes by default with its step captured once as a CUDA graph and
    replayed for every later token (the first step warms up): the tokens, logits and masks of eager steps."""
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or replay(graph))
    model = tiny(family, torch.float16)
    predictor = token_predictor(model, name, lookahead=True).cuda().half()
    ids = torch.randint(4, 8192, (1, 9), generator=torch.Generator().manual_seed(3))
    graphs = TokenDecoder(model, predictor, Policy("local", 0.5, 0.5)).generate(ids, 12)
    assert len(replays) == 10
    eager = TokenDecoder(model, predictor, Policy("local", 0.5, 0.5), static=False).generate(ids, 12)
    assert torch.equal(graphs.tokens, eager.tokens)
    assert torch.equal(graphs.masks.heads, eager.masks.heads) and torch.equal(graphs.masks.neurons,
                                                                               eager.masks.neurons)
    torch.testing.assert_close(graphs.logits, eager.logits, rtol=1e-3, atol=1e-3)


def test_cuda_graphs_asked_for_where_they_cannot_capture():
    model = tiny("opt", torch.float16)
    predictor = token_predictor(model, "shadow").cuda().half()
    with pytest.raises(ValueError, match="static=True: .* use policy=local"):
        TokenDecoder(model, predictor, Policy("global", 0.5, 0.5), static=True).generate(
            torch.randint(4, 8192, (1, 9)), 4)


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("dtype", HALF_AND_FULL, ids=str)
def test_pruned_forward_on_cuda_equals_the_masked_forward(dtype, family):
    model = tiny(family, dtype)
    ids = torch.randint(4, 8192, (1, 20), generator=torch.Generator().manual_seed(0)).cuda()
    masked, sparse = masked_and_pruned_logits(model, request_masks(model, 0), ids)
    tolerance = 4 * torch.finfo(dtype).eps * masked.abs().max().item() if dtype != torch.float32 else 1e-4
    torch.testing.assert_close(sparse.float(), masked.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,variant", ALL_CASES)
def test_criteria_in_half_precision_on_cuda_rank_units_as_float32(opt_mini_batch, name, variant, dtype):
    """Every criterion and variant: float16 gradients are loss-scaled, scores accumulated in float32."""
    from transformers import AutoModelForCausalLM

    from shadow.opt_mini import MODEL_DIR
    from shadow.traces import score_batch

    full = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval().cuda()
    half = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=dtype).eval().cuda()
    shape, criterion = shape_of(full), get_criterion(name, variant)
    _, heads, neurons = score_batch(half, opt_mini_batch, criterion, shape)
    _, full_heads, full_neurons = score_batch(full, opt_mini_batch, criterion, shape)
    assert heads.device.type == "cuda" and heads.isfinite().all()
    floor = HALF_AGREEMENT.get(name, 0.95)
    assert per_layer_agreement(heads.cpu(), full_heads.cpu()).mean() >= floor
    if not criterion.heads_only:
        assert per_layer_agreement(neurons.cpu(), full_neurons.cpu()).mean() >= floor


@pytest.fixture(scope="module")
def opt_mini_batch(tokenizer):
    from shadow.data import load_calibration

    return collate(load_calibration(settings("calibration", limit=4), tokenizer, 512)[:4], 1)


def spread(tmp_path, rest: int | str):
    """A tiny OPT saved and loaded back by accelerate with its embeddings and first layer on GPU 0 and its other
    two layers on ``rest`` (GPU 1, or the CPU: offloaded, executed on GPU 0)."""
    from transformers import AutoModelForCausalLM

    model = make_tiny_opt(hidden=64, ffn=256)
    model.save_pretrained(tmp_path / "model")
    placement = {"model.decoder.embed_tokens": 0, "lm_head": 0, "model.decoder.embed_positions": 0,
                 "model.decoder.final_layer_norm": 0, "model.decoder.layers.0": 0, "model.decoder.layers.1": rest,
                 "model.decoder.layers.2": rest}
    placed = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=placement,
                                                  offload_folder=str(tmp_path / "offload")).eval()
    return model.cuda(), placed


def same_decoding(resident, placed) -> None:
    predictor = token_predictor(resident, "shadow").cuda()
    ids = torch.randint(4, 8192, (1, 12), generator=torch.Generator().manual_seed(5))
    here = TokenDecoder(resident, predictor, Policy("global", 0.5, 0.5)).generate(ids, 6)
    there = TokenDecoder(placed, predictor, Policy("global", 0.5, 0.5)).generate(ids, 6)
    assert torch.equal(there.tokens, here.tokens) and torch.equal(there.masks.heads, here.masks.heads)
    torch.testing.assert_close(there.logits, here.logits, rtol=1e-4, atol=1e-4)
    masks = request_masks(resident, 5)
    masked, _ = masked_and_pruned_logits(resident, masks, ids.cuda())
    _, sparse = masked_and_pruned_logits(placed, masks, ids.cuda())
    torch.testing.assert_close(sparse.cpu(), masked.cpu(), rtol=1e-4, atol=1e-4)


def test_cpu_offload_with_cuda_execution(tmp_path):
    from shadow.offload import offloaded

    resident, placed = spread(tmp_path, "cpu")
    assert offloaded(placed.model.decoder.layers[1]) and not offloaded(placed.model.decoder.layers[0])
    same_decoding(resident, placed)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_layers_on_two_gpus(tmp_path):
    resident, placed = spread(tmp_path, 1)
    assert placed.model.decoder.layers[2].fc1.weight.device == torch.device("cuda:1")
    same_decoding(resident, placed)
