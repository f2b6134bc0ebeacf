"""Shared fixtures (a tiny OPT, opt-mini's tokenizer, the gather backends, Hydra composition) and offline hubs for
every test; shared functions are in helpers.py."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("SHADOW_AUTOTUNE", "0")  # tests check results: each kernel's first launch setting (and
# test_kernels every setting), not a tuning run at every new shape (which reads the clock, so waits for the device)
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:  # each worker's share of the cores, for torch here and the jobs the tests start
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // WORKERS))

import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton's kernels then run on CPU tensors, in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import CONF_DIR, make_tiny_opt, use_triton_kernels  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from shadow.compose import register_configs  # noqa: E402
from shadow.opt_mini import MODEL_DIR  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture
def tiny_opt():
    return make_tiny_opt()


@pytest.fixture(params=["native", "torch", "triton"])
def gather(request, monkeypatch):
    """Sparse decoding on each backend of the gather kernels (Triton's on CPU tensors, in its interpreter): one test
    per decoder asks for it; the others run on the default backend (the compiled one, for float32 on the CPU), and
    test_kernels compares the backends with each other."""
    from shadow import kernels

    if request.param == "torch":
        monkeypatch.setattr(kernels, "native", lambda: None)
    elif request.param == "triton":
        use_triton_kernels(monkeypatch)
    else:
        assert kernels.native() is not None, "the compiled gather kernel must build here"
    return request.param


@pytest.fixture
def compose_cfg():
    """compose_cfg(*overrides) → the config exactly as `python -m shadow <overrides>` would build it."""
    register_configs()

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    return _compose
