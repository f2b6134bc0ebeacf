"""Model loading: the parameter count behind the memory estimate, the early out-of-memory error, accelerate's
placement settings, an offloaded model and GGUF checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_llama, make_tiny_opt, run_shadow, settings

from shadow.errors import ConfigError
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


def write_gguf(model, tokenizer, path: Path) -> None:
    """``model`` (a Llama) and ``tokenizer`` (byte-level BPE) as llama.cpp's converter writes a GGUF file, float32:
    llama.cpp's tensor names, query and key rows permuted as it stores them, the vocabulary and merges."""
    gguf = pytest.importorskip("gguf")
    config = model.config
    heads, kv_heads, layers = config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])
    special = {token["id"] for token in spec["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if index in special else 1 for _, index in vocab])  # 3: control
    writer.add_token_merges([" ".join(merge) for merge in spec["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(True)

    def stored(weight: torch.Tensor, count: int) -> torch.Tensor:  # llama.cpp's rotary layout of query/key rows
        return weight.reshape(count, 2, weight.shape[0] // count // 2, -1).swapaxes(1, 2).reshape(weight.shape)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    for name, weight in model.state_dict().items():
        weight = weight.detach().float()
        if name.endswith("q_proj.weight"):
            weight = stored(weight, heads)
        elif name.endswith("k_proj.weight"):
            weight = stored(weight, kv_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), weight.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_checkpoint_loads_equal_to_the_same_weights_from_safetensors(tmp_path, tokenizer):
    """A GGUF file read as a model source: its family from the file's architecture, its tokenizer from the file, and
    the same logits as the same weights saved as safetensors (float32, so exactly the same)."""
    from shadow.models import check_model, load_model, load_tokenizer, model_fingerprint

    model = make_tiny_llama(layers=2, heads=4, kv_heads=2, hidden=32, ffn=48, vocab=len(tokenizer), positions=64)
    model.save_pretrained(tmp_path / "safetensors")
    tokenizer.save_pretrained(tmp_path / "safetensors")
    (tmp_path / "gguf").mkdir()
    write_gguf(model, tokenizer, tmp_path / "gguf" / "tiny.F32.gguf")
    as_file = settings("model", name="tiny", path=str(tmp_path / "gguf" / "tiny.F32.gguf"), dtype="float32")
    in_directory = settings("model", name="tiny", path=str(tmp_path / "gguf"), gguf_file="tiny.F32.gguf",
                            dtype="float32")
    plain = settings("model", name="tiny", path=str(tmp_path / "safetensors"), dtype="float32")
    path, config = check_model(as_file)
    assert path == check_model(in_directory)[0] == str(tmp_path / "gguf" / "tiny.F32.gguf")
    assert config.model_type == "llama" and config.num_key_value_heads == 2 and config.intermediate_size == 48
    assert model_fingerprint(path, config, as_file)["files"][0][0] == "tiny.F32.gguf"
    text = "The little boat sailed on, and the sea was calm."
    assert load_tokenizer(path, False)(text)["input_ids"] == tokenizer(text)["input_ids"]
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        expected = load_model(plain, "cpu")[0](ids).logits
        for cfg in (as_file, in_directory):
            loaded, _ = load_model(cfg, "cpu")
            assert torch.equal(loaded(ids).logits, expected)


def test_gguf_paths_that_cannot_work_fail_naming_the_key(tmp_path):
    from shadow.models import check_model

    (tmp_path / "model.gguf").write_bytes(b"")
    cases = [({"path": str(tmp_path / "missing.gguf")}, "model.path='.*missing.gguf' does not exist; point model.path "
                                                       "at a .gguf file"),
             ({"path": str(tmp_path), "gguf_file": "other.gguf"}, "model.gguf_file='other.gguf' is not in model.path"),
             ({"path": str(tmp_path / "model.gguf"), "gguf_file": "model.gguf"}, "names a GGUF file and "
                                                                               "model.gguf_file='model.gguf' names"),
             ({"path": str(tmp_path), "gguf_file": "model.safetensors"}, "is not a .gguf file")]
    for values, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_model(settings("model", name="x", dtype="float32", **values))
