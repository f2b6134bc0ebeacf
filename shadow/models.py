"""Loading models and tokenizers from a hub id or a local directory, once per process, and their memory check."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from shadow.arch import FAMILIES, NOT_MODELLED, family_of
from shadow.config import DTYPES, ModelConfig
from shadow.errors import ConfigError

log = logging.getLogger(__name__)
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}
_LOADED: dict[tuple, tuple[nn.Module, object]] = {}
GGUF = ".gguf"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}


def is_local(path: str) -> bool:
    """Whether ``model.path`` names a local file or directory rather than a hub id."""
    return path.startswith((".", "/", "~")) or Path(path).expanduser().exists()


def resolve_path(cfg: ModelConfig, weights: bool = True) -> str:
    """The local checkpoint: a model directory, or a GGUF file (``model.path`` naming one, or ``model.gguf_file``
    inside ``model.path``); a hub id is looked up in the local cache, and fetched where the hub is reachable (its
    config files alone without ``weights``)."""
    gguf = cfg.gguf_file
    if cfg.path.endswith(GGUF):
        if gguf is not None:
            raise ConfigError(f"model.path={cfg.path!r} names a GGUF file and model.gguf_file={gguf!r} names another; "
                              "drop model.gguf_file, or point model.path at the directory that holds it")
        file = Path(cfg.path).expanduser()
        if not file.is_file():
            raise ConfigError(f"model.path={cfg.path!r} does not exist; point model.path at a .gguf file (the "
                              "preset's comment says which package ships it) or at a model directory")
        return str(file.resolve())
    if gguf is not None and not gguf.endswith(GGUF):
        raise ConfigError(f"model.gguf_file={gguf!r} is not a .gguf file; name the GGUF file inside model.path, "
                          "or drop model.gguf_file for a safetensors checkpoint")
    path = Path(cfg.path).expanduser()
    if is_local(cfg.path):
        if gguf is not None:
            if not (path / gguf).is_file():
                raise ConfigError(f"model.gguf_file={gguf!r} is not in model.path={cfg.path!r}; name a .gguf file "
                                  "of that directory")
            return str((path / gguf).resolve())
        if not path.exists():
            raise ConfigError(f"model.path={cfg.path!r} does not exist; point model.path at a Hugging Face model "
                              "directory or a .gguf file, or use a hub id such as facebook/opt-1.3b")
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path={cfg.path!r} has no config.json; point model.path at a Hugging Face "
                              "model directory or a .gguf file, or use a hub id such as facebook/opt-1.3b")
        return str(path.resolve())
    from huggingface_hub import snapshot_download

    patterns = [gguf] if gguf is not None else ["*.json", "*.safetensors", "*.txt", "*.model", "merges.txt"] \
        if weights else ["*.json"]
    try:
        directory = snapshot_download(cfg.path, revision=cfg.revision, local_files_only=hub_offline(),
                                      allow_patterns=patterns)
    except Exception as err:  # the hub client raises many types for "not there"
        where = "the hub is offline (HF_HUB_OFFLINE=1) and it is not in the local cache" if hub_offline() \
            else f"it could not be fetched ({type(err).__name__})"
        raise ConfigError(f"model.path={cfg.path!r}: {where}; download it where the hub is reachable "
                          "(huggingface-cli download) or set model.path to a local directory") from None
    if gguf is not None and not (Path(directory) / gguf).is_file():
        raise ConfigError(f"model.gguf_file={gguf!r} is not a file of {cfg.path}; name one of its .gguf files")
    return str(Path(directory) / gguf) if gguf is not None else directory


def is_gguf(path: str | Path) -> bool:
    return str(path).endswith(GGUF)


def _source(path: str) -> tuple[str, dict]:
    """``from_pretrained``'s directory and keywords for a local checkpoint (a directory, or a GGUF file in one)."""
    if not is_gguf(path):
        return path, {}
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise ConfigError(f"model.path={path!r} is a GGUF file, and reading one needs the gguf package; "
                          "pip install 'shadow[gguf]' (or pip install gguf)") from None
    return str(Path(path).parent), {"gguf_file": Path(path).name}


def gguf_storage(path: str) -> str:
    """How a GGUF file stores its weights, as llama.cpp names its file types (``MOSTLY_Q4_1``, ``ALL_F32``)."""
    from gguf import GGUFReader, LlamaFileType

    field = GGUFReader(path).fields.get("general.file_type")
    return "unknown" if field is None else LlamaFileType(int(field.parts[field.data[0]][0])).name


@functools.cache
def read_config(path: str, trust_remote_code: bool):
    """A local checkpoint's config, read once per process (a GGUF file's takes seconds: the check before a sweep
    reads it for every job)."""
    from transformers import AutoConfig

    directory, kwargs = _source(path)
    return AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code, **kwargs)


def check_model(cfg: ModelConfig, weights: bool = True):
    """The local checkpoint (``resolve_path``) and the model's config, read without its weights (from a GGUF file's
    metadata: its architecture gives the family): fail fast on a missing model or one of a family shadow does not
    know. Without ``weights``, a hub model's weights are not fetched (a check before launching jobs)."""
    path = resolve_path(cfg, weights)
    if cfg.trust_remote_code:
        log.warning("model.trust_remote_code=true: Python code shipped with %s will run", cfg.path)
    config = read_config(path, cfg.trust_remote_code)
    if config.model_type in NOT_MODELLED:
        raise ConfigError(f"model.path={cfg.path!r} is a {config.model_type!r} model: "
                          f"{NOT_MODELLED[config.model_type]}, which shadow's llama family does not model; use a "
                          "Llama, Mistral or Qwen checkpoint")
    if config.model_type not in FAMILIES:
        raise ConfigError(f"model.path={cfg.path!r} is a {config.model_type!r} model, not of a family shadow knows "
                          f"({', '.join(sorted(FAMILIES))}); use a checkpoint of one of them, or add the family "
                          "(docs/extending.md)")
    return path, config


def model_dtype(cfg: ModelConfig, config, device: str) -> str:
    """``model.dtype``, where it is ``auto`` the dtype the checkpoint's ``config`` names (float32 where it names
    none), float16 as float32 where the model runs on the CPU (slow and inexact there)."""
    if cfg.dtype != "auto":
        return cfg.dtype
    on_cpu = device == "cpu" if cfg.device_map is None else not torch.cuda.is_available()
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(stored).removeprefix("torch.") if stored is not None else "float32"
    return "float32" if name not in DTYPES or (on_cpu and name == "float16") else name


GB = 1e9


def readable(size: float) -> str:
    """Bytes as MB below a gigabyte, else GB."""
    return f"{size / 1e6:.1f} MB" if size < GB else f"{size / GB:.1f} GB"


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
    family = family_of(config)
    params = family.parameter_count(config)
    dtype = model_dtype(cfg, config, device)
    need = family.weight_bytes(config, TORCH_DTYPES[dtype])
    free, where = available_memory(cfg, device)
    count = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.2f}M"
    log.info("model %s: %s parameters, %s in %s; %s free in %s", cfg.name, count, readable(need), dtype,
             readable(free), where)
    if need * 1.2 + beside > free:  # activations, masks and predictors need room beside the weights
        fixes = (["model.dtype=float16"] if dtype == "float32" else []) + (
            ["predictor.device=cpu (or another GPU)"] if beside else []) + [
            "model.device_map=auto over more GPUs", "a smaller model"]
        training = f" and {beside / GB:.1f} GB to train the predictor beside them" if beside else ""
        raise ConfigError(f"model={cfg.name} needs ≈{(need * 1.2 + beside) / GB:.1f} GB in dtype={dtype} "
                          f"(weights + 20%{training}) but {where} has {free / GB:.1f} GB free; use "
                          f"{', '.join(fixes[:-1])} or {fixes[-1]}")
    return need


def load_tokenizer(path: str, trust_remote_code: bool):
    """The tokenizer of a local checkpoint: a GGUF file carries its own."""
    from transformers import AutoTokenizer

    directory, kwargs = _source(path)
    return AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code, **kwargs)


def load_model(cfg: ModelConfig, device: str) -> tuple[nn.Module, object]:
    """The model (in eval mode) and tokenizer; a sweep in one process loads each model once."""
    from transformers import AutoModelForCausalLM

    placement = (cfg.device_map, str(sorted((cfg.max_memory or {}).items(), key=str)), cfg.offload_folder, device)
    key = (cfg.path, cfg.gguf_file, cfg.revision, cfg.dtype, *placement)
    if key not in _LOADED:
        _LOADED.clear()  # keep one model resident: big models do not fit twice
        path, config = check_model(cfg)
        dtype = model_dtype(cfg, config, device)
        directory, kwargs = _source(path)
        if is_gguf(path):
            log.info("loading %s from %s: stored as %s, dequantised to %s", cfg.name, path, gguf_storage(path),
                     dtype)
        else:
            log.info("loading %s from %s (%s)", cfg.name, path, dtype)
        if cfg.device_map:
            kwargs |= {"device_map": cfg.device_map, "max_memory": dict(cfg.max_memory or {}) or None,
                       "offload_folder": cfg.offload_folder}
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=TORCH_DTYPES[dtype],
                                                     trust_remote_code=cfg.trust_remote_code, **kwargs)
        if not cfg.device_map:
            model.to(device)
        _LOADED[key] = (model.eval(), load_tokenizer(path, cfg.trust_remote_code))
    return _LOADED[key]


def pad_id(tokenizer) -> int:
    """The id to pad batches with (padding is masked out; the tokenizer's own pad token when it has one)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def model_fingerprint(path: str | Path, config, cfg: ModelConfig) -> dict:
    """What identifies the weights for caching, read without loading them (``check_model``'s path and config): the
    config, dtype, and each weight file's name, size and mtime."""
    path = Path(path)
    weights = [path] if is_gguf(path) else sorted(path.glob("*.safetensors")) if path.is_dir() else []
    files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in weights]
    config = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return {"path": str(path), "dtype": cfg.dtype, "files": files,
            "config_sha256": hashlib.sha256(config.encode()).hexdigest()}
