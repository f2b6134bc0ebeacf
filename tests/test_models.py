"""Model loading: the parameter count behind the memory estimate, the early out-of-memory error, accelerate's
placement settings and an offloaded model."""

from __future__ import annotations

import pytest
from helpers import make_tiny_opt, run_shadow, settings

from shadow.config import ConfigError
from shadow.models import check_memory


def test_a_model_that_cannot_fit_fails_before_loading(monkeypatch):
    config = make_tiny_opt().config
    cfg = settings("model", name="tiny", dtype="float32")
    assert check_memory(cfg, config, "cpu") == 4 * sum(p.numel() for p in make_tiny_opt().parameters())
    monkeypatch.setattr("shadow.models.available_memory", lambda cfg, device: (1000.0, "CPU RAM"))
    with pytest.raises(ConfigError, match=r"model=tiny needs ≈.* GB in dtype=float32 .* CPU RAM has 0.0 GB free; "
                                          r"use model.dtype=float16, model.device_map=auto over more GPUs or "
                                          r"a smaller model$"):
        check_memory(cfg, config, "cpu")


def test_the_memory_check_counts_the_predictor_trained_beside_the_model(compose_cfg, monkeypatch):
    """OPT-66B's ShadowLLM predictor trains with 2.45B float32 parameters, gradients and AdamW moments (39 GB) plus
    a block of traces; on the model's device that must fit too."""
    from transformers import OPTConfig

    from shadow.arch import family_of
    from shadow.run import predictor_parameters, training_bytes

    cfg = compose_cfg("+criterion=plainact")
    config = OPTConfig(hidden_size=9216, num_hidden_layers=64, num_attention_heads=72, ffn_dim=36864)
    shape = family_of(config).shape(config, "kv_group")
    assert predictor_parameters(cfg, shape, 9216, heads_only=False) == pytest.approx(2.45e9, rel=0.01)
    beside = training_bytes(cfg, shape, 9216, examples=5000, heads_only=False)
    assert beside == 16 * predictor_parameters(cfg, shape, 9216, False) + 2e9  # a 2 GB block of the 94 GB traces
    tiny = make_tiny_opt().config
    monkeypatch.setattr("shadow.models.available_memory", lambda cfg, device: (45e9, "cuda:0"))
    model = settings("model", name="tiny", dtype="float16")
    check_memory(model, tiny, "cuda:0")
    with pytest.raises(ConfigError, match=r"model=tiny needs ≈46.\d GB in dtype=float16 \(weights \+ 20% and 46.\d GB "
                                          r"to train the predictor beside them\) but cuda:0 has 45.0 GB free; use "
                                          r"predictor.device=cpu \(or another GPU\), model.device_map=auto"):
        check_memory(model, tiny, "cuda:0", beside + 5e9)


def test_max_memory_takes_gpu_indices_and_cpu_from_the_command_line(tmp_path):
    """As accelerate writes it: integer GPU keys and ``cpu``, also under --cfg job (the node defaults to {})."""
    for caps, shown in (("{0: 70GiB, 1: 70GiB}", ["0: 70GiB", "1: 70GiB"]), ("{cpu: 8MB}", ["cpu: 8MB"])):
        result = run_shadow(f"+criterion=plainact model.device_map=auto model.max_memory={caps.replace(' ', '')} "
                            "--cfg job", tmp_path)
        assert result.returncode == 0, result.stderr
        assert all(line in result.stdout for line in shown)
    assert "max_memory: null" in run_shadow("+criterion=plainact --cfg job", tmp_path).stdout



@pytest.mark.parametrize("criterion", ["plainact", "weight_magnitude", "grasp"])
def test_a_disk_offloaded_model_gives_the_resident_models_results(compose_cfg, tmp_path, criterion):
    """accelerate keeps offloaded layers' weights on ``meta`` outside their forward: scoring (gradients, weights,
    GraSP's gates), predicted masks and evaluation must follow the activations and fetch the weights."""
    from shadow.models import load_model
    from shadow.run import run

    fast = [f"+criterion={criterion}", "logger=none", "calibration.limit=16", "predictor.head_epochs=2",
            "predictor.neuron_epochs=1", "eval.limit=2", "eval.protocols=[token]", "sparsity=0.5"]
    resident = run(compose_cfg(*fast, f"cache_dir={tmp_path / 'a'}"), tmp_path / "resident")
    cfg = compose_cfg(*fast, f"cache_dir={tmp_path / 'b'}", "model.device_map=auto", "model.max_memory={cpu: 8MB}",
                      f"model.offload_folder={tmp_path / 'offload'}")
    offloaded = run(cfg, tmp_path / "offloaded")
    model, _ = load_model(cfg.model, cfg.device)
    assert "disk" in set(model.hf_device_map.values())  # most of opt-mini's 28 MB is on disk
    for key in ("token_perplexity", "predictor/heads_val_spearman", "achieved_head_sparsity"):
        assert offloaded[key] == pytest.approx(resident[key], rel=1e-5), key
