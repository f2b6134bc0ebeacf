"""The schema behind conf/: typed dataclasses (Hydra checks types and key names against them while composing) and
the values each key allows. Composition, resolvers and the checks of values live in ``shadow.compose``, above the
registries they consult; this module imports nothing of shadow's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig


@dataclass
class ModelConfig:
    name: str = "${shadow_model_name:${.path}}"  # a preset's name, or the checkpoint's (its directory, file, hub id)
    path: str = MISSING  # hub id (facebook/opt-1.3b), a local directory, or a local .gguf file
    gguf_file: str | None = None  # a GGUF file inside path (a hub repository or a directory) to load instead
    dtype: str = MISSING  # float32, float16, bfloat16, or auto (the checkpoint's; float16 as float32 on the CPU)
    device_map: str | None = MISSING  # None: one device (cfg.device); "auto": spread over GPUs by accelerate
    max_memory: Any = None  # device_map=auto: caps as accelerate takes them, e.g. {0: 70GiB, 1: 70GiB, cpu: 200GiB}
    offload_folder: str | None = None  # device_map=auto: where weights beyond max_memory go (disk offload)
    revision: str | None = None
    trust_remote_code: bool = False  # run Python code shipped with the checkpoint: only for sources you trust


@dataclass
class CriterionConfig:
    name: str = MISSING
    variant: str = "textbook"  # textbook, or reference (what ShadowLLM's code computed) where it differs


@dataclass
class CalibrationConfig:
    source: str = MISSING  # opt_mini (the embedded calibration split) or tasks (lm-eval tasks' training docs)
    limit: int | None = MISSING  # examples per task (or of the split); None: all
    sample_from: int | None = None  # draw the limit at random (the job's seed) from the first N; None: the first
    batch_size: int = MISSING
    max_length: int | None = MISSING  # truncate contexts from the left to this many tokens; None: model limit
    tasks: list[str] | None = None  # source=tasks: lm-eval task names
    num_fewshot: int = 0  # source=tasks: 0, 3 or 5 in ShadowLLM
    include_path: str | None = None  # source=tasks: a directory of extra lm-eval task YAML


@dataclass
class PredictorConfig:
    """Values: conf/predictor/shadow.yaml, which every option extends."""

    name: str = MISSING  # a placement (shadow.placements)
    layer: int = MISSING  # shadow: which layer's attention output feeds the predictor
    lookahead: bool = MISSING  # dejavu: layer l's predictor reads layer l − 1's attention output
    arch: str = MISSING  # mlp (Linear-ReLU-Linear, the paper's) or lowrank (DejaVu's linear map; hidden = rank)
    granularity: str = MISSING  # request (one mask from the prompt) or token (a mask at every position)
    head_hidden: int = MISSING
    neuron_hidden: int = MISSING
    head_epochs: int = MISSING
    neuron_epochs: int = MISSING
    head_batch_size: int = MISSING
    neuron_batch_size: int = MISSING
    head_val_fraction: float = MISSING
    neuron_val_fraction: float = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    target_norm: str = MISSING  # per_layer (the paper's b1eL) or global (b1e)
    device: str | None = MISSING  # where predictors train and run; None: the model's (its first layer's) device
    dtype: str = MISSING  # as it runs, trained in float32: float32, float16/bfloat16 (GPUs), int8 (CPU, dynamic)
    neuron_rank: int | None = MISSING  # the neuron network's output layer factored through this rank; None: full
    block_gb: float = MISSING  # traces held at once in training; a set that fits is shuffled whole
    allocation: str = MISSING  # teal: uniform (every site its share) or greedy (TEAL's per-layer allocation)


@dataclass
class EvalConfig:
    """What every evaluation kind has; each kind's schema adds its own keys and accepts no other kind's. Values:
    conf/eval/<kind>.yaml."""

    name: str = MISSING  # perplexity, or tasks (lm-eval)
    batch_size: int = MISSING
    limit: int | None = MISSING  # perplexity: first N windows (token) / documents (word); tasks: N per task
    mask_from: str = MISSING  # context: the text before the scored tokens; scored: the scored text too (a leak)
    context: str = MISSING  # auto (the placement's), masked, or dense: a request's context on the whole model
    dense_reference: bool = True  # the dense model evaluated alike, once per sweep (cached): dense/<metric>


@dataclass
class PerplexityEvalConfig(EvalConfig):
    dataset: str = MISSING  # opt_mini (offline) or wikitext2 (needs the hub)
    protocols: list[str] = MISSING  # token, word
    seq_len: int | None = MISSING  # window length; None: the model's context length


@dataclass
class TasksEvalConfig(EvalConfig):
    tasks: list[str] = MISSING
    num_fewshot: int = MISSING
    include_path: str | None = MISSING  # a directory of extra lm-eval task YAML files


EVAL_SCHEMAS = {"perplexity": PerplexityEvalConfig, "tasks": TasksEvalConfig}


@dataclass
class LoggerConfig:
    name: str = MISSING  # wandb or none
    project: str = MISSING
    entity: str | None = MISSING
    tags: list[str] = MISSING


@dataclass
class Config:
    """The job. Values: conf/config.yaml and its groups."""

    model: ModelConfig = field(default_factory=ModelConfig)
    criterion: CriterionConfig | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    eval: EvalConfig = MISSING  # one of EVAL_SCHEMAS, chosen by the eval group
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    sparsity: float = MISSING
    head_sparsity: float | None = MISSING  # None: sparsity
    neuron_sparsity: float | None = MISSING  # None: sparsity
    attention_unit: str = MISSING  # kv_group or query_head: what head masks keep (shadow.arch.base)
    policy: str = MISSING  # global, local (per layer) or hybrid (global with a per-layer floor)
    layer_scale: str = MISSING  # calibrated (layers ranked on one scale) or none (as normalised per layer)
    min_heads: int = MISSING  # hybrid: heads kept in every layer at least
    min_neurons: int = MISSING  # hybrid: neurons kept in every layer at least
    dense_first_layer: bool = MISSING  # keep layer 0 whole, as ShadowLLM's code did
    compat: str = MISSING  # none, or reference: set by the compat group (what ShadowLLM's code measured)
    seed: int = MISSING
    device: str = MISSING
    cache_dir: str = MISSING
    force: bool = MISSING  # rerun a job whose results are already in the cache


def resolved_sparsities(cfg: DictConfig | Config) -> tuple[float, float]:
    """(head, neuron) sparsity: each defaults to ``sparsity``."""
    head = cfg.head_sparsity if cfg.head_sparsity is not None else cfg.sparsity
    neuron = cfg.neuron_sparsity if cfg.neuron_sparsity is not None else cfg.sparsity
    return head, neuron


DTYPES = ("float32", "float16", "bfloat16")
MODEL_DTYPES = (*DTYPES, "auto")
POLICIES = ("global", "local", "hybrid")
ATTENTION_UNITS = ("kv_group", "query_head")
PREDICTOR_ARCHS = ("mlp", "lowrank")
PREDICTOR_DTYPES = ("float32", "float16", "bfloat16", "int8")
GRANULARITIES = ("request", "token")
ALLOCATIONS = ("uniform", "greedy")
EVALS = ("perplexity", "tasks")
EVAL_DATASETS = ("opt_mini", "wikitext2")
CALIBRATION_SOURCES = ("opt_mini", "tasks")
PROTOCOLS = ("token", "word")
MASK_SOURCES = ("context", "scored")
CONTEXTS = ("auto", "masked", "dense")
COMPAT = ("none", "reference")
TARGET_NORMS = ("per_layer", "global")
LAYER_SCALES = ("calibrated", "none")
