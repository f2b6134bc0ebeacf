"""Model families (``base.Family``), looked up by a model config's ``model_type``; importing a family's module
registers it."""

from __future__ import annotations

from shadow.arch import llama, opt  # noqa: F401  (registers the families)
from shadow.arch.base import FAMILIES, Activation, Family, Shape
from shadow.errors import ConfigError

__all__ = ["FAMILIES", "NOT_MODELLED", "Activation", "Family", "Shape", "architecture_config", "architectures",
           "family_of"]

NOT_MODELLED = {  # model types close to a family, with what shadow does not model
    "gemma": "Gemma scales its embeddings by √hidden_size",
    "gemma2": "Gemma 2 soft-caps attention scores and logits and normalises after each block",
    "gemma3": "Gemma 3 normalises after each block and alternates local and global rotary embeddings",
}


def family_of(config) -> Family:
    """The family of a model config (a transformers ``PretrainedConfig``)."""
    if config.model_type in NOT_MODELLED:
        raise ConfigError(f"model_type={config.model_type!r} is not supported: {NOT_MODELLED[config.model_type]}, "
                          "which shadow's llama family does not model; use a Llama, Mistral or Qwen model")
    if config.model_type not in FAMILIES:
        raise ConfigError(f"model_type={config.model_type!r} is not of a family shadow knows "
                          f"({', '.join(sorted(FAMILIES))}); use a model of one of them, or add the family "
                          "(docs/extending.md)")
    return FAMILIES[config.model_type]


def architectures() -> list[str]:
    """Every known architecture by name (``opt-1.3b``; released sizes and llama-mini), for random-weight models."""
    return [name for family in FAMILIES.values() for name in family.architectures]


def architecture_config(name: str):
    """The config of a released architecture, of whichever family has it."""
    return next(family.config(name) for family in FAMILIES.values() if name in family.architectures)
