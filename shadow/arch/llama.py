"""The Llama layout, shared by Llama 2 and 3.x, Mistral, Qwen2/2.5 (biased query, key and value projections) and
Qwen3 (RMSNorm on each query and key head): RMSNorm before each block, rotary positions, grouped-query attention
and a gated FFN, down(act(gate(x)) ⊙ up(x)).

Gemma is not of this family: it scales its embeddings by √hidden, and Gemma 2 and 3 soft-cap logits and add
norms after each block (``family_of`` says so).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from shadow import kernels
from shadow.arch.base import FFN, Activation, Attention, Family, Fetch, Shape
from shadow.offload import resident


def _rope(theta: float, context: int, llama3: float | None = None) -> dict:
    """Config fields of a rotary embedding: plain, or Llama 3.1's frequency scaling by ``llama3``."""
    if llama3 is None:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}, "max_position_embeddings": context}
    return {"rope_parameters": {"rope_type": "llama3", "rope_theta": theta, "factor": llama3, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "max_position_embeddings": context}


def _sizes(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int, tied: bool,
           **extra) -> dict:
    return {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": intermediate, "vocab_size": vocab,
            "tie_word_embeddings": tied, **extra}


def rms_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """transformers' RMSNorm module on ``x`` as torch's one operation, which torch fuses on CUDA (the module's own
    forward is six or eight kernels a call); the same float32 sums."""
    return nn.functional.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


class Llama(Family):
    model_type = "llama"
    paths = {"query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj",
             "output": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    neuron_rows = ("gate", "up")
    activation_path = "mlp.act_fn"
    rotary = True
    head_norms = False  # an RMSNorm on each query and key head (Qwen3)
    architectures = {
        "llama-3.2-1b": _sizes(2048, 16, 32, 8, 8192, 128256, True, **_rope(5e5, 131072, 32.0)),
        "llama-3.2-3b": _sizes(3072, 28, 24, 8, 8192, 128256, True, **_rope(5e5, 131072, 32.0)),
        "llama-3.1-8b": _sizes(4096, 32, 32, 8, 14336, 128256, False, **_rope(5e5, 131072, 8.0)),
        "llama-2-7b": _sizes(4096, 32, 32, 32, 11008, 32000, False, **_rope(1e4, 4096)),
        "llama-2-13b": _sizes(5120, 40, 40, 40, 13824, 32000, False, **_rope(1e4, 4096)),
        "llama-mini": _sizes(256, 6, 8, 2, 768, 8192, True, head_dim=32, **_rope(1e4, 512)),  # shadow's own
    }

    def shape(self, config, attention_unit: str) -> Shape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return Shape(config.num_hidden_layers, heads, config.num_key_value_heads, head_dim, config.intermediate_size,
                     attention_unit)

    def activation(self, config) -> Activation:
        return Activation(config.hidden_act)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def backbone(self, model: nn.Module) -> nn.Module:
        return model.model

    def set_head_count(self, layer: nn.Module, count: int) -> None:
        """Nothing to set: the attention infers its heads from the projections' widths, and ``pruned`` keeps whole
        key-value groups, so the query heads per key-value head stay as they are."""

    def scaling(self, layer: nn.Module) -> float:
        return layer.self_attn.scaling

    def attention_biases(self, config) -> tuple[bool, bool]:
        """Whether the query, key and value projections have biases, and whether the output projection has."""
        bias = getattr(config, "attention_bias", False)
        return bias, bias

    def parameter_count(self, config) -> int:
        shape = self.shape(config, "query_head")
        h, f, d = config.hidden_size, config.intermediate_size, shape.head_dim
        qkv_bias, output_bias = self.attention_biases(config)
        query, kv = shape.query_heads * d, shape.kv_heads * d
        attention = 2 * h * query + 2 * h * kv + qkv_bias * (query + 2 * kv) + output_bias * h
        ffn = 3 * h * f + getattr(config, "mlp_bias", False) * (2 * f + h)
        norms = 2 * h + 2 * d * self.head_norms
        embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
        return embeddings + config.num_hidden_layers * (attention + ffn + norms) + h

    def config(self, architecture: str):
        from transformers import AutoConfig

        return AutoConfig.for_model(self.model_type, **self.architectures[architecture])

    def sliding_window(self, config) -> int | None:
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and "sliding_attention" not in layer_types:
            return None
        return getattr(config, "sliding_window", None)

    def rotate(self, model: nn.Module, layer: nn.Module, role: str, states: Tensor, positions: Tensor,
               table: Tensor | None = None) -> Tensor:
        if table is None:
            cos, sin = self.backbone(model).rotary_emb(states, positions[None])
        else:
            cos, sin = table[:, positions.to(table.device)]
        return kernels.rotated(states, cos, sin, self.head_norm(layer, role))

    def head_norm(self, layer: nn.Module, role: str) -> tuple[Tensor, float] | None:
        if not self.head_norms:
            return None
        norm = getattr(layer.self_attn, "q_norm" if role == "query" else "k_norm")
        return norm.weight, norm.variance_epsilon

    def rotary_table(self, model: nn.Module, positions: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        rotary = self.backbone(model).rotary_emb
        probe = torch.zeros(1, dtype=dtype, device=device)  # sets the tables' dtype and device
        return torch.cat(rotary(probe, torch.arange(positions, device=device)[None]))

    def decode_step(self, model: nn.Module, tokens: Tensor, position: Tensor, attention: Attention, ffn: FFN,
                    fetch: Fetch) -> Tensor:
        backbone = self.backbone(model)
        with resident(backbone.embed_tokens):
            weight = backbone.embed_tokens.weight
            x = nn.functional.embedding(tokens.to(weight.device), weight)  # a tensor index: no host read
        for index, layer in enumerate(backbone.layers):
            with fetch(index):
                x = x.to(layer.mlp.down_proj.weight.device)
                x = x + attention(index, rms_norm(layer.input_layernorm, x))
                x = x + ffn(index, rms_norm(layer.post_attention_layernorm, x))
        return model.lm_head(rms_norm(backbone.norm, x)).float()


class Mistral(Llama):
    model_type = "mistral"
    architectures = {"mistral-7b": _sizes(4096, 32, 32, 8, 14336, 32768, False, sliding_window=None,
                                          **_rope(1e6, 32768))}


class Qwen2(Llama):
    model_type = "qwen2"
    architectures = {"qwen2.5-7b": _sizes(3584, 28, 28, 4, 18944, 152064, False, **_rope(1e6, 32768))}

    def attention_biases(self, config) -> tuple[bool, bool]:
        return True, False


class Qwen3(Llama):
    model_type = "qwen3"
    head_norms = True
    architectures = {"qwen3-8b": _sizes(4096, 36, 32, 8, 12288, 151936, False, head_dim=128,
                                        **_rope(1e6, 40960))}
