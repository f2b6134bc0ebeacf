"""Composing and checking a job's config: conf/'s values over the schema of ``shadow.config``, the resolvers conf/
uses, and the checks of values and cross-field rules against the registries (criteria, placements, families),
which raise one-line ``ConfigError``s before any expensive work starts.

conf/ lies beside the package in a checkout and inside it in an installed wheel.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from shadow.arch import architecture_config, architectures, family_of
from shadow.config import (
    ALLOCATIONS,
    ATTENTION_UNITS,
    CALIBRATION_SOURCES,
    COMPAT,
    CONTEXTS,
    EVAL_DATASETS,
    EVAL_SCHEMAS,
    EVALS,
    GRANULARITIES,
    LAYER_SCALES,
    MASK_SOURCES,
    MODEL_DTYPES,
    POLICIES,
    PREDICTOR_ARCHS,
    PREDICTOR_DTYPES,
    PROTOCOLS,
    TARGET_NORMS,
    Config,
    ModelConfig,
    resolved_sparsities,
)
from shadow.criteria import CRITERIA, get_criterion
from shadow.data import known_tasks
from shadow.errors import ConfigError
from shadow.models import TORCH_DTYPES, check_model, is_local, model_dtype
from shadow.placements import PLACEMENTS
from shadow.policy import Policy
from shadow.thresholds import GREEDY_LIMIT, INPUT_SITES

PACKAGE = Path(__file__).resolve().parent
CONF_DIR = PACKAGE / "conf" if (PACKAGE / "conf").is_dir() else PACKAGE.parent / "conf"  # wheel, or checkout
CPU_SIZED_BYTES = 100e6  # weights a job runs on the CPU without asking for a GPU


def gpus_for(model: str, dtype: str) -> int:
    """GPUs a job needs for a model named as a known architecture (``opt-1.3b``, ``llama-3.1-8b``): its weights,
    counted by its family from the architecture's config, + 20% over GPUs of SHADOW_GPU_GB (default 80) GB, rounded
    up to a power of two; 0 for weights under 100 MB and for any other model (opt-mini and llama-mini run on the
    CPU)."""
    if model not in architectures():
        return 0
    config = architecture_config(model)
    dtype = model_dtype(ModelConfig(dtype=dtype, device_map="auto"), config, "cuda")
    weights = family_of(config).weight_bytes(config, TORCH_DTYPES[dtype])
    if weights < CPU_SIZED_BYTES:
        return 0
    need = weights * 1.2 / (float(os.environ.get("SHADOW_GPU_GB", 80)) * 1e9)
    return 1 << max(0, math.ceil(math.log2(need))) if need > 1 else 1


def installed_file(relative: str) -> str:
    """``<package>/<path>``: that file of an installed package, found without importing the package (its imports
    may not be installed); where the package is missing, where pip would put it, so that the error names it."""
    package, _, rest = relative.partition("/")
    spec = importlib.util.find_spec(package)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    root = Path(roots[0]) if roots else Path(sysconfig.get_paths()["purelib"]) / package
    return str(root / rest)


def local(path: str) -> str:
    """A path as compared: a local one absolute, a hub id as written."""
    return str(Path(path).expanduser().resolve()) if is_local(path) else path


@functools.cache
def preset_paths() -> dict[str, str]:
    """conf/model's presets by the checkpoint each names."""
    presets = {}
    for name in conf_options("model"):
        presets[local(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml").path)] = name
    return presets


def model_name(path: str) -> str:
    """``model.name`` unless set: the preset's name where ``path`` is a preset's checkpoint, else the checkpoint's
    own (its directory's or GGUF file's name, a hub id's last part), lower case."""
    return preset_paths().get(local(path)) or Path(path.rstrip("/")).name.removesuffix(".gguf").lower()


def register_configs() -> None:
    """The schema for conf/config.yaml; ${shadow_asset:<path>}: a path inside the installed package;
    ${shadow_installed:<package>/<path>}: a file inside another installed package (not imported);
    ${shadow_model_name:<path>}: the model's name (``model_name``); ${shadow_gpus:<model>,<dtype>}: GPUs per job
    for the SLURM launcher preset."""
    store = ConfigStore.instance()
    store.store(name="shadow_schema", node=Config)
    for kind, schema in EVAL_SCHEMAS.items():  # conf/eval/<kind>.yaml extends /<kind>_eval_schema
        store.store(name=f"{kind}_eval_schema", node=schema)
    OmegaConf.register_new_resolver("shadow_asset", lambda rel: str(PACKAGE / rel), replace=True)
    OmegaConf.register_new_resolver("shadow_installed", installed_file, replace=True)
    OmegaConf.register_new_resolver("shadow_model_name", model_name, replace=True)
    OmegaConf.register_new_resolver("shadow_gpus", gpus_for, replace=True)


def conf_options(group: str) -> list[str]:
    """The options of a conf/ group: the names of its YAML files."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_config(*overrides: str) -> DictConfig:
    """The job config exactly as ``python -m shadow <overrides>`` composes it: conf/'s values over the schema.
    For code that needs settings outside a job (benchmarks, tests); inside one, Hydra has composed it."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _choice(key: str, value: Any, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}; pick one, e.g. {key}={allowed[0]}")


def _fraction(key: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{key}={value!r} is outside [0, 1); set {key} to a fraction such as 0.5")


def _placement(model: DictConfig | ModelConfig) -> None:
    """max_memory and offload_folder: accelerate's placement settings, read only with a device_map."""
    caps = model.max_memory
    for key in ("max_memory", "offload_folder"):
        if model[key] is not None and model.device_map is None:
            raise ConfigError(f"model.{key} is read only with model.device_map=auto; add model.device_map=auto, or "
                              f"drop model.{key}")
    if caps is not None and (not isinstance(caps, (dict, DictConfig)) or not all(
            isinstance(k, int) or k in ("cpu", "mps", "disk") for k in caps)):
        raise ConfigError(f"model.max_memory={caps!r} is not a map from devices to sizes; write it as accelerate "
                          "takes it, e.g. model.max_memory={0: 70GiB, 1: 70GiB, cpu: 200GiB}")


def check_devices(cfg: DictConfig | Config) -> None:
    """The devices the job names exist where it runs, and its dtype suits them: checked on the machine that runs
    the job (a SLURM job on its node, not where it was submitted)."""
    for key, device in (("device", cfg.device), ("predictor.device", cfg.predictor.get("device"))):
        if str(device).startswith("cuda") and int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
            raise ConfigError(f"{key}={device} but {torch.cuda.device_count()} CUDA devices are visible; use "
                              f"{key}={'cuda:0' if torch.cuda.is_available() else 'cpu'}")
    on_cpu = cfg.device == "cpu" if cfg.model.device_map is None else not torch.cuda.is_available()
    if on_cpu and cfg.model.dtype == "float16":
        raise ConfigError("model.dtype='float16' is slow and inexact on the CPU; use model.dtype=float32 or "
                          "bfloat16, or device=cuda")


def eval_context(cfg: DictConfig | Config) -> str:
    """How the job's evaluation runs a request's context: ``eval.context``, or with ``auto`` its placement's
    (``Placement.context``)."""
    return PLACEMENTS[cfg.predictor.name].context if cfg.eval.context == "auto" else cfg.eval.context


def validate(cfg: DictConfig | Config) -> None:
    """Check values and cross-field rules, whatever machine runs the job; raise ConfigError before any expensive
    work starts."""
    if cfg.criterion is None or OmegaConf.is_missing(cfg.criterion, "name"):
        raise ConfigError(f"criterion is not set; add +criterion=<name> with one of: {', '.join(sorted(CRITERIA))}")
    _choice("criterion", cfg.criterion.name, sorted(CRITERIA))
    _choice("criterion.variant", cfg.criterion.variant, sorted(CRITERIA[cfg.criterion.name]))
    _fraction("sparsity", cfg.sparsity)
    for key in ("head_sparsity", "neuron_sparsity"):
        if cfg[key] is not None:
            _fraction(key, cfg[key])
    _choice("policy", cfg.policy, POLICIES)
    _choice("layer_scale", cfg.layer_scale, LAYER_SCALES)
    _choice("attention_unit", cfg.attention_unit, ATTENTION_UNITS)
    _choice("predictor", cfg.predictor.name, sorted(PLACEMENTS))
    _choice("predictor.target_norm", cfg.predictor.target_norm, TARGET_NORMS)
    _choice("predictor.arch", cfg.predictor.arch, PREDICTOR_ARCHS)
    _choice("predictor.granularity", cfg.predictor.granularity, GRANULARITIES)
    _choice("predictor.dtype", cfg.predictor.dtype, PREDICTOR_DTYPES)
    _choice("predictor.allocation", cfg.predictor.allocation, ALLOCATIONS)
    if cfg.predictor.allocation == "greedy" and cfg.predictor.name not in INPUT_SITES:
        raise ConfigError(f"predictor.allocation=greedy allocates TEAL's and WINA's sites, not predictor="
                          f"{cfg.predictor.name}'s; use predictor=teal or wina, or predictor.allocation=uniform")
    rank = cfg.predictor.neuron_rank
    if rank is not None and not (isinstance(rank, int) and 1 <= rank < cfg.predictor.neuron_hidden):
        raise ConfigError(f"predictor.neuron_rank={rank} must be an integer from 1 to predictor.neuron_hidden - 1 "
                          f"({cfg.predictor.neuron_hidden - 1}) to save anything; use null for the full layer")
    if cfg.predictor.dtype == "int8" and str(cfg.predictor.device or cfg.device).startswith("cuda"):
        raise ConfigError(f"predictor.dtype=int8 runs on the CPU only (torch's dynamic quantisation) but the "
                          f"predictor runs on {cfg.predictor.device or cfg.device}; use predictor.dtype=float16 or "
                          "bfloat16 there, or predictor.device=cpu")
    if cfg.predictor.granularity == "token" and not PLACEMENTS[cfg.predictor.name].trains:
        trained = " or ".join(name for name, placement in PLACEMENTS.items() if placement.trains)
        raise ConfigError(f"predictor.granularity=token needs a trained predictor, not predictor={cfg.predictor.name}; "
                          f"use predictor={trained}, or predictor.granularity=request")
    _choice("model.dtype", cfg.model.dtype, MODEL_DTYPES)
    _placement(cfg.model)
    _choice("eval", cfg.eval.name, EVALS)
    _choice("eval.mask_from", cfg.eval.mask_from, MASK_SOURCES)
    _choice("eval.context", cfg.eval.context, CONTEXTS)
    if cfg.eval.context == "dense" and PLACEMENTS[cfg.predictor.name].thresholds:
        raise ConfigError(f"eval.context=dense runs each request's context on the whole model and masks the rest, "
                          f"but predictor={cfg.predictor.name} thresholds every position and has no masks; use "
                          "eval.context=auto")
    if cfg.eval.name == "perplexity":
        _choice("eval.dataset", cfg.eval.dataset, EVAL_DATASETS)
        for protocol in cfg.eval.protocols:
            _choice("eval.protocols", protocol, PROTOCOLS)
    elif cfg.eval.num_fewshot < 0:
        raise ConfigError(f"eval.num_fewshot={cfg.eval.num_fewshot} is negative; use 0, 3 or 5")
    _choice("compat", cfg.compat, COMPAT)
    _choice("calibration.source", cfg.calibration.source, CALIBRATION_SOURCES)
    if cfg.calibration.source != "tasks":
        unset = {"tasks": None, "num_fewshot": 0, "include_path": None}
        for key, value in unset.items():
            if cfg.calibration[key] != value:
                raise ConfigError(f"calibration.{key} is read only with calibration.source=tasks; add "
                                  f"calibration.source=tasks (or calibration=paper), or drop calibration.{key}")
    elif not cfg.calibration.tasks:
        raise ConfigError("calibration.tasks is empty with calibration.source=tasks; name lm-eval tasks, e.g. "
                          "calibration.tasks=[piqa,copa], or use calibration=paper")
    if cfg.calibration.num_fewshot < 0:
        raise ConfigError(f"calibration.num_fewshot={cfg.calibration.num_fewshot} is negative; use 0, 3 or 5")
    sample_from, limit = cfg.calibration.sample_from, cfg.calibration.limit
    if sample_from is not None and (limit is None or sample_from < limit):
        raise ConfigError(f"calibration.sample_from={sample_from} draws calibration.limit={limit} examples from the "
                          f"first {sample_from}; set calibration.limit to at most {sample_from}, or "
                          "calibration.sample_from=null")
    for key in ("calibration.batch_size", "eval.batch_size"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} must be at least 1; set {key}=8")
    try:
        Path(cfg.cache_dir).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=cfg.cache_dir).close()
    except OSError:
        raise ConfigError(f"cache_dir={cfg.cache_dir!r} is not writable; set cache_dir or SHADOW_CACHE_DIR to a "
                          "writable directory") from None


def check_job(cfg: DictConfig | Config, weights: bool = True) -> tuple[str, Any]:
    """``validate``, then what the model and the tasks decide, the model read from its config alone: the
    checkpoint exists and is of a known family, ``predictor.layer`` is one of its layers, the policy can be met on
    its layers (a local policy keeps a unit of each, a hybrid floor fits), TEAL's greedy allocation reaches the
    sparsity, and lm-eval knows the tasks. The checkpoint's path and config; without ``weights``, a hub model's
    weights are not fetched (the check before launching jobs)."""
    validate(cfg)
    for key, section in (("eval", cfg.eval), ("calibration", cfg.calibration)):
        if section.get("tasks") and (key == "eval" or cfg.calibration.source == "tasks"):
            known_tasks(tuple(section.tasks), section.include_path, section.num_fewshot, key)
    path, config = check_model(cfg.model, weights)
    shape = family_of(config).shape(config, cfg.attention_unit)
    heads_only = get_criterion(cfg.criterion.name, cfg.criterion.variant).heads_only
    dense_attention = PLACEMENTS[cfg.predictor.name].dense_attention
    Policy.configured(cfg, heads_only, dense_attention).check(shape.layers, shape.heads, shape.neurons)
    if cfg.predictor.allocation == "greedy" and max(resolved_sparsities(cfg)) > GREEDY_LIMIT:
        raise ConfigError(f"predictor.allocation=greedy follows TEAL's greedy path up to a sparsity of {GREEDY_LIMIT}; "
                          "lower sparsity to at most that, or use predictor.allocation=uniform")
    if PLACEMENTS[cfg.predictor.name].trains and not 0 <= cfg.predictor.layer < shape.layers:
        raise ConfigError(f"predictor.layer={cfg.predictor.layer} is not a layer of this {shape.layers}-layer model; "
                          f"set predictor.layer between 0 and {shape.layers - 1}")
    return path, config


def check_launch(cfg: DictConfig | Config) -> None:
    """``check_job`` before jobs launch: a hub model's config fetched, not its weights."""
    check_job(cfg, weights=False)
