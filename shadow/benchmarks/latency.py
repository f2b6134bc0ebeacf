"""Generation latency of real sparse execution: dense, static, ShadowLLM, DejaVu-style, TEAL and CATS, side by side.

    python -m shadow.benchmarks.latency                                   # OPT-1.3B architecture, CPU, fp32
    python -m shadow.benchmarks.latency arch=opt-6.7b device=cuda dtype=float16 sparsity=[0.3,0.5,0.7]
    python -m shadow.benchmarks.latency --config-dir sweeps --config-name paper_latency   # a sweep

Settings: conf/latency.yaml (Hydra, so ``-m`` sweeps and launchers work as for ``python -m shadow``).

Random weights and untrained predictors (timing does not depend on them, as in the paper), run in
``predictor.dtype``: by default int8 on the CPU (dynamic quantisation, whose cost in quality is negligible) and
the model's dtype on GPUs. A batch of ``batch`` requests (1 by default; ``batch=[1,4,8]`` adds rows per size),
each a ``prompt``-token prompt, then ``new_tokens`` greedy tokens (``timing=quick``: fewer tokens and rounds).
Rows, at each sparsity of heads and neurons (local policy: every layer keeps the same share):
  dense             Hugging Face ``generate``, no sparsity;
  dense   engine    the decoders' own step with every unit kept (``RequestDecoder``, each layer's dense products:
                    cuBLAS on CUDA), captured as a CUDA graph there: the same engine's dense step, the fair anchor;
  static  request   one fixed mask, no predictor: the prompt runs on the kept units' weights, gathered (``shadow.
                    sparse.pruned``), then every step reads the kept rows in place (``shadow.sparse.RequestDecoder``);
  shadow  request   the same under the mask of one predictor that reads layer 0's attention output at the last
                    prompt token;
  dejavu  request   the same with one predictor per layer, on every layer's attention output of a dense pass over
                    the prompt;
  griffin request   GRIFFIN's FFN units chosen in the prompt's own pass, which runs on the whole model (its statistic
                    at every layer and the top-k are the predictor column's time), attention dense; then every step
                    on the kept units; at any batch size, on the batch's union;
  shadow  token     dense prompt, then at every step the predictor runs after layer 0 and each layer reads only
                    the kept rows in place (``shadow.sparse.TokenDecoder``);
  dejavu  token     the same with one predictor per layer, each reading the previous layer's attention output
                    (``dense_key_values=true``: every head's key and value by the dense projections, not the kept
                    heads' with catch-up, in both per-token rows);
  teal    token     the prompt and every step under TEAL's thresholds, each projection reading only the columns of
                    the input channels kept (``shadow.sparse.ThresholdDecoder``);
  wina    token     the same under WINA's thresholds, on |x| times the norm of the weight column it multiplies;
  cats    token     the same under CATS' thresholds: the gate (OPT: up) whole, the kept units' up rows and down
                    columns, attention dense.
``methods`` picks the rows besides dense. TEAL's, WINA's and CATS' thresholds zero ``sparsity`` of each site's entries
on random prompts through the random model (``shadow.thresholds.calibrate``), before timing.
Above batch 1 the per-request rows with predictors are left out, and per token each layer keeps the union of the
batch's units, so the gain shrinks with the batch. Every row is timed once per round, right after one untimed run
of it, the rows interleaved so that the machine's drifts touch them alike; reported are the medians over
``rounds`` rounds (``torch.utils.benchmark``): end-to-end ms, ms to the first token, ms per decoding step
(end-to-end minus first token, over the remaining steps), decoding speed-up over ``generate`` and over the
same engine's dense step at the same batch size, the step's time over the time its weights take to read at the
bandwidth of a device-to-device copy measured in the same run (1 GiB on CUDA, 256 MiB on the CPU; 1.0× would be
the memory's limit), the share of the dense step's weights read per token under the masks the row applied
(``shadow.weights_read``; per token, the mean over its steps of the batch's union) and the predictor's share of
the time: of the request's time per request, of each decoding step per token.
Written to the job's directory as latency.csv, latency.md and latency.json, and logged
to W&B as a table (offline without a key; logger=none turns it off).
"""

from __future__ import annotations

import csv
import io
import json
import platform
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils import benchmark
from tqdm import tqdm

from shadow.arch import Shape, architecture_config, architectures, family_of
from shadow.cli import check_argv, fail, fix_argv
from shadow.compose import CONF_DIR
from shadow.config import ATTENTION_UNITS, DTYPES, PREDICTOR_DTYPES
from shadow.data import Example
from shadow.errors import ConfigError
from shadow.models import TORCH_DTYPES
from shadow.placements import PLACEMENTS
from shadow.policy import Masks, Policy
from shadow.predictors import GriffinMasks, Predictor, flock
from shadow.sparse import Generation, RequestDecoder, ThresholdDecoder, TokenDecoder
from shadow.thresholds import Histograms, calibrate, sites
from shadow.traces import layer_features
from shadow.weights_read import masks_read, step_parameters

THRESHOLDS = ("teal", "wina", "cats")
METHODS = ("static", *(name for name, placement in PLACEMENTS.items() if placement.trains), "griffin", *THRESHOLDS)
COLUMNS = ["method", "granularity", "sparsity", "batch", "total_ms", "first_token_ms", "step_ms", "decode_speedup",
           "engine_speedup", "bytes_multiple", "weights_read", "predictor_share"]
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 28}  # larger than any cache: the copy runs at the memory's speed


def predictors(shape: Shape, predictor_cfg: DictConfig) -> dict[str, Predictor]:
    """Untrained networks of every trained placement: ShadowLLM's reads layer 0, DejaVu-style ones the previous
    layer (lookahead, as DejaVu does); sizes from ``predictor_cfg``."""
    return {name: Predictor.configured(shape, shape.attention_width, placement.groups(shape.layers, 0, True),
                                       predictor_cfg, False)
            for name, placement in PLACEMENTS.items() if placement.trains}


def footprint(cfg: DictConfig) -> dict[str, float]:
    """Bytes the bench holds: the weights, the kept units' weights that per-request rows gather (at the lowest
    sparsity), and every placement's predictors; counted on models built on ``meta``."""
    from transformers import AutoModelForCausalLM

    config = architecture_config(cfg.arch)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        networks = predictors(family_of(config).shape(config, cfg.attention_unit), cfg.predictor).values()
    size = TORCH_DTYPES[cfg.dtype].itemsize
    layers = sum(p.numel() for name, p in model.named_parameters() if ".layers." in name and p.dim() == 2)
    return {"weights": sum(p.numel() for p in model.parameters()) * size,
            "gathered": (1 - min(cfg.sparsity, default=0.0)) * layers * size,
            "predictors": sum(p.numel() for predictor in networks for p in predictor.parameters()) * size}


def free_memory(device: str, device_map: str | None) -> dict[int | str, float]:
    """Free bytes per place the bench may use: the device, or every visible GPU with ``device_map=auto``."""
    import psutil

    if not device.startswith("cuda"):
        return {"cpu": psutil.virtual_memory().available}
    if device_map == "auto":
        return {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
    index = torch.device(device).index or 0
    return {index: torch.cuda.mem_get_info(index)[0]}


def placement(cfg: DictConfig, free: dict[int | str, float]) -> dict[int | str, int] | None:
    """Fail in one line when the bench cannot fit; with ``device_map=auto``, accelerate's memory caps per device:
    each keeps room, in proportion, for its layers' gathered copies; the first also for the predictors."""
    need = footprint(cfg)
    total = sum(need.values()) * 1.1  # activations, KV cache, allocator slack
    if total > sum(free.values()):
        parts = ", ".join(f"{k} {v / 1e9:.1f} GB" for k, v in need.items())
        where = f"the {len(free)} visible GPUs have" if cfg.device_map == "auto" else f"{cfg.device} has"
        fix = "" if cfg.device_map == "auto" or not str(cfg.device).startswith("cuda") else \
            "device_map=auto to spread the layers over more GPUs, or "
        raise ConfigError(f"arch={cfg.arch} in dtype={cfg.dtype} needs ≈{total / 1e9:.1f} GB ({parts}) but {where} "
                          f"{sum(free.values()) / 1e9:.1f} GB free; use {fix}a smaller arch or sparsity")
    if cfg.device_map != "auto":
        return None
    share = need["weights"] / (need["weights"] + need["gathered"])
    caps = {k: int(v / 1.1 * share) for k, v in free.items()}
    first = next(iter(caps))
    caps[first] = max(0, caps[first] - int(need["predictors"] * 1.1))
    return caps


def build(arch: str, device: str, dtype: torch.dtype, max_memory: dict[int | str, int] | None = None):
    """A random-weight model of the architecture, created in ``dtype`` where it will run: no float32 copy is
    ever made (OPT-30B in fp16 needs 60 GB, in fp32 120 GB). With ``max_memory``, accelerate places whole layers
    under those caps (layers over several GPUs) and each weight is created on its device."""
    from transformers import AutoModelForCausalLM

    config = architecture_config(arch)
    if max_memory is None:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import set_module_tensor_to_device

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    device_map = infer_auto_device_map(model, max_memory=max_memory, dtype=dtype,
                                       no_split_module_classes=model._no_split_modules)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        owner = max((p for p in device_map if p == "" or name == p or name.startswith(p + ".")), key=len)
        value = torch.empty(tensor.shape, dtype=tensor.dtype, device=device_map[owner])
        if tensor.dim() > 1:
            value.normal_(0, 0.02)
        else:  # LayerNorm scales 1, biases 0
            value.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
        set_module_tensor_to_device(model, name, device_map[owner], value=value)
    model.tie_weights()
    return dispatch_model(model, device_map).eval()


def copy_bandwidth(device: torch.device, min_run_time: float) -> float:
    """Bytes per second a device-to-device copy moves (each byte read and written): what the memory delivers, the
    bound a step that streams its weights can approach."""
    size = COPY_BYTES.get(device.type, COPY_BYTES["cpu"])
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = median_ms(lambda: target.copy_(source), min_run_time) / 1e3
    return 2 * size / seconds


def median_ms(fn, min_run_time: float) -> float:
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


@dataclass
class Case:
    """One row: ``run(n)`` generates n tokens inside ``context()`` and returns what it applied, from which
    ``read`` gives the share of weights read per token (by default ``masks_read``: masks, or None for dense);
    ``predict`` is the predictor's work per request (request) or per decoding step (token)."""

    method: str
    granularity: str
    sparsity: float
    batch: int
    run: Callable[[int], Any]
    context: Callable[[], AbstractContextManager] = nullcontext
    predict: Callable[[], None] | None = None
    read: Callable[[Any], float] | None = None


class Bench:
    """One random-weight model, its prompt and untrained predictors of both placements; ``measure`` times the
    cases round by round."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        torch.manual_seed(0)
        self.model = build(cfg.arch, str(cfg.device), TORCH_DTYPES[cfg.dtype],
                           placement(cfg, free_memory(str(cfg.device), cfg.device_map)))
        self.shape = family_of(self.model.config).shape(self.model.config, cfg.attention_unit)
        self.vocab = min(50000, self.model.config.vocab_size)
        self.ids = torch.randint(4, self.vocab, (max(cfg.batch), cfg.prompt), device=cfg.device)  # one per request
        self.predictors = {name: predictor for name, predictor in predictors(self.shape, cfg.predictor).items()
                           if name in cfg.methods}
        for predictor in self.predictors.values():
            predictor.to(cfg.device).eval().run_as(predictor_dtype(cfg))
        self.histograms = {method: self.calibrate(method) for method in THRESHOLDS if method in cfg.methods}
        self.request = RequestDecoder(self.model, self.shape)  # every per-request row's

    def calibrate(self, method: str) -> Histograms:
        """The method's histograms on 8 random prompts (their own tokens, not the timed ones)."""
        ids = torch.randint(4, self.vocab, (8, self.cfg.prompt), generator=torch.Generator().manual_seed(1))
        return calibrate(self.model, [Example(tuple(row), 1) for row in ids.tolist()], method, 4, 1)

    def generate(self, new_tokens: int, batch: int = 1) -> None:
        self.model.generate(self.ids[:batch], max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            do_sample=False, pad_token_id=1)

    def predict_request(self, name: str, policy: Policy):
        predictor = self.predictors[name]
        ids, last = self.ids[:1], torch.tensor([self.cfg.prompt - 1])
        features = layer_features(self.model, ids, torch.ones_like(ids), last, predictor.feature_layers)
        return policy.select(*(x.cpu() for x in predictor(features.to(self.cfg.device))))

    def predict_step(self, name: str, policy: Policy, batch: int) -> None:
        """What one decoding step spends on predictors: every group on one position's features per request."""
        predictor = self.predictors[name]
        feature = torch.randn(batch, self.shape.attention_width, device=self.cfg.device)
        for group in range(len(predictor.groups)):
            policy.select(*predictor.group_scores(group, feature))

    def flocking(self, griffin: GriffinMasks, batch: int) -> Callable[[], None]:
        """What GRIFFIN adds to its prompt pass: its statistic over every layer's prompt activations, and the top-k
        (on stand-ins of the activations' shapes)."""
        real = torch.ones(batch, self.cfg.prompt, dtype=torch.bool, device=self.cfg.device)
        dtype = next(self.model.parameters()).dtype
        heads, neurons = (torch.randn(batch, self.cfg.prompt, width, device=self.cfg.device, dtype=dtype)
                          for width in (self.shape.attention_width, self.shape.neurons))
        layers = range(self.shape.layers)
        return lambda: griffin.policy.select(
            torch.stack([flock(heads, real, self.shape.heads) for _ in layers], 1),
            torch.stack([flock(neurons, real, self.shape.neurons) for _ in layers], 1))

    def cases(self) -> list[Case]:
        """At each batch size, dense, then at each sparsity the rows of ``methods``: static, every trained
        placement per request (at batch 1), GRIFFIN per request, every trained placement per token, TEAL, WINA and
        CATS per token."""
        cases = []
        for batch in map(int, self.cfg.batch):
            generate = partial(self.generate, batch=batch)
            cases.append(Case("dense", "-", 0.0, batch, generate))
            every = Masks(torch.ones(1, self.shape.layers, self.shape.heads, dtype=torch.bool),
                          torch.ones(1, self.shape.layers, self.shape.neurons, dtype=torch.bool))
            cases.append(Case("dense", "engine", 0.0, batch, partial(self.request.generate, self.ids[:batch],
                                                                     masks=every), self.request.column_layout,
                              read=self.request.share_read))
            for sparsity in map(float, self.cfg.sparsity):
                policy = Policy("local", sparsity, sparsity)
                static = policy.select(torch.rand(1, self.shape.layers, self.shape.heads),
                                       torch.rand(1, self.shape.layers, self.shape.neurons))
                ids = self.ids[:batch]
                if "static" in self.cfg.methods:
                    cases.append(Case("static", "request", sparsity, batch,
                                      partial(self.request.generate, ids, masks=static), self.request.column_layout,
                                      read=self.request.share_read))
                for name in self.predictors if batch == 1 else ():
                    def request(n: int, name=name, policy=policy) -> Generation:
                        return self.request.generate(self.ids[:1], n, self.predict_request(name, policy))
                    cases.append(Case(name, "request", sparsity, batch, request, self.request.column_layout,
                                      lambda name=name, policy=policy: self.predict_request(name, policy),
                                      self.request.share_read))
                if "griffin" in self.cfg.methods:
                    griffin = GriffinMasks(self.model, self.shape, Policy("local", 0.0, sparsity), 1)
                    cases.append(Case("griffin", "request", sparsity, batch,
                                      partial(self.request.generate, ids, masks=griffin), self.request.column_layout,
                                      self.flocking(griffin, batch), self.request.share_read))
                for name in self.predictors:
                    decoder = TokenDecoder(self.model, self.predictors[name], policy,
                                           dense_key_values=self.cfg.dense_key_values)
                    predict = partial(self.predict_step, name, policy, batch)
                    cases.append(Case(name, "token", sparsity, batch, partial(decoder.generate, ids),
                                      decoder.column_layout, predict, decoder.share_read))
                for method, histograms in self.histograms.items():
                    limits = histograms.thresholds([sparsity] * len(sites(self.model, method)))
                    decoder = ThresholdDecoder(self.model, method, limits)
                    cases.append(Case(method, "token", sparsity, batch, partial(decoder.generate, ids),
                                      decoder.column_layout, read=decoder.share_read))
        return cases

    def measure(self, cases: list[Case]) -> list[dict]:
        """Time every case's full generation and its first token once per round, the cases interleaved so that
        drifts in the machine's speed touch them alike; then the medians over the rounds. ``blocked_autorange``
        with no minimum time runs the statement twice, the first run untimed (a warm-up; ``timeit`` would run it
        three times)."""
        cfg, new = self.cfg, self.cfg.new_tokens
        totals, firsts = [[] for _ in cases], [[] for _ in cases]
        applied: list[list] = [[None] for _ in cases]  # the masks of each case's last full generation
        with torch.no_grad():
            for _ in tqdm(range(cfg.rounds), desc="rounds", disable=None):
                for case, total, first, masks in zip(cases, totals, firsts, applied, strict=True):
                    with case.context():
                        for n, times, out in ((new, total, masks), (1, first, [None])):
                            timer = benchmark.Timer(stmt="out[0] = run(n)",
                                                    globals={"run": case.run, "n": n, "out": out},
                                                    num_threads=torch.get_num_threads())
                            times.append(timer.blocked_autorange(min_run_time=0))
            costs = [median_ms(case.predict, cfg.min_run_time) if case.predict else None for case in cases]
        device = next(self.model.parameters()).device
        bandwidth = copy_bandwidth(device, cfg.min_run_time)
        step_bytes = step_parameters(self.model) * next(self.model.parameters()).element_size()
        timed = []
        for total, first in zip(totals, firsts, strict=True):
            total_ms, first_ms = (benchmark.Measurement.merge(m)[0].median * 1e3 for m in (total, first))
            timed.append((total_ms, first_ms, (total_ms - first_ms) / max(new - 1, 1)))
        anchors = {(case.batch, case.granularity): step for case, (_, _, step) in zip(cases, timed, strict=True)
                   if case.method == "dense"}  # each batch size's: generate's ("-") and the engine's
        rows = []
        for case, (total_ms, first_ms, step), cost, masks in zip(cases, timed, costs, applied, strict=True):
            share = None if cost is None else cost / (step if case.granularity == "token" else total_ms)
            read = (case.read or partial(masks_read, self.model))(masks[0])
            engine = anchors.get((case.batch, "engine"))
            rows.append({"method": case.method, "granularity": case.granularity, "sparsity": case.sparsity,
                         "batch": case.batch, "total_ms": total_ms, "first_token_ms": first_ms, "step_ms": step,
                         "decode_speedup": anchors[case.batch, "-"] / step,
                         "engine_speedup": None if engine is None else engine / step,
                         "bytes_multiple": step / (read * step_bytes / bandwidth * 1e3),
                         "weights_read": read, "predictor_share": share})
        print(f"copy bandwidth on {device}: {bandwidth / 1e9:.1f} GB/s (read and written); a dense step reads "
              f"{step_bytes / 1e9:.2f} GB of weights", flush=True)
        return rows


def format_row(r: dict) -> str:
    share = f"{r['predictor_share']:.1%}" if r["predictor_share"] is not None else "-"
    engine = f"{r['engine_speedup']:.2f}×" if r["engine_speedup"] is not None else "-"
    return (f"| {r['method']} | {r['granularity']} | {r['sparsity']:.0%} | {r['batch']} | {r['total_ms']:.0f} | "
            f"{r['first_token_ms']:.0f} | {r['step_ms']:.1f} | {r['decode_speedup']:.2f}× | {engine} | "
            f"{r['bytes_multiple']:.1f}× | {r['weights_read']:.1%} | {share} |")


def write(out: Path, header: str, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = io.StringIO()
    writer = csv.DictWriter(table, COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    markdown = "\n".join([header, "", TABLE_HEAD, *map(format_row, rows)]) + "\n"
    for name, text in (("latency.csv", table.getvalue()), ("latency.md", markdown),
                       ("latency.json", json.dumps({"setting": header, "rows": rows}, indent=1) + "\n")):
        tmp = out / f"{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


TABLE_HEAD = ("| method | masks | sparsity | batch | total ms | first token ms | ms / step | decode × generate "
              "| decode × engine dense | step ÷ bytes time | weights read | predictor |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|")


def predictor_dtype(cfg: DictConfig) -> str:
    """The predictors' dtype: as set, else int8 on the CPU and the model's dtype elsewhere."""
    return cfg.predictor.dtype or ("int8" if str(cfg.device) == "cpu" else cfg.dtype)


def check(cfg: DictConfig) -> None:
    """One-line errors for bad settings, before the model is built."""
    if cfg.arch not in architectures():
        raise ConfigError(f"arch={cfg.arch} is not a known architecture; use one of {', '.join(architectures())}")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype={cfg.dtype} is unknown; use one of {', '.join(DTYPES)}")
    if cfg.attention_unit not in ATTENTION_UNITS:
        raise ConfigError(f"attention_unit={cfg.attention_unit} is unknown; use one of {', '.join(ATTENTION_UNITS)}")
    for s in cfg.sparsity:
        if not isinstance(s, (int, float)) or not 0 <= s < 1:
            raise ConfigError(f"sparsity={list(cfg.sparsity)} holds {s!r}; each sparsity must be a number in [0, 1)")
    if not cfg.batch or any(not isinstance(b, int) or b < 1 for b in cfg.batch):
        raise ConfigError(f"batch={list(cfg.batch)} must list batch sizes, whole numbers of at least 1, e.g. [1,4,8]")
    if not isinstance(cfg.rounds, int) or cfg.rounds < 1:
        raise ConfigError(f"rounds={cfg.rounds} must be a whole number of rounds, at least 1")
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device} but no CUDA device is visible; use device=cpu")
    if cfg.predictor.dtype not in (None, *PREDICTOR_DTYPES):
        raise ConfigError(f"predictor.dtype={cfg.predictor.dtype} is unknown; use one of "
                          f"{', '.join(PREDICTOR_DTYPES)} or null (int8 on the CPU, the model's dtype on GPUs)")
    if cfg.predictor.dtype == "int8" and str(cfg.device).startswith("cuda"):
        raise ConfigError("predictor.dtype=int8 runs on the CPU only (torch's dynamic quantisation); use "
                          "predictor.dtype=float16 or bfloat16 with device=cuda")
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown or not isinstance(cfg.methods, ListConfig):
        raise ConfigError(f"methods={cfg.methods} holds {unknown or cfg.methods}; list rows among "
                          f"{', '.join(METHODS)}, e.g. methods=[shadow,teal]")
    if not isinstance(cfg.dense_key_values, bool):
        raise ConfigError(f"dense_key_values={cfg.dense_key_values} must be true or false")
    if cfg.device_map not in (None, "auto"):
        raise ConfigError(f"device_map={cfg.device_map} is not a placement here; use device_map=auto (layers over "
                          "the visible GPUs) or leave it unset (one device)")


def run(cfg: DictConfig, out: Path) -> list[dict]:
    check(cfg)
    bench = Bench(cfg)
    device = str(cfg.device)
    machine = (torch.cuda.get_device_name(device) if device.startswith("cuda")
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    header = (f"{cfg.arch} architecture (random weights), {cfg.dtype} on {device} ({machine}), torch "
              f"{torch.__version__}, batch {', '.join(map(str, cfg.batch))}, prompt {cfg.prompt} + {cfg.new_tokens} "
              f"generated, predictors in {predictor_dtype(cfg)}")
    print(header, flush=True)
    rows = bench.measure(bench.cases())
    print("\n" + TABLE_HEAD + "\n" + "\n".join(map(format_row, rows)), flush=True)
    write(out, header, rows)
    if cfg.logger.name == "wandb":
        import wandb

        from shadow.tracking import wandb_mode

        settings = OmegaConf.to_container(cfg, resolve=True)
        with wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, job_type="latency",
                        mode=wandb_mode(), dir=str(out), config={**settings, "setting": header}) as wandb_run:
            wandb_run.log({"latency": wandb.Table(columns=COLUMNS, data=[[r[c] for c in COLUMNS] for r in rows])})
    print(f"\nwritten to {out}/latency.{{csv,md,json}}")
    return rows


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="latency")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as err:
        fail(err)


if __name__ == "__main__":
    sys.argv[1:] = fix_argv(sys.argv[1:])
    if not {"--help", "-h", "--hydra-help"} & set(sys.argv):
        try:
            check_argv(sys.argv[1:], "latency", check)  # every job of a sweep, before any is built
        except ConfigError as err:
            fail(err)
    main()
