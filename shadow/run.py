"""One job: calibration → importance traces → predictor → contextual masks → evaluation → results.

Traces and the predictor are artifacts cached under ``cache_dir``, keyed by exactly what determines them, so a
sparsity sweep scores and trains once and a rerun reuses both.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from lm_eval.utils import make_table
from omegaconf import DictConfig, OmegaConf

from shadow.artifacts import cache_key, cached, check_space, find
from shadow.config import ConfigError, resolved_sparsities, validate
from shadow.criteria import Criterion, get_criterion
from shadow.data import Example, load_calibration
from shadow.data import fingerprint as examples_fingerprint
from shadow.evaluate.perplexity import evaluate_perplexity, load_eval_data
from shadow.evaluate.requests import MaskFn
from shadow.evaluate.tasks import check_tasks, evaluate_tasks
from shadow.models import (
    Shape,
    check_memory,
    check_opt,
    fingerprint,
    input_device,
    load_model,
    load_tokenizer,
    pad_id,
)
from shadow.policy import Policy
from shadow.predictors import (
    OracleMasks,
    PredictedMasks,
    StaticMasks,
    fit_predictor,
    load_predictor,
    placement_groups,
    save_predictor,
    static_importance,
)
from shadow.traces import TraceShards, compute_traces
from shadow.tracking import Tracker, flat_config, write_results

log = logging.getLogger(__name__)
NO_REPORT: dict = {"metrics": {}, "per_layer": {}}


@contextmanager
def stage(name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    log.info("%-10s done in %.1f s", name, time.perf_counter() - start)


def make_policy(cfg: DictConfig, heads_only: bool) -> Policy:
    """The selection rule; head and neuron sparsity default to ``sparsity`` (neurons: 0 for head-only criteria)."""
    head, neuron = resolved_sparsities(cfg)
    if heads_only and neuron > 0:
        log.info("%s scores heads only: every neuron is kept", cfg.criterion.name)
        neuron = 0.0
    return Policy(cfg.policy, head, neuron, cfg.min_heads, cfg.min_neurons, cfg.dense_first_layer)


def mask_source(cfg: DictConfig, model, model_id: dict, examples: list[Example], criterion: Criterion,
                shape: Shape, policy: Policy, padding: int) -> tuple[MaskFn, dict]:
    """The configured predictor placement as a mask source, and the predictor's held-out quality (``metrics``
    overall, ``per_layer`` lists). Traces and the trained predictor are cached artifacts; ``dense`` and
    ``oracle`` need neither. ``model_id``: the weights' ``fingerprint``."""
    name = cfg.predictor.name
    if name == "dense":
        return (lambda requests: None), NO_REPORT
    if name == "oracle":
        return OracleMasks(model, criterion, shape, policy, cfg.predictor.target_norm, padding, cfg.seed), NO_REPORT
    trace_inputs = {"model": model_id, "examples": examples_fingerprint(examples),
                    "criterion": OmegaConf.to_container(cfg.criterion), "batch_size": cfg.calibration.batch_size,
                    "seed": cfg.seed}
    with stage("scoring"):
        traces_dir, _ = cached(cfg.cache_dir, "traces", trace_inputs, lambda out: {"shards": compute_traces(
            model, examples, criterion, shape, cfg.calibration.batch_size, padding, out, cfg.seed)})
    if name == "static":
        return StaticMasks(*static_importance(TraceShards.load(traces_dir), cfg.predictor.target_norm),
                           policy), NO_REPORT
    device = torch.device(cfg.predictor.device) if cfg.predictor.device else input_device(model)
    training = {**{k: v for k, v in OmegaConf.to_container(cfg.predictor).items() if k != "granularity"},
                "device": device.type}  # training on another kind of device gives other weights
    documents = [e.document for e in examples]
    predictor_inputs = {"traces": cache_key(trace_inputs), "predictor": training, "seed": cfg.seed,
                        "documents": cache_key({"documents": documents})}

    def train(out: Path) -> dict:
        predictor, report = fit_predictor(TraceShards.load(traces_dir), documents, shape, cfg.predictor, cfg.seed,
                                          criterion.heads_only, device)
        return {**save_predictor(predictor, out), **report}

    with stage("predictor"):
        predictor_dir, predictor_meta = cached(cfg.cache_dir, "predictor", predictor_inputs, train)
    predictor = load_predictor(predictor_dir, predictor_meta).to(device)
    return (PredictedMasks(model, predictor, policy, padding, cfg.predictor.granularity),
            {"metrics": predictor_meta["metrics"], "per_layer": predictor_meta["per_layer"]})


def predictor_parameters(cfg: DictConfig, shape: Shape, hidden: int, heads_only: bool) -> int:
    """Parameters of the configured placement's networks (0 for those without one)."""
    p = cfg.predictor
    if p.name not in ("shadow", "dejavu"):
        return 0
    neuron_hidden = 0 if heads_only else p.neuron_hidden
    return sum(hidden * p.head_hidden + p.head_hidden * len(targets) * shape.heads
               + hidden * neuron_hidden + neuron_hidden * len(targets) * shape.neurons
               for _, targets in placement_groups(p.name, shape.layers, p.layer, p.lookahead))


def traces_bytes(shape: Shape, hidden: int, examples: int) -> float:
    """float32 features and head and neuron scores of every layer, per example."""
    return examples * shape.layers * (hidden + shape.heads + shape.neurons) * 4


def artifact_bytes(cfg: DictConfig, shape: Shape, hidden: int, examples: int, heads_only: bool) -> float:
    """Disk the traces and the predictor take: the traces, the networks' float32 weights."""
    traces = traces_bytes(shape, hidden, examples)
    if cfg.predictor.name == "static":
        return traces
    params = predictor_parameters(cfg, shape, hidden, heads_only)
    return traces + params * 4 if params else 0.0


def training_bytes(cfg: DictConfig, shape: Shape, hidden: int, examples: int, heads_only: bool) -> float:
    """Memory predictor training takes where it runs: float32 weights, gradients and AdamW's two moments, and one
    block of traces."""
    params = predictor_parameters(cfg, shape, hidden, heads_only)
    return params * 16 + min(traces_bytes(shape, hidden, examples), cfg.predictor.block_gb * 1e9) if params else 0.0


def save_record(directory: Path, record: dict) -> dict:
    (directory / "record.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    return {}


def job_inputs(cfg: DictConfig, model_id: dict) -> dict:
    """What determines a job's results: the weights and every setting but where things go and how they are
    logged."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    for key in ("cache_dir", "logger", "force"):
        settings.pop(key, None)
    return {"model": model_id, "job": settings}


def run(cfg: DictConfig, output_dir: Path, sweep_dir: Path | None = None, job_name: str = "") -> dict[str, float]:
    """Run the job described by ``cfg``; write metrics.json to output_dir and a line to sweep_dir/results.jsonl.

    A job whose results are already in the cache (same settings, same weights) is not rerun: its record is
    copied to output_dir and sweep_dir; ``force=true`` reruns it."""
    validate(cfg)
    path, config = check_opt(cfg.model)
    model_id = fingerprint(path, config, cfg.model)
    sweep_dir = sweep_dir or output_dir
    results_inputs = job_inputs(cfg, model_id)
    done = None if cfg.force else find(cfg.cache_dir, "results", results_inputs)
    if done is not None:
        record = {**json.loads((done / "record.json").read_text()), "output_dir": str(output_dir)}
        write_results(output_dir, sweep_dir, record)
        log.info("results exist for this config (%s): skipped; force=true reruns it", done)
        return record["metrics"]
    shape = Shape.of(config)
    criterion = get_criterion(cfg.criterion.name, cfg.criterion.variant)
    policy = make_policy(cfg, criterion.heads_only)
    policy.check(shape.layers, shape.heads, shape.neurons)
    if not 0 <= cfg.predictor.layer < shape.layers:
        raise ConfigError(f"predictor.layer={cfg.predictor.layer} is not a layer of this {shape.layers}-layer "
                         f"model; set predictor.layer between 0 and {shape.layers - 1}")
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    examples = load_calibration(cfg.calibration, tokenizer, config.max_position_embeddings)
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
        masks, report = mask_source(cfg, model, model_id, examples, criterion, shape, policy, pad_id(tokenizer))
        extra = {}
        with stage("evaluate"):
            if cfg.eval.name == "perplexity":
                metrics, per_layer = evaluate_perplexity(model, tokenizer, masks, cfg.eval, eval_input)
            else:
                metrics, per_layer, out = evaluate_tasks(model, tokenizer, masks, cfg.eval, eval_input, cfg.seed)
                extra = {"lm_eval": out["results"]}
                log.info("lm-eval results\n%s", make_table(out))
                tracker.lm_eval(out)
        metrics.update(report["metrics"])
        record = {**{k: v for k, v in flat_config(cfg).items() if k != "config"}, "metrics": metrics,
                  "sparsity_per_layer": per_layer, "predictor_per_layer": report["per_layer"], **extra,
                  "output_dir": str(output_dir)}
        write_results(output_dir, sweep_dir, record)
        cached(cfg.cache_dir, "results", results_inputs, lambda out: save_record(out, record),
               rebuild=True)  # it ran: any record there was missing, corrupt or forced
        tracker.summary(metrics, {"sparsity_per_layer": per_layer, "predictor_per_layer": report["per_layer"]})
    log.info("%s", " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics
