"""Model loading helpers: the parameter count behind the memory estimate, and the early out-of-memory error."""

from __future__ import annotations

import pytest
from conftest import make_tiny_opt

from shadow.config import ConfigError, ModelConfig
from shadow.models import check_memory, parameter_count


def test_parameter_count_is_exact():
    from transformers import OPTConfig, OPTForCausalLM

    tiny = make_tiny_opt()
    assert parameter_count(tiny.config) == sum(p.numel() for p in tiny.parameters())
    # OPT-350m's shape: embeddings projected in and out, LayerNorm after each block
    projected = OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=32, word_embed_proj_dim=16, ffn_dim=64,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=20,
                                         do_layer_norm_before=False))
    assert parameter_count(projected.config) == sum(p.numel() for p in projected.parameters())


def test_a_model_that_cannot_fit_fails_before_loading(monkeypatch):
    config = make_tiny_opt().config
    cfg = ModelConfig(name="tiny", path="unused", dtype="float32")
    assert check_memory(cfg, config, "cpu") == 4 * parameter_count(config)
    monkeypatch.setattr("shadow.models.available_memory", lambda cfg, device: (1000.0, "CPU RAM"))
    with pytest.raises(ConfigError, match=r"model=tiny needs ≈.* GB in dtype=float32 .* CPU RAM has 0.0 GB free; "
                                          r"use model.dtype=float16, model.device_map=auto over more GPUs or "
                                          r"a smaller model$"):
        check_memory(cfg, config, "cpu")
