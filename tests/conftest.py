"""Shared fixtures: tiny OPT models built in the test, opt-mini's tokenizer, Hydra composition, offline hubs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from shadow.config import register_configs  # noqa: E402
from shadow.opt_mini import MODEL_DIR  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = str(ROOT / "conf")
FAST_CLI = ("logger=none calibration.limit=8 predictor.head_epochs=2 predictor.neuron_epochs=1 eval.limit=1 "
            "eval.protocols=[token]")  # the opt-mini pipeline in seconds


def run_shadow(args: str, cwd: Path, module: str = "shadow", **env: str) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in a subprocess, as a user types it."""
    return subprocess.run([sys.executable, "-m", module, *args.split()], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=900)


def make_tiny_opt(layers: int = 3, heads: int = 4, hidden: int = 16, ffn: int = 32, vocab: int = 8192,
                  seed: int = 0, dtype: torch.dtype = torch.float32, positions: int = 64, like_350m: bool = False):
    """A random OPT; ``like_350m``: OPT-350m's shape, with LayerNorm after each block and the embeddings
    projected in and out."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=vocab, hidden_size=hidden, word_embed_proj_dim=hidden // 2 if like_350m else hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                       max_position_embeddings=positions, dropout=0.0, attention_dropout=0.0, pad_token_id=1,
                       bos_token_id=2, eos_token_id=2, do_layer_norm_before=not like_350m)
    model = OPTForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # larger than the default init so that every unit matters measurably
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture
def tiny_opt():
    return make_tiny_opt()


@pytest.fixture
def compose_cfg():
    """compose_cfg(*overrides) → the config exactly as `python -m shadow <overrides>` would build it."""
    register_configs()

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    return _compose
