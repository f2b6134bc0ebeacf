"""Sparse execution equals the masked model: per request (one forward, generation with its KV cache) and per
token (greedy decoding with a predictor in the loop, each step's logits against the masked model's)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import nullcontext

import pytest
import torch
from helpers import (
    CONF_DIR,
    ROOT,
    calibration_examples,
    decode_and_check,
    make_tiny_llama,
    make_tiny_opt,
    masked_and_pruned_logits,
    request_decode_and_check,
    request_masks,
    shape_of,
    threshold_decode_and_check,
    tiny_models,
    token_predictor,
    use_triton_kernels,
)
from hydra import compose, initialize_config_dir
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from shadow import kernels
from shadow.benchmarks.latency import COLUMNS, predictor_dtype, run
from shadow.errors import ConfigError
from shadow.masking import apply_masks
from shadow.placements import PLACEMENTS
from shadow.policy import Masks, Policy
from shadow.predictors import Predictor
from shadow.sparse import RequestDecoder, ThresholdDecoder, TokenDecoder, pruned
from shadow.sparse.steps import ThresholdStep, UnitStep
from shadow.thresholds import calibrate, sites
from shadow.traces import layer_features
from shadow.weights_read import masks_read


@pytest.mark.parametrize("seed", [0, 1])
def test_pruned_forward_equals_masked_forward(tiny_opt, seed):
    ids = torch.randint(4, 8192, (1, 20), generator=torch.Generator().manual_seed(seed))
    masks = request_masks(tiny_opt, seed)
    masked, sparse = masked_and_pruned_logits(tiny_opt, masks, ids)
    with torch.no_grad(), pruned(tiny_opt, masks, shape_of(tiny_opt)):
        assert tiny_opt.model.decoder.layers[0].fc1.out_features == 16  # half of the 32 neurons
    with torch.no_grad():
        restored = tiny_opt(ids).logits
    torch.testing.assert_close(sparse, masked, rtol=1e-5, atol=1e-5)
    assert tiny_opt.model.decoder.layers[0].fc1.out_features == 32
    assert not torch.allclose(restored, masked)


def test_a_layer_without_heads_still_runs(tiny_opt):
    ids = torch.randint(4, 8192, (1, 12), generator=torch.Generator().manual_seed(3))
    masks = request_masks(tiny_opt, 3)
    masks.heads[0, 1] = False  # a global policy can empty a layer
    masked, sparse = masked_and_pruned_logits(tiny_opt, masks, ids)
    torch.testing.assert_close(sparse, masked, rtol=1e-5, atol=1e-5)


def test_generation_with_the_kv_cache_equals_masked_generation(tiny_opt):
    ids = torch.randint(4, 8192, (1, 10), generator=torch.Generator().manual_seed(4))
    masks = request_masks(tiny_opt, 4)
    settings = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 1}
    with torch.no_grad():
        with apply_masks(tiny_opt, masks):
            masked = tiny_opt.generate(ids, **settings)
        with pruned(tiny_opt, masks, shape_of(tiny_opt)):
            sparse = tiny_opt.generate(ids, **settings)
    assert torch.equal(sparse, masked)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_per_request_decoding_equals_the_masked_model(family, gather):
    """One mask per request, read in place at every step: a batch of two under its union, on every kernel backend,
    in eager and static steps (as CUDA graphs capture them); on the Llama with query-head units too."""
    model = make_tiny_opt() if family == "opt" else make_tiny_llama()
    request_decode_and_check(model, batch=2)
    request_decode_and_check(model, batch=2, static=True)
    if family == "llama":
        request_decode_and_check(model, attention_unit="query_head")


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_layers_a_request_keeps_whole_run_their_dense_products(family, monkeypatch):
    """A fixed mask that keeps a layer whole runs that layer's own products: with layer 0 whole and the others
    at half, the steps are the masked model's; with every layer whole (the same engine's dense step, the latency
    table's anchor) they are the dense model's, and no gather kernel runs."""
    model = make_tiny_opt() if family == "opt" else make_tiny_llama()
    shape = shape_of(model)
    gen = torch.Generator().manual_seed(8)
    masks = Policy("local", 0.5, 0.5).select(torch.rand(1, shape.layers, shape.heads, generator=gen),
                                             torch.rand(1, shape.layers, shape.neurons, generator=gen))
    masks.heads[:, 0], masks.neurons[:, 0] = True, True
    every = Masks(torch.ones_like(masks.heads), torch.ones_like(masks.neurons))
    ids = torch.randint(4, 8192, (2, 9), generator=gen)
    calls = []

    def recorded(name: str):
        real = getattr(kernels, name)
        return lambda *args: calls.append(name) or real(*args)

    for name in ("rows", "rows_into", "rows_into_pair", "gated_rows", "columns"):
        monkeypatch.setattr(kernels, name, recorded(name))
    for kept, expected in ((masks, masks), (every, None)):
        calls.clear()
        out = RequestDecoder(model, shape).generate(ids, 6, kept)
        sequences = torch.cat([ids, out.tokens[:, :-1]], 1)
        with torch.no_grad(), apply_masks(model, expected) if expected is not None else nullcontext():
            reference = model(sequences).logits
        torch.testing.assert_close(out.logits, reference[:, 9:], rtol=1e-4, atol=1e-4)
        assert (calls == []) == (expected is None)


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("static", [False, True])
def test_dense_key_values_decode_as_the_masked_model_and_read_every_key_and_value(family, static):
    """Every head's key and value at every step by the dense projections (Polar Sparsity's choice) instead of the
    kept heads' with catch-up: the masked model's outputs all the same (its pruned heads write their cache too),
    eager and static, with the key and value projections counted whole in what a step reads."""
    model = make_tiny_opt() if family == "opt" else make_tiny_llama()
    predictor = token_predictor(model, "shadow", attention_unit="query_head")
    out, _ = decode_and_check(model, predictor, Policy("local", 0.5, 0.5), static=static, dense_key_values=True)
    decoder = TokenDecoder(model, predictor, Policy("local", 0.5, 0.5), dense_key_values=True)
    assert masks_read(model, out.masks) < decoder.share_read(out) < 1


def test_per_request_decoding_names_the_masks_it_takes(tiny_opt):
    decoder, ids = RequestDecoder(tiny_opt, shape_of(tiny_opt)), torch.randint(4, 8192, (2, 5))
    with pytest.raises(ValueError, match=r"takes each request's masks, heads \(B or 1, 3, 4\).*got none"):
        decoder.generate(ids, 3)
    masks = request_masks(tiny_opt, 0)
    with pytest.raises(ValueError, match=r"for B = 2 prompts; got heads \(3, 4\)"):
        decoder.generate(ids, 3, Masks(masks.heads[0], masks.neurons[0]))


def test_pruned_takes_one_request():
    batch_of_two = Masks(torch.ones(2, 3, 4, dtype=torch.bool), torch.ones(2, 3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="one request's masks"), pruned(torch.nn.Module(), batch_of_two, None):
        pass


@pytest.mark.parametrize("policy", ["global", "local"])
def test_shadow_per_token_decoding_equals_the_masked_model(tiny_opt, policy):
    predictor = token_predictor(tiny_opt, "shadow")
    out, sequence = decode_and_check(tiny_opt, predictor, Policy(policy, 0.5, 0.5))
    # the masks are the predictor's on layer 0's attention output at each position, as in the accuracy setting
    features = layer_features(tiny_opt, sequence, torch.ones_like(sequence), None, [0])
    expected = Policy(policy, 0.5, 0.5).select(*predictor(features))
    prompt = sequence.shape[1] - out.masks.heads.shape[0]
    assert torch.equal(out.masks.heads, expected.heads[0, prompt:])
    assert torch.equal(out.masks.neurons, expected.neurons[0, prompt:])
    # heads come back after being pruned, so keys and values skipped earlier were computed late
    came_back = (~out.masks.heads[:-1] & out.masks.heads[1:]).any()
    assert came_back


@pytest.mark.parametrize("placement,policy", [("shadow", "local"), ("shadow", "global"), ("dejavu", "local")])
def test_a_batch_decodes_as_the_masked_model_under_its_union_mask(tiny_opt, placement, policy):
    """Each step keeps, per layer, the union of the requests' predicted units: the masks returned are that union
    (each request's own mask is inside it), and every request's logits are the masked model's under it."""
    predictor = token_predictor(tiny_opt, placement, lookahead=True)
    out, sequences = decode_and_check(tiny_opt, predictor, Policy(policy, 0.5, 0.5), batch=3)
    features = layer_features(tiny_opt, sequences, torch.ones_like(sequences), None, predictor.feature_layers)
    own = Policy(policy, 0.5, 0.5).select(*predictor(features))
    prompt = sequences.shape[1] - out.masks.heads.shape[0]
    if placement == "shadow":  # DejaVu-style predictors read the union-masked model's features, not the dense one's
        assert torch.equal(out.masks.neurons, own.neurons[:, prompt:].any(0))
        assert torch.equal(out.masks.heads, own.heads[:, prompt:].any(0))
    assert (out.masks.neurons.sum(-1) > own.neurons[:, prompt:].sum(-1).amax(0)).any()  # more than any one request


@pytest.mark.parametrize("family", list(tiny_models()))
@pytest.mark.parametrize("method", ["teal", "wina", "cats"])
def test_thresholded_decoding_equals_the_thresholded_model(family, method, gather):
    model = tiny_models()[family]()
    threshold_decode_and_check(model, method)


def test_thresholded_decoding_rejects_thresholds_of_another_method(tiny_opt):
    limits = calibrate(tiny_opt, calibration_examples(), "cats", 4, 1).thresholds([0.5])
    with pytest.raises(ValueError, match=r"^thresholds of shape \(1, 3\) for method=teal; it has 6 sites"):
        ThresholdDecoder(tiny_opt, "teal", limits)


def test_per_token_decoding_with_an_int8_predictor_equals_the_masked_model(tiny_opt):
    decode_and_check(tiny_opt, token_predictor(tiny_opt, "shadow").run_as("int8"), Policy("local", 0.5, 0.5))


@pytest.mark.parametrize("lookahead", [False, True])
def test_dejavu_per_token_decoding_equals_the_masked_model(tiny_opt, lookahead):
    decode_and_check(tiny_opt, token_predictor(tiny_opt, "dejavu", lookahead), Policy("local", 0.5, 0.5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_per_token_decoding_in_half_precision_equals_the_masked_model(dtype, backend, monkeypatch):
    """torch's kernels in half precision (sampled_addmm has none) and Triton's (in its interpreter): the same masks
    and, within half precision's rounding, the same logits and tokens as the masked half-precision model."""
    if backend == "triton":
        use_triton_kernels(monkeypatch)
    model = make_tiny_opt(dtype=dtype)
    decode_and_check(model, token_predictor(model, "shadow"), Policy("global", 0.5, 0.5))
    decode_and_check(model, token_predictor(model, "dejavu", lookahead=True), Policy("local", 0.5, 0.5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_masked_and_pruned_outputs_follow_float32(dtype):
    """The same weights in half precision: masked and pruned logits stay within a few units in the last place
    (8 eps of the largest logit) of the float32 masked model's."""
    ids = torch.randint(4, 8192, (1, 20), generator=torch.Generator().manual_seed(2))
    masks = request_masks(make_tiny_opt(), 2)
    full, _ = masked_and_pruned_logits(make_tiny_opt(), masks, ids)
    masked, sparse = masked_and_pruned_logits(make_tiny_opt(dtype=dtype), masks, ids)
    tolerance = 8 * torch.finfo(dtype).eps * full.abs().max().item()
    for half in (masked, sparse):
        assert half.dtype == dtype
        torch.testing.assert_close(half.float(), full, rtol=0, atol=tolerance)


def test_per_token_decoding_of_an_opt_350m_shaped_model():
    model = make_tiny_opt(like_350m=True)  # LayerNorm after each block, embeddings projected in and out
    decode_and_check(model, token_predictor(model, "shadow"), Policy("global", 0.5, 0.5))


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_per_token_decoding_with_an_empty_layer(family):
    model = make_tiny_opt() if family == "opt" else make_tiny_llama()
    predictor = token_predictor(model, "shadow")
    H = shape_of(model).heads
    with torch.no_grad():
        predictor.heads[0][-1].bias[H:2 * H] = -1e4  # layer 1's heads (key-value groups) always rank last
    out, _ = decode_and_check(model, predictor, Policy("global", 0.6, 0.5))
    assert not out.masks.heads[:, 1].any()


SYNCING = {"aten.nonzero", "aten._local_scalar_dense", "aten.masked_select", "aten._unique", "aten._unique2",
           "aten.unique_dim", "aten.unique_consecutive", "aten.is_nonzero", "aten.equal"}


class HostReads(TorchDispatchMode):
    """Counts the operations that read a CUDA tensor back to the host (and so wait for the device): those of
    ``SYNCING``, indexing by a boolean mask, ``repeat_interleave`` of counts without its output size, and
    ``tolist``/``item``/``numpy``, which skip the dispatcher on CPU tensors and are caught one level up."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        indices = args[1] if name in ("aten.index", "aten.index_put_", "aten.index_put") else []
        if (name in SYNCING or any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)
                or (name == "aten.repeat_interleave" and kwargs.get("output_size") is None and len(args) == 1)):
            self.reads.append(name)
        return func(*args, **kwargs)


class MethodReads(TorchFunctionMode):
    def __init__(self, log: list[str]):
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.numpy):
            self.log.append(func.__name__)
        return func(*args, **(kwargs or {}))


def host_reads_per_step(step_class: type, monkeypatch) -> list[list[str]]:
    """From now on, each call of ``step_class`` appends the host reads it made (``HostReads``, ``MethodReads``)."""
    step, counted = step_class.__call__, []

    def counting(*args):
        with HostReads() as log, MethodReads(log.reads):
            out = step(*args)
        counted.append(log.reads)
        return out

    monkeypatch.setattr(step_class, "__call__", counting)
    return counted


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize(("placement", "policy", "reads"), [("shadow", "local", 0), ("dejavu", "local", 0),
                                                            ("shadow", "global", 1)])
def test_a_decoding_step_reads_nothing_back_from_the_device(family, backend, placement, policy, reads, monkeypatch):
    """A step under a local policy reads nothing back; under a global one ShadowLLM's predictor reads its layers'
    kept counts once. The token stays on the device until the end."""
    if backend == "triton":
        use_triton_kernels(monkeypatch)
    model = make_tiny_opt() if family == "opt" else make_tiny_llama()
    decoder = TokenDecoder(model, token_predictor(model, placement, lookahead=True,
                                                  attention_unit="query_head"), Policy(policy, 0.5, 0.5))
    counted = host_reads_per_step(UnitStep, monkeypatch)
    ids = torch.randint(4, 8192, (1, 7), generator=torch.Generator().manual_seed(1))
    decoder.generate(ids, 6)
    assert len(counted) == 5 and all(len(step_reads) == reads for step_reads in counted), counted


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("method", ["teal", "wina", "cats"])
def test_a_thresholded_step_reads_nothing_back_with_the_triton_kernels(family, method, monkeypatch):
    """TEAL's and CATS' steps on Triton's kernels (in the interpreter) test their inputs inside the products and
    sum the shares kept on the device: a batch of two reads nothing back at any step, and its static steps (those
    CUDA graphs capture) equal the thresholded model."""
    use_triton_kernels(monkeypatch)
    model = make_tiny_opt() if family == "opt" else make_tiny_llama()
    limits = calibrate(model, calibration_examples(), method, 4, 1).thresholds([0.5] * len(sites(model, method)))
    step = ThresholdStep.__call__
    counted = host_reads_per_step(ThresholdStep, monkeypatch)
    ids = torch.randint(4, 8192, (2, 7), generator=torch.Generator().manual_seed(1))
    out = ThresholdDecoder(model, method, limits, static=True).generate(ids, 6)
    assert len(counted) == 5 and all(reads == [] for reads in counted), counted
    assert (out.kept < 1).any()
    monkeypatch.setattr(ThresholdStep, "__call__", step)
    threshold_decode_and_check(model, method, static=True)


def signature(value):
    """What a CUDA graph bakes into a launch: a tensor's layout and place in its storage (not its values), any
    other argument's value."""
    if isinstance(value, torch.Tensor):
        return "tensor", tuple(value.shape), tuple(value.stride()), value.storage_offset(), value.dtype
    if isinstance(value, torch.UntypedStorage):
        return "storage", value.nbytes()
    if isinstance(value, (list, tuple)):
        return tuple(signature(v) for v in value)
    return repr(value)


class Launches(TorchDispatchMode):
    """Every operation with its arguments' signatures."""

    def __init__(self):
        super().__init__()
        self.log: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.log.append((str(func), signature(args), signature(sorted(kwargs.items()))))
        return func(*args, **kwargs)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_a_static_step_launches_the_same_work_at_every_position(family, monkeypatch):
    """What a CUDA graph replays: every step of a static decoding runs the same operations and kernels on tensors
    of the same layouts at the same places, with the same other arguments, and reads nothing back."""
    from shadow.kernels.triton_gather import TritonGather

    launches = Launches()

    class Recorded:  # the Triton kernels (in the interpreter), their calls logged with the other operations
        positions_on_device = units_in_kernel = True

        def __getattr__(self, name):
            def call(*args, **kwargs):
                launches.log.append((name, signature(args), signature(sorted(kwargs.items()))))
                return getattr(TritonGather, name)(*args, **kwargs)
            return call

    pytest.importorskip("triton")
    monkeypatch.setattr(kernels, "backend", lambda weight: Recorded())
    model = make_tiny_opt() if family == "opt" else make_tiny_llama()
    decoder = TokenDecoder(model, token_predictor(model, "shadow", attention_unit="query_head"),
                           Policy("local", 0.5, 0.5), static=True)
    step, steps = UnitStep.__call__, []

    def logged(*args):
        launches.log = []
        with launches, HostReads() as reads, MethodReads(reads.reads):
            out = step(*args)
        steps.append((launches.log, reads.reads))
        return out

    monkeypatch.setattr(UnitStep, "__call__", logged)
    decoder.generate(torch.randint(4, 8192, (1, 7), generator=torch.Generator().manual_seed(1)), 6)
    assert len(steps) == 5 and all(reads == [] for _, reads in steps)
    first = steps[0][0]
    for log, _ in steps[1:]:
        assert len(log) == len(first)
        differing = [(a, b) for a, b in zip(first, log, strict=True) if a != b]
        assert not differing, differing[0]


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_static_steps_equal_the_masked_model(family, backend, monkeypatch):
    """Static steps (those CUDA graphs capture) keep the masked model's outputs: run as they are here, with the
    position read on the device by Triton's kernels, on the host by the compiled ones."""
    if backend == "triton":
        use_triton_kernels(monkeypatch)
    model = make_tiny_opt() if family == "opt" else make_tiny_llama()
    predictor = token_predictor(model, "shadow", attention_unit="query_head")
    decode_and_check(model, predictor, Policy("local", 0.5, 0.5), static=True)


def test_what_keeps_a_step_from_cuda_graphs_is_named(tiny_opt):
    """Asked for CUDA graphs where they cannot capture the step, the decoder says why (checked here on the CPU,
    where the compiled kernels are not Triton's)."""
    local = TokenDecoder(tiny_opt, token_predictor(tiny_opt, "shadow"), Policy("local", 0.5, 0.5))
    assert "use policy=local" in TokenDecoder(tiny_opt, token_predictor(tiny_opt, "shadow"),
                                              Policy("global", 0.5, 0.5)).step.capture_blocker(1)
    assert "decode one request at a time" in local.step.capture_blocker(2)
    assert "the Triton kernels are not in use" in local.step.capture_blocker(1)
    assert not local.step.static(1, None)  # by default, only on CUDA


def test_host_reads_are_counted():
    """The counter of the test above sees each kind of read it looks for."""
    x, counts = torch.randn(6), torch.tensor([1, 2])
    with HostReads() as log, MethodReads(log.reads):
        x[x > 0], x.nonzero(), counts.repeat_interleave(counts), int(x.argmax()), counts.tolist(), x.unique()
        x.repeat_interleave(2), x[torch.tensor([0, 2])], x.sort()  # none of these reads
    assert len(log.reads) == 6, log.reads


def test_per_token_decoding_rejects_what_it_cannot_run(tiny_opt):
    shape = shape_of(tiny_opt)
    late = Predictor(shape, 16, PLACEMENTS["shadow"].groups(shape.layers, 1, False), "mlp", 8, 8, False)
    with pytest.raises(ValueError, match="predictor.layer=1"):
        TokenDecoder(tiny_opt, late, Policy("global", 0.5, 0.5))
    with pytest.raises(ValueError, match="policy=global"):
        TokenDecoder(tiny_opt, token_predictor(tiny_opt, "dejavu"), Policy("global", 0.5, 0.5))


def test_latency_benchmark_timing_presets():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        full, quick, mixed = (compose(config_name="latency", overrides=o) for o in (
            [], ["timing=quick"], ["timing=quick", "new_tokens=64"]))
    assert (full.rounds, full.new_tokens, quick.rounds, quick.new_tokens) == (5, 128, 3, 32)
    assert (mixed.rounds, mixed.new_tokens, full.predictor.dtype) == (3, 64, None)
    assert predictor_dtype(full) == "int8"
    full.device, full.dtype = "cuda", "bfloat16"
    assert predictor_dtype(full) == "bfloat16"


@pytest.mark.slow
def test_latency_benchmark_writes_its_table(tmp_path):
    """With float32 predictors (the CPU's default, int8, runs in the test below)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="latency", overrides=["arch=opt-125m", "prompt=6", "new_tokens=3",
                                                        "min_run_time=0.01", "rounds=2", "sparsity=[0.5]",
                                                        "logger=none", "predictor.dtype=float32"])
    rows = run(cfg, tmp_path)
    assert [(r["method"], r["granularity"]) for r in rows] == [
        ("dense", "-"), ("dense", "engine"), ("static", "request"), ("shadow", "request"), ("dejavu", "request"),
        ("griffin", "request"), ("shadow", "token"), ("dejavu", "token"), ("teal", "token"), ("wina", "token"),
        ("cats", "token")]
    assert all(r["total_ms"] > 0 and r["first_token_ms"] > 0 for r in rows)
    for r in rows:  # steps after the first token, timed as the difference (noisy at 3 tokens, exact at 128)
        assert r["step_ms"] == pytest.approx((r["total_ms"] - r["first_token_ms"]) / 2)
        assert r["decode_speedup"] == pytest.approx(rows[0]["step_ms"] / r["step_ms"])
        assert r["engine_speedup"] == pytest.approx(rows[1]["step_ms"] / r["step_ms"])
    # the step's time over its weights' time at the measured copy bandwidth: that time is the same for both dense
    # rows, and a sparse row's is its share of it (steps at 3 tokens are noisy, even negative: only ratios hold)
    dense_bytes = rows[0]["step_ms"] / rows[0]["bytes_multiple"]
    assert dense_bytes > 0
    assert rows[1]["step_ms"] / rows[1]["bytes_multiple"] == pytest.approx(dense_bytes)
    assert rows[2]["step_ms"] / rows[2]["bytes_multiple"] == pytest.approx(dense_bytes * rows[2]["weights_read"])
    assert all(r["predictor_share"] > 0 for r in rows if r["method"] in ("shadow", "dejavu", "griffin"))
    # every layer keeps half its key-value groups and FFN units, whichever ones: the same weights read; TEAL
    # reads fewer than every column of each projection (at 3 tokens the thresholds keep about half), CATS all of
    # the attention and the FFN's up projection (OPT), so more
    assert rows[0]["weights_read"] == rows[1]["weights_read"] == 1 and 0.5 < rows[2]["weights_read"] < 1
    assert all(r["weights_read"] == pytest.approx(rows[2]["weights_read"]) for r in rows[2:5] + rows[6:8])
    assert rows[2]["weights_read"] < rows[5]["weights_read"] < 1  # GRIFFIN: half the FFN, attention whole
    assert 0.5 < rows[8]["weights_read"] < 0.9 and 0.5 < rows[9]["weights_read"] < 0.9  # TEAL, WINA
    assert rows[2]["weights_read"] < rows[10]["weights_read"] < 1
    assert (tmp_path / "latency.csv").read_text().splitlines()[0] == ",".join(COLUMNS)
    assert (tmp_path / "latency.md").read_text().count("\n| ") == len(rows) + 1


def test_latency_benchmark_rows_per_batch_size(tmp_path):
    """Above batch 1: dense, static and per-token rows, each against the dense row of its batch size (int8
    predictors, the CPU's default)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="latency", overrides=["arch=opt-125m", "prompt=6", "new_tokens=3",
                                                        "min_run_time=0.01", "rounds=1", "sparsity=[0.5]",
                                                        "batch=[1,3]", "logger=none"])
    rows = run(cfg, tmp_path)
    assert [(r["method"], r["granularity"], r["batch"]) for r in rows] == [
        ("dense", "-", 1), ("dense", "engine", 1), ("static", "request", 1), ("shadow", "request", 1),
        ("dejavu", "request", 1), ("griffin", "request", 1), ("shadow", "token", 1), ("dejavu", "token", 1),
        ("teal", "token", 1), ("wina", "token", 1), ("cats", "token", 1), ("dense", "-", 3), ("dense", "engine", 3),
        ("static", "request", 3), ("griffin", "request", 3), ("shadow", "token", 3), ("dejavu", "token", 3),
        ("teal", "token", 3), ("wina", "token", 3), ("cats", "token", 3)]
    assert all(r["decode_speedup"] == pytest.approx(rows[11]["step_ms"] / r["step_ms"]) for r in rows[11:])
    assert all(r["engine_speedup"] == pytest.approx(rows[12]["step_ms"] / r["step_ms"]) for r in rows[11:])
    assert rows[17]["weights_read"] > rows[8]["weights_read"]  # three requests' union of TEAL's channels
    assert rows[14]["weights_read"] >= rows[5]["weights_read"]  # and of GRIFFIN's units
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        bad = compose(config_name="latency", overrides=["batch=[0]", "logger=none"])
    with pytest.raises(ConfigError, match=r"^batch=\[0\] must list batch sizes"):
        run(bad, tmp_path)


def test_latency_benchmark_runs_the_methods_asked(tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="latency", overrides=["arch=opt-125m", "prompt=6", "new_tokens=3", "rounds=1",
                                                        "min_run_time=0.01", "methods=[cats,static]", "logger=none"])
        bad = compose(config_name="latency", overrides=["methods=[deja_vu,teal]", "logger=none"])
    assert [r["method"] for r in run(cfg, tmp_path)] == ["dense", "dense", "static", "cats"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        dense_kv = compose(config_name="latency", overrides=["arch=opt-125m", "prompt=6", "new_tokens=3", "rounds=1",
                                                             "min_run_time=0.01", "methods=[shadow]", "logger=none",
                                                             "dense_key_values=true"])
    rows = run(dense_kv, tmp_path)
    assert [(r["method"], r["granularity"]) for r in rows][2:] == [("shadow", "request"), ("shadow", "token")]
    assert rows[3]["weights_read"] > rows[2]["weights_read"]  # every key and value projection read whole
    with pytest.raises(ConfigError, match=r"^methods=\['deja_vu', 'teal'\] holds \['deja_vu'\]; list rows among "
                                          r"static, shadow, dejavu, griffin, teal, wina, cats"):
        run(bad, tmp_path)


def test_latency_benchmark_runs_each_row_twice_per_round_interleaved(tiny_opt):
    """Each measurement is one untimed run, then one timed run; the rows take turns round by round."""
    from omegaconf import OmegaConf

    from shadow.benchmarks.latency import Bench, Case

    calls = []
    bench = Bench.__new__(Bench)  # the cases only record their runs (and apply no masks: all weights read)
    bench.model = tiny_opt
    bench.cfg = OmegaConf.create({"rounds": 3, "new_tokens": 4, "min_run_time": 0.01})
    cases = [Case(name, "-", 0.0, 1, lambda n, name=name: calls.append((name, n)) or time.sleep(n / 1000))
             for name in ("dense", "static")]  # a millisecond per token: steps that take time
    rows = bench.measure(cases)
    one_round = [("dense", 4)] * 2 + [("dense", 1)] * 2 + [("static", 4)] * 2 + [("static", 1)] * 2
    assert calls == one_round * 3
    assert [r["method"] for r in rows] == ["dense", "static"] and all(r["weights_read"] == 1 for r in rows)
    assert all(r["engine_speedup"] is None for r in rows)  # no engine row among these cases


def test_latency_benchmark_places_layers_with_accelerate(tmp_path):
    """device_map=auto: the model is built on meta, placed by accelerate under memory caps and each weight created
    on its device; here every device is the CPU, so the table must come out as without it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="latency", overrides=["arch=opt-125m", "prompt=6", "new_tokens=3", "rounds=1",
                                                        "min_run_time=0.01", "device_map=auto", "logger=none"])
    rows = run(cfg, tmp_path)
    assert len(rows) == 11 and all(r["total_ms"] > 0 for r in rows)


def test_latency_benchmark_says_what_it_needs_when_it_cannot_fit(tmp_path):
    """Counted on meta before anything is built: OPT-66B in float32 does not fit this machine's RAM."""
    from shadow.errors import ConfigError

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="latency", overrides=["arch=opt-66b", "logger=none"])
    with pytest.raises(ConfigError, match=r"arch=opt-66b in dtype=float32 needs ≈\d+\.\d GB \(weights 26\d\.\d GB, "
                                          r"gathered 1\d\d\.\d GB, predictors \d+\.\d GB\) but cpu has"):
        run(cfg, tmp_path)


BUILD_PEAK = """
import resource, torch, transformers
from shadow.benchmarks.latency import build
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = build("opt-350m", "cpu", torch.bfloat16)
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(peak, {p.dtype for p in model.parameters()}, sum(p.numel() for p in model.parameters()))
"""


def test_latency_benchmark_builds_in_the_target_dtype_without_a_float32_copy():
    """Its peak memory stays below what the weights take in float32 (OPT-30B in fp16 fits an 80 GB card)."""
    result = subprocess.run([sys.executable, "-c", BUILD_PEAK], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    peak, rest = result.stdout.split(maxsplit=1)
    dtypes, params = rest.rsplit(maxsplit=1)
    assert dtypes == "{torch.bfloat16}"
    assert int(peak) < 4 * int(params)  # a float32 build, even freed at once, would peak above this


def test_per_token_decoding_leaves_the_model_as_it_found_it(tiny_opt, tmp_path):
    from safetensors.torch import save_file

    before = {k: v.clone() for k, v in tiny_opt.state_dict().items()}
    decode_and_check(tiny_opt, token_predictor(tiny_opt, "shadow"), Policy("local", 0.5, 0.5), new_tokens=3)
    after = tiny_opt.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].is_contiguous() for k in before)
    tied = "lm_head.weight"  # shares the embeddings' storage by design
    save_file({k: v for k, v in after.items() if k != tied}, str(tmp_path / "w.safetensors"))  # refuses shared storage


def test_sparse_execution_on_a_disk_offloaded_model_equals_the_resident_one(tiny_opt, tmp_path):
    """accelerate keeps offloaded weights on ``meta`` outside their module's forward: per-request pruning gathers,
    and per-token decoding reads, the weights it fetches for each layer."""
    from transformers import AutoModelForCausalLM

    from shadow.offload import offloaded

    tiny_opt.save_pretrained(tmp_path / "model")
    away = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map="auto", max_memory={"cpu": "64KB"},
                                                offload_folder=str(tmp_path / "offload")).eval()
    assert "disk" in set(away.hf_device_map.values()) and all(map(offloaded, away.model.decoder.layers))
    ids = torch.randint(4, 8192, (1, 12), generator=torch.Generator().manual_seed(5))
    masks = request_masks(tiny_opt, 5)
    masked, _ = masked_and_pruned_logits(tiny_opt, masks, ids)
    with torch.no_grad(), pruned(away, masks, shape_of(tiny_opt)):
        sparse = away(ids).logits
    torch.testing.assert_close(sparse, masked, rtol=1e-5, atol=1e-5)
    predictor = token_predictor(tiny_opt, "shadow")
    here = TokenDecoder(tiny_opt, predictor, Policy("global", 0.5, 0.5)).generate(ids, 6)
    there = TokenDecoder(away, predictor, Policy("global", 0.5, 0.5)).generate(ids, 6)
    assert torch.equal(there.tokens, here.tokens) and torch.equal(there.masks.heads, here.masks.heads)
    torch.testing.assert_close(there.logits, here.logits, rtol=1e-5, atol=1e-5)
