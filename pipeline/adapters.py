"""The one table of architecture differences: where a model keeps its layers, sublayers and norms.

Generic code (scoring, pruning, export) asks the adapter, never `isinstance(model, LlamaForCausalLM)`.
Adding an architecture means adding a row here and a tiny-config test in tests/test_adapters.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

from .errors import ModelError


@dataclass(frozen=True)
class Adapter:
    """Attribute paths inside one architecture's `*ForCausalLM` and decoder layer."""

    model_type: str
    layers: str = "model.layers"
    attention: str = "self_attn"
    attention_norm: str = "input_layernorm"
    mlp: str = "mlp"
    mlp_norm: str = "post_attention_layernorm"
    final_norm: str = "model.norm"
    embed: str = "model.embed_tokens"
    lm_head: str = "lm_head"


# Llama-family decoders share one layout; each still gets its own row so that support is explicit
# and `tests/test_adapters.py` can require a tiny-model test per row.
ADAPTERS: dict[str, Adapter] = {
    name: Adapter(model_type=name) for name in ("llama", "mistral", "qwen2", "qwen3")
}


def supported_architectures() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(config) -> Adapter:
    """The adapter for a transformers config, or a ModelError naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ModelError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(supported_architectures())}. "
            "Pick a model of a supported family or add a row to pipeline/adapters.py."
        )
    layer_types = getattr(config, "layer_types", None)
    if layer_types and len(set(layer_types)) > 1:
        raise ModelError(
            f"this {model_type} config mixes attention kinds {sorted(set(layer_types))}; dropping layers from "
            "models with mixed sliding/full attention is not supported. Use a config with one attention kind."
        )
    return ADAPTERS[model_type]


def get_path(obj, dotted: str):
    return reduce(getattr, dotted.split("."), obj)


def decoder_layers(model) -> list:
    """The decoder layers of a causal LM, in order."""
    return list(get_path(model, adapter_for(model.config).layers))
