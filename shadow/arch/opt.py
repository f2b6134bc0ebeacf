"""OPT (facebook/opt-*): LayerNorm before each block (after it in OPT-350m), learned positions, ReLU FFN."""

from __future__ import annotations

from torch import Tensor, nn

from shadow.arch.base import FFN, Activation, Attention, Family, Fetch, Shape
from shadow.offload import resident


class OPT(Family):
    model_type = "opt"
    paths = {"query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj",
             "output": "self_attn.out_proj", "up": "fc1", "down": "fc2"}
    neuron_rows = ("up",)
    activation_path = "activation_fn"
    architectures = {name: {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads}
                     for name, hidden, layers, heads in (
                         ("opt-125m", 768, 12, 12), ("opt-350m", 1024, 24, 16), ("opt-1.3b", 2048, 24, 32),
                         ("opt-2.7b", 2560, 32, 32), ("opt-6.7b", 4096, 32, 32), ("opt-13b", 5120, 40, 40),
                         ("opt-30b", 7168, 48, 56), ("opt-66b", 9216, 64, 72))}

    def shape(self, config, attention_unit: str) -> Shape:
        heads = config.num_attention_heads
        return Shape(config.num_hidden_layers, heads, heads, config.hidden_size // heads, config.ffn_dim,
                     attention_unit)

    def activation(self, config) -> Activation:
        return Activation(config.activation_function)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.decoder.layers

    def backbone(self, model: nn.Module) -> nn.Module:
        return model.model.decoder

    def set_head_count(self, layer: nn.Module, count: int) -> None:
        layer.self_attn.num_heads = count

    def scaling(self, layer: nn.Module) -> float:
        return layer.self_attn.scaling

    def parameter_count(self, config) -> int:
        """The LM head is tied to the embeddings."""
        h, f, e = config.hidden_size, config.ffn_dim, config.word_embed_proj_dim
        per_layer = 4 * (h * h + h) + 2 * h * f + f + h + 4 * h  # attention, FFN, two LayerNorms
        embeddings = config.vocab_size * e + (config.max_position_embeddings + 2) * h + (2 * e * h if e != h else 0)
        final_norm = 2 * h if config.do_layer_norm_before and not config._remove_final_layer_norm else 0
        return embeddings + config.num_hidden_layers * per_layer + final_norm

    def config(self, architecture: str):
        """Vocabulary and context of the released models, FFN 4 × hidden; OPT-350m keeps its LayerNorm after each
        block but not its embedding projections (512 ↔ 1024), which cost next to nothing."""
        from transformers import OPTConfig

        fields = self.architectures[architecture]
        return OPTConfig(**fields, ffn_dim=4 * fields["hidden_size"], word_embed_proj_dim=fields["hidden_size"],
                         vocab_size=50272, max_position_embeddings=2048,
                         do_layer_norm_before=architecture != "opt-350m")

    def decode_step(self, model: nn.Module, tokens: Tensor, position: Tensor, attention: Attention, ffn: FFN,
                    fetch: Fetch) -> Tensor:
        decoder = self.backbone(model)
        with resident(decoder.embed_tokens), resident(decoder.embed_positions):
            weight = decoder.embed_tokens.weight
            x = nn.functional.embedding(tokens.to(weight.device), weight)  # a tensor index: no host read
            table = decoder.embed_positions.weight
            positions = nn.functional.embedding(position.to(table.device) + decoder.embed_positions.offset, table)
        if decoder.project_in is not None:
            x = decoder.project_in(x)
        x = x + positions.to(x.device)
        for index, layer in enumerate(decoder.layers):
            with fetch(index):
                x = x.to(layer.fc1.weight.device)
                norm_first = layer.do_layer_norm_before
                h = layer.self_attn_layer_norm(x) if norm_first else x
                x = x + attention(index, h)
                if not norm_first:
                    x = layer.self_attn_layer_norm(x)
                x = x + ffn(index, layer.final_layer_norm(x) if norm_first else x)
                if not norm_first:
                    x = layer.final_layer_norm(x)
        if decoder.final_layer_norm is not None:
            x = decoder.final_layer_norm(x)
        if decoder.project_out is not None:
            x = decoder.project_out(x)
        return model.lm_head(x).float()
