"""One job: calibration → importance traces → predictor → contextual masks → evaluation → results.

Traces and the predictor are artifacts cached under ``cache_dir``, keyed by exactly what determines them, so a
sparsity sweep scores and trains once and a rerun reuses both.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from lm_eval.utils import make_table
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import Tensor

from shadow import thresholds
from shadow.arch import Shape, family_of
from shadow.artifacts import cache_key, cached, check_space, find
from shadow.compose import check_devices, check_job, eval_context
from shadow.config import resolved_sparsities
from shadow.criteria import Criterion, get_criterion
from shadow.data import Example, examples_fingerprint, load_calibration
from shadow.evaluate.perplexity import evaluate_perplexity, load_eval_data
from shadow.evaluate.requests import MaskFn
from shadow.evaluate.tasks import check_tasks, evaluate_tasks
from shadow.models import check_memory, load_model, load_tokenizer, model_dtype, model_fingerprint, pad_id
from shadow.offload import input_device
from shadow.placements import PLACEMENTS, MaskJob
from shadow.policy import Policy, SparsityMeter
from shadow.predictors import Predictor, fit_predictor, held_out_report, load_predictor, save_predictor
from shadow.traces import TraceShards, compute_traces
from shadow.tracking import Tracker, flat_config, write_results
from shadow.weights_read import (
    InputCounter,
    kv_shares,
    read_whole,
    row_roles,
    sparsity_meter,
    step_parameters,
    token_reads,
    unit_reads,
)

log = logging.getLogger(__name__)
NO_REPORT: dict = {"metrics": {}, "per_layer": {}}
NO_MASKS: MaskFn = PLACEMENTS["dense"].masks(None)
PREDICTOR_VERSION = 2  # raised when a trained predictor's artifact changes (2: it carries its LayerScales)


def with_setup(report: dict, metas: list[dict]) -> dict:
    """The report with ``setup_seconds``: what building the artifacts behind the mask source took (scoring and
    training, or calibration), as recorded when each was built, reused or not; None if one predates that record.
    A time, not a result: it goes into the job's record beside its metrics, not among them."""
    seconds = [meta.get("build_seconds") for meta in metas]
    return {**report, "setup_seconds": None if None in seconds else sum(seconds)}


@contextmanager
def stage(name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    log.info("%-10s done in %.1f s", name, time.perf_counter() - start)


def calibrated_thresholds(cfg: DictConfig, model, model_id: dict, examples: list[Example], padding: int
                          ) -> tuple[Tensor, list[dict]]:
    """The (sites, L) thresholds of a thresholded placement (``shadow.thresholds``) at the job's sparsities, from
    histograms of the dense model's activations on the calibration set: each site at its share or, with
    ``predictor.allocation=greedy``, each layer's row of TEAL's greedy path nearest their parameter-weighted mean
    (both cached artifacts; one path serves every sparsity), and the artifacts' metadata."""
    method = cfg.predictor.name
    inputs = {"model": model_id, "examples": examples_fingerprint(examples), "method": method,
              "batch_size": cfg.calibration.batch_size, "bins": thresholds.BINS, "version": 2}

    def build(out: Path) -> dict:
        histograms = thresholds.calibrate(model, examples, method, cfg.calibration.batch_size, padding)
        save_file({"counts": histograms.counts}, str(out / "histograms.safetensors"))
        return {}

    with stage("calibration"):
        directory, meta = cached(cfg.cache_dir, "histograms", inputs, build)
    head, neuron = resolved_sparsities(cfg)
    shares = [head if site.share == "head" else neuron for site in thresholds.sites(model, method)]
    counts = load_file(str(directory / "histograms.safetensors"))["counts"]
    histograms = thresholds.Histograms.of(model, method, counts)
    if cfg.predictor.allocation == "uniform":
        return histograms.thresholds(shares), [meta]

    def allocate(out: Path) -> dict:
        path, reached = thresholds.greedy_path(model, histograms, examples[:thresholds.GREEDY_EXAMPLES],
                                               cfg.calibration.batch_size, padding, method=method)
        save_file({"path": path, "reached": reached}, str(out / "path.safetensors"))
        return {}

    with stage("allocation"):
        allocation_dir, allocation_meta = cached(cfg.cache_dir, "allocation", {
            **inputs, "base": thresholds.GREEDY_BASE, "limit": thresholds.GREEDY_LIMIT,
            "tail": thresholds.GREEDY_TAIL, "examples_used": thresholds.GREEDY_EXAMPLES}, allocate)
    saved = load_file(str(allocation_dir / "path.safetensors"))
    weights = thresholds.projection_weights(model, method)
    target = thresholds.weighted(torch.tensor(shares, dtype=torch.float64), weights)
    allocated = thresholds.greedy_shares(saved["path"], saved["reached"], target.item())
    return histograms.thresholds(allocated), [meta, allocation_meta]


def mask_source(cfg: DictConfig, model, model_id: dict, examples: list[Example], criterion: Criterion,
                shape: Shape, policy: Policy, padding: int) -> tuple[MaskFn, dict, Tensor | None]:
    """The configured predictor placement as a mask source, a report (the predictor's held-out quality:
    ``metrics`` overall, ``per_layer`` lists; ``setup_seconds``) and a thresholded placement's thresholds (else
    None). Traces, the trained predictor and activation histograms are cached artifacts, made only for the
    placements that use them. ``model_id``: the weights' ``model_fingerprint``."""
    placement = PLACEMENTS[cfg.predictor.name]
    job = MaskJob(model, criterion, shape, policy, cfg.predictor, padding, cfg.seed, cfg.layer_scale)
    if placement.thresholds:
        limits, metas = calibrated_thresholds(cfg, model, model_id, examples, padding)
        return placement.masks(job), with_setup(NO_REPORT, metas), limits
    if not placement.uses_traces:
        return placement.masks(job), with_setup(NO_REPORT, []), None
    trace_inputs = {"model": model_id, "examples": examples_fingerprint(examples),
                    "criterion": OmegaConf.to_container(cfg.criterion), "batch_size": cfg.calibration.batch_size,
                    "seed": cfg.seed if criterion.seeded else None, "units": asdict(shape)}  # seeds share traces
    with stage("scoring"):
        traces_dir, traces_meta = cached(cfg.cache_dir, "traces", trace_inputs, lambda out: {
            "shards": compute_traces(model, examples, criterion, shape, cfg.calibration.batch_size, padding, out,
                                     cfg.seed)})
    job.traces = TraceShards.load(traces_dir)
    if not placement.trains:
        return placement.masks(job), with_setup(NO_REPORT, [traces_meta]), None
    device = torch.device(cfg.predictor.device) if cfg.predictor.device else input_device(model)
    training = {**{k: v for k, v in OmegaConf.to_container(cfg.predictor).items() if k not in ("granularity", "dtype")},
                "device": device.type}  # training on another kind of device gives other weights
    documents = [e.document for e in examples]
    predictor_inputs = {"traces": cache_key(trace_inputs), "predictor": training, "seed": cfg.seed,
                        "documents": cache_key({"documents": documents})}
    groups = placement.groups(shape.layers, cfg.predictor.layer, cfg.predictor.lookahead)

    def train(out: Path) -> dict:
        predictor, report = fit_predictor(job.traces, documents, shape, groups, cfg.predictor, cfg.seed,
                                          criterion.heads_only, device)
        return {**save_predictor(predictor, out), **report}

    with stage("predictor"):
        predictor_dir, predictor_meta = cached(cfg.cache_dir, "predictor", predictor_inputs, train)
    job.predictor = load_predictor(predictor_dir, predictor_meta).to(device)
    if cfg.layer_scale == "none":
        job.predictor.use_scales(None)
    report = {"metrics": predictor_meta["metrics"], "per_layer": predictor_meta["per_layer"]}
    if cfg.predictor.dtype != "float32":  # the quality reported is that of the predictor as it runs
        with stage("predictor in " + cfg.predictor.dtype):
            report = held_out_report(job.traces, documents, job.predictor.run_as(cfg.predictor.dtype), cfg.predictor,
                                     cfg.seed)
    return placement.masks(job), with_setup(report, [traces_meta, predictor_meta]), None


def predictor_parameters(cfg: DictConfig, shape: Shape, hidden: int, heads_only: bool) -> int:
    """Parameters of the configured placement's networks (0 for those without one), counted on networks built
    on the meta device (no memory)."""
    p = cfg.predictor
    groups = PLACEMENTS[p.name].groups(shape.layers, p.layer, p.lookahead)
    if not groups:
        return 0
    with torch.device("meta"):
        networks = Predictor.configured(shape, hidden, groups, p, heads_only)
    return sum(parameter.numel() for parameter in networks.parameters())


def reads_per_token(cfg: DictConfig, model, shape: Shape, per_layer: dict[str, list[float]], kept: Tensor | None,
                    nonzero: dict[str, list[float]], meter: SparsityMeter, heads_only: bool) -> dict[str, float]:
    """What a generated token reads (``shadow.weights_read``), from the evaluation: the unit masks' achieved
    sparsity per layer, or a thresholded placement's (sites, L) shares ``kept``; each projection's ``nonzero``
    input share; the predictor's networks (at every token, or once per request amortised over the tokens the
    request scored); and, with per-token masks, the layers computed whole before their mask is known."""
    layers = shape.layers
    if kept is not None:
        reads, rows = thresholds.reads(model, cfg.predictor.name, kept)
        kv = [1.0] * layers
    else:
        reads, rows = unit_reads(model, per_layer), row_roles(model)
        kv = kv_shares(per_layer) if per_layer else [1.0] * layers
    predictor = 0.0
    placement = PLACEMENTS[cfg.predictor.name]
    if placement.trains:
        per_token = cfg.predictor.granularity == "token"
        runs = 1.0 if per_token else meter.requests / max(meter.scored, 1)
        predictor = runs * predictor_parameters(cfg, shape, shape.attention_width, heads_only) / \
            step_parameters(model)
        if per_token:
            reads, kv = read_whole(model, reads, kv, *placement.computed_whole(layers, cfg.predictor.layer,
                                                                               cfg.predictor.lookahead))
    return token_reads(model, reads, rows, nonzero, kv, predictor)


def traces_bytes(shape: Shape, hidden: int, examples: int) -> float:
    """float32 features and head and neuron scores of every layer, per example."""
    return examples * shape.layers * (hidden + shape.heads + shape.neurons) * 4


def artifact_bytes(cfg: DictConfig, shape: Shape, hidden: int, examples: int, heads_only: bool) -> float:
    """Disk the traces and the predictor take: the traces, the networks' float32 weights."""
    traces = traces_bytes(shape, hidden, examples) if PLACEMENTS[cfg.predictor.name].uses_traces else 0.0
    return traces + predictor_parameters(cfg, shape, hidden, heads_only) * 4


def training_bytes(cfg: DictConfig, shape: Shape, hidden: int, examples: int, heads_only: bool) -> float:
    """Memory predictor training takes where it runs: float32 weights, gradients and AdamW's two moments, and one
    block of traces."""
    params = predictor_parameters(cfg, shape, hidden, heads_only)
    return params * 16 + min(traces_bytes(shape, hidden, examples), cfg.predictor.block_gb * 1e9) if params else 0.0


MASKS_ONLY = ("mask_from", "context")  # evaluation settings that change nothing without masks


def dense_metrics(cfg: DictConfig, model, tokenizer, model_id: dict, eval_input) -> dict[str, float]:
    """The dense model's quality under the job's evaluation, as ``dense/<metric>``: the reference beside the
    job's own. A cached artifact per weights, evaluation and seed, so a sweep evaluates the dense model once."""
    def build(out: Path) -> dict:
        if cfg.eval.name == "perplexity":
            metrics, _ = evaluate_perplexity(model, tokenizer, NO_MASKS, cfg.eval, eval_input)
        else:
            metrics, _, _ = evaluate_tasks(model, tokenizer, NO_MASKS, cfg.eval, eval_input, cfg.seed)
        (out / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items() if "sparsity" not in k}))
        return {}

    with stage("dense"):
        evaluation = {k: v for k, v in OmegaConf.to_container(cfg.eval).items() if k not in MASKS_ONLY}
        directory, _ = cached(cfg.cache_dir, "dense", {"model": model_id, "eval": evaluation, "seed": cfg.seed}, build)
    return {f"dense/{k}": v for k, v in json.loads((directory / "metrics.json").read_text()).items()}


def save_record(directory: Path, record: dict) -> dict:
    (directory / "record.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    return {}


RECORD_VERSION = 5  # raised when a job's record gains or changes a metric: older cached records are then rerun


def job_inputs(cfg: DictConfig, model_id: dict) -> dict:
    """What determines a job's results: the weights, every setting but where things go and how they are logged,
    and the record's version."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    for key in ("cache_dir", "logger", "force"):
        settings.pop(key, None)
    return {"model": model_id, "job": settings, "record": RECORD_VERSION}


def run(cfg: DictConfig, output_dir: Path, sweep_dir: Path | None = None, job_name: str = "") -> dict[str, float]:
    """Run the job described by ``cfg``; write metrics.json to output_dir and a line to sweep_dir/results.jsonl.

    A job whose results are already in the cache (same settings, same weights) is not rerun: its record is
    copied to output_dir and sweep_dir; ``force=true`` reruns it."""
    path, config = check_job(cfg)
    check_devices(cfg)
    cfg.model.dtype = model_dtype(cfg.model, config, cfg.device)  # auto: the checkpoint's, in records and keys
    cfg.eval.context = eval_context(cfg)  # auto: the placement's, likewise
    model_id = model_fingerprint(path, config, cfg.model)
    sweep_dir = sweep_dir or output_dir
    results_inputs = job_inputs(cfg, model_id)
    done = None if cfg.force else find(cfg.cache_dir, "results", results_inputs)
    if done is not None:
        record = {**json.loads((done / "record.json").read_text()), "output_dir": str(output_dir)}
        write_results(output_dir, sweep_dir, record)
        log.info("results exist for this config (%s): skipped; force=true reruns it", done)
        return record["metrics"]
    shape = family_of(config).shape(config, cfg.attention_unit)
    criterion = get_criterion(cfg.criterion.name, cfg.criterion.variant)
    policy = Policy.configured(cfg, criterion.heads_only, PLACEMENTS[cfg.predictor.name].dense_attention)
    if criterion.heads_only and resolved_sparsities(cfg)[1] > 0:
        log.info("%s scores heads only: every neuron is kept", cfg.criterion.name)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    examples = load_calibration(cfg.calibration, tokenizer, config.max_position_embeddings, cfg.seed)
    beside = 0.0 if cfg.predictor.device else training_bytes(cfg, shape, config.hidden_size, len(examples),
                                                             criterion.heads_only)
    check_memory(cfg.model, config, cfg.device, beside)
    check_space(cfg.cache_dir, artifact_bytes(cfg, shape, config.hidden_size, len(examples), criterion.heads_only),
                "traces and predictor")
    eval_input = load_eval_data(cfg.eval) if cfg.eval.name == "perplexity" else check_tasks(cfg.eval)
    torch.manual_seed(cfg.seed)
    group = "/".join(sweep_dir.parts[-2:])  # multirun/<date>/<time> → <date>/<time>
    with Tracker(cfg, output_dir, group=group, name=job_name or output_dir.name) as tracker:
        with stage("load"):
            model, _ = load_model(cfg.model, cfg.device)
        masks, report, limits = mask_source(cfg, model, model_id, examples, criterion, shape, policy,
                                            pad_id(tokenizer))
        extra = {}
        meter = sparsity_meter(model)
        under = nullcontext() if limits is None else thresholds.thresholded(model, cfg.predictor.name, limits)
        with stage("evaluate"), under as kept, InputCounter(model) as inputs:
            if cfg.eval.name == "perplexity":
                metrics, per_layer = evaluate_perplexity(model, tokenizer, masks, cfg.eval, eval_input, meter,
                                                         inputs)
            else:
                metrics, per_layer, out = evaluate_tasks(model, tokenizer, masks, cfg.eval, eval_input, cfg.seed,
                                                         meter, inputs)
                extra = {"lm_eval": out["results"]}
                log.info("lm-eval results\n%s", make_table(out))
                tracker.lm_eval(out)
        if kept is not None:  # no unit masks: sparsity from the entries the thresholds kept
            achieved, per_layer = thresholds.achieved(model, cfg.predictor.name, kept.shares())
            metrics.update(achieved)
        metrics.update(reads_per_token(cfg, model, shape, per_layer, None if kept is None else kept.shares(),
                                       inputs.shares(), meter, criterion.heads_only))
        metrics.update(report["metrics"])
        if cfg.eval.dense_reference and cfg.predictor.name != "dense":
            metrics.update(dense_metrics(cfg, model, tokenizer, model_id, eval_input))
        record = {**{k: v for k, v in flat_config(cfg).items() if k != "config"}, "metrics": metrics,
                  "sparsity_per_layer": per_layer, "predictor_per_layer": report["per_layer"],
                  "setup_seconds": report["setup_seconds"], **extra, "output_dir": str(output_dir)}
        write_results(output_dir, sweep_dir, record)
        cached(cfg.cache_dir, "results", results_inputs, lambda out: save_record(out, record),
               rebuild=True)  # it ran: any record there was missing, corrupt or forced
        tracker.summary(metrics, {"sparsity_per_layer": per_layer, "predictor_per_layer": report["per_layer"]})
    log.info("%s", " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics
