"""Loading OPT models and tokenizers from a hub id or a local directory, once per process."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shadow.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LOADED: dict[tuple, tuple[nn.Module, object]] = {}


@dataclass(frozen=True)
class Shape:
    """Layers, heads per layer, head size and FFN neurons per layer of an OPT decoder."""

    layers: int
    heads: int
    head_dim: int
    neurons: int

    @classmethod
    def of(cls, config) -> Shape:
        heads = config.num_attention_heads
        return cls(config.num_hidden_layers, heads, config.hidden_size // heads, config.ffn_dim)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}


def resolve_path(cfg: ModelConfig) -> str:
    """The local directory of the weights: cfg.path itself, or the hub id's snapshot in the local cache."""
    path = Path(cfg.path).expanduser()
    looks_local = cfg.path.startswith((".", "/", "~")) or path.exists()
    if looks_local:
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path={cfg.path!r} has no config.json; point model.path at a Hugging Face "
                              "model directory or use a hub id such as facebook/opt-1.3b")
        return str(path.resolve())
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(cfg.path, revision=cfg.revision, local_files_only=hub_offline(),
                                 allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "merges.txt"])
    except Exception as err:  # the hub client raises many types for "not there"
        where = "the hub is offline (HF_HUB_OFFLINE=1) and it is not in the local cache" if hub_offline() \
            else f"it could not be fetched ({type(err).__name__})"
        raise ConfigError(f"model.path={cfg.path!r}: {where}; download it where the hub is reachable "
                          "(huggingface-cli download) or set model.path to a local directory") from None


def check_opt(cfg: ModelConfig):
    """The local path and the model's config, read without its weights: fail fast on a missing or non-OPT model."""
    from transformers import AutoConfig

    path = resolve_path(cfg)
    if cfg.trust_remote_code:
        log.warning("model.trust_remote_code=true: Python code shipped with %s will run", cfg.path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if config.model_type != "opt":
        raise ConfigError(f"model.path={cfg.path!r} is a {config.model_type!r} model; shadow needs an OPT "
                          "checkpoint (facebook/opt-* or model=opt-mini)")
    return path, config


BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
GB = 1e9


def readable(size: float) -> str:
    """Bytes as MB below a gigabyte, else GB."""
    return f"{size / 1e6:.1f} MB" if size < GB else f"{size / GB:.1f} GB"


def parameter_count(config) -> int:
    """Parameters of an OPT model from its config (the LM head is tied to the embeddings)."""
    h, f, e = config.hidden_size, config.ffn_dim, config.word_embed_proj_dim
    per_layer = 4 * (h * h + h) + 2 * h * f + f + h + 4 * h  # attention, FFN, two LayerNorms
    embeddings = config.vocab_size * e + (config.max_position_embeddings + 2) * h + (2 * e * h if e != h else 0)
    final_norm = 2 * h if config.do_layer_norm_before and not config._remove_final_layer_norm else 0
    return embeddings + config.num_hidden_layers * per_layer + final_norm


def available_memory(cfg: ModelConfig, device: str) -> tuple[float, str]:
    """Free bytes where the model will live, and a name for that place."""
    import psutil

    if cfg.device_map and torch.cuda.is_available():
        return (sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())),
                f"{torch.cuda.device_count()} visible GPUs")
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.mem_get_info(torch.device(device))[0], device
    return psutil.virtual_memory().available, "CPU RAM"


def check_memory(cfg: ModelConfig, config, device: str, beside: float = 0.0) -> float:
    """Log the weights' size and fail before loading when they cannot fit, with ``beside`` bytes of other work
    (a predictor trained on the same device) next to them; returns the bytes the weights need."""
    params = parameter_count(config)
    need = params * BYTES[cfg.dtype]
    free, where = available_memory(cfg, device)
    count = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.2f}M"
    log.info("model %s: %s parameters, %s in %s; %s free in %s", cfg.name, count, readable(need), cfg.dtype,
             readable(free), where)
    if need * 1.2 + beside > free:  # activations, masks and predictors need room beside the weights
        fixes = (["model.dtype=float16"] if cfg.dtype == "float32" else []) + (
            ["predictor.device=cpu (or another GPU)"] if beside else []) + [
            "model.device_map=auto over more GPUs", "a smaller model"]
        training = f" and {beside / GB:.1f} GB to train the predictor beside them" if beside else ""
        raise ConfigError(f"model={cfg.name} needs ≈{(need * 1.2 + beside) / GB:.1f} GB in dtype={cfg.dtype} "
                          f"(weights + 20%{training}) but {where} has {free / GB:.1f} GB free; use "
                          f"{', '.join(fixes[:-1])} or {fixes[-1]}")
    return need


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_model(cfg: ModelConfig, device: str = "cpu") -> tuple[nn.Module, object]:
    """The model (in eval mode) and tokenizer; a sweep in one process loads each model once."""
    from transformers import AutoModelForCausalLM

    placement = (cfg.device_map, str(sorted((cfg.max_memory or {}).items(), key=str)), cfg.offload_folder, device)
    key = (cfg.path, cfg.revision, cfg.dtype, *placement)
    if key not in _LOADED:
        _LOADED.clear()  # keep one model resident: big models do not fit twice
        path, _ = check_opt(cfg)
        log.info("loading %s from %s (%s)", cfg.name, path, cfg.dtype)
        kwargs = {"device_map": cfg.device_map, "max_memory": dict(cfg.max_memory or {}) or None,
                  "offload_folder": cfg.offload_folder} if cfg.device_map else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype],
                                                     trust_remote_code=cfg.trust_remote_code, **kwargs)
        if not cfg.device_map:
            model.to(device)
        _LOADED[key] = (model.eval(), load_tokenizer(path, cfg.trust_remote_code))
    return _LOADED[key]


def pad_id(tokenizer) -> int:
    """The id to pad batches with (padding is masked out; the tokenizer's own pad token when it has one)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def input_device(model: nn.Module) -> torch.device:
    """Where to put the model's inputs: its device, or the CPU when accelerate offloaded it (the weights then sit
    on ``meta`` between forwards, and accelerate's hooks move inputs to each layer's execution device)."""
    return model.device if model.device.type != "meta" else torch.device("cpu")


def offloaded(module: nn.Module) -> bool:
    """Whether accelerate offloaded some of the module's weights (they sit on ``meta`` outside its forward)."""
    from accelerate.utils import has_offloaded_params

    return any(has_offloaded_params(part) for part in module.modules())


@contextmanager
def resident(module: nn.Module) -> Iterator[None]:
    """The module's weights on its execution device inside the block, those accelerate offloaded to the CPU or disk
    included (on ``meta`` outside their forward): for code that reads weights rather than calling the module."""
    from accelerate.utils import align_module_device, has_offloaded_params

    with ExitStack() as stack:
        for part in module.modules():
            if has_offloaded_params(part):
                stack.enter_context(align_module_device(part))
        yield


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.decoder.layers


def fingerprint(path: str | Path, config, cfg: ModelConfig) -> dict:
    """What identifies the weights for caching, read without loading them (``check_opt``'s path and config): the
    config, dtype, and each weight file's name, size and mtime."""
    path = Path(path)
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.glob("*.safetensors")) \
        if path.is_dir() else []
    config = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return {"path": str(path), "dtype": cfg.dtype, "files": files,
            "config_sha256": hashlib.sha256(config.encode()).hexdigest()}
