"""The one table of architecture differences: every attribute name generic code needs, one row per family.

Generic code (scoring, pruning, healing, export) asks the adapter, never `isinstance(model, LlamaForCausalLM)`.
Adding an architecture means adding a row here and a tiny-config case in tests/conftest.py (a test fails when
a row has none); README "Adding an architecture" walks through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

from ..errors import ModelError


@dataclass(frozen=True)
class Adapter:
    """Attribute paths inside one architecture's `*ForCausalLM` and its decoder layer."""

    model_type: str
    gguf_arch: str  # `general.architecture` in a GGUF file of this family
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    # Sliding-window layers on their own RoPE base (Gemma 3): the local rotary module, and the keywords by
    # which the decoder layer receives the global and the local (cos, sin); its attention takes its kind's.
    rotary_local: str | None = None
    rope_keywords: tuple[str, str] = ("position_embeddings", "position_embeddings")
    layer_returns_tuple: bool = False  # the decoder layer returns (hidden_states,) rather than the tensor
    mixed_attention: bool = False  # configs mixing sliding and full layers are supported (and tested)
    # pipeline/export/fused.py writes this family (it refuses activations and settings it has no layout for).
    fused_graph: bool = True
    norm_offset: float = 0.0  # RMSNorms scale by (offset + weight): Gemma's by (1 + weight)
    embed_scale: bool = False  # the embedding module multiplies its rows by its `embed_scale` buffer (Gemma)
    activation: str = "hidden_act"  # the config attribute naming the MLP activation
    # A sublayer is (norm before it, the module, norm after it or None); the residual is added after.
    attention: str = "self_attn"
    attention_norm: str = "input_layernorm"
    attention_post_norm: str | None = None
    mlp: str = "mlp"
    mlp_norm: str = "post_attention_layernorm"
    mlp_post_norm: str | None = None
    # Linear layers inside the attention module and the MLP (gated MLP: act(gate(x)) * up(x) -> down).
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    q_norm: str | None = None  # per-head RMSNorm of queries and keys before rotary (Qwen3, Gemma 3)
    k_norm: str | None = None
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"
    # Linear groups with a bias whatever the config says (Qwen2's q, k and v); llama-style configs add theirs
    # through attention_bias and mlp_bias.
    biases: tuple[str, ...] = ()

    @property
    def attention_parts(self) -> tuple[str, ...]:
        """The layer attributes removed with the attention sublayer."""
        return tuple(n for n in (self.attention, self.attention_norm, self.attention_post_norm) if n)

    @property
    def mlp_parts(self) -> tuple[str, ...]:
        return tuple(n for n in (self.mlp, self.mlp_norm, self.mlp_post_norm) if n)

    def layer_rope(self, layer, kwargs: dict):
        """Pop every rotary keyword from a decoder layer's kwargs; return the (cos, sin) its attention takes."""
        global_kw, local_kw = self.rope_keywords
        given = {kw: kwargs.pop(kw, None) for kw in {global_kw, local_kw}}
        return given[local_kw if is_sliding(layer) else global_kw]

    def rope_inputs(self, model, hidden, positions) -> dict:
        """The rotary keyword arguments for calling a decoder layer directly, for `positions` [1, seq]."""
        global_kw, local_kw = self.rope_keywords
        inputs = {global_kw: get_path(model, self.rotary)(hidden, positions)}
        if self.rotary_local is not None:
            inputs[local_kw] = get_path(model, self.rotary_local)(hidden, positions)
        return inputs

    @property
    def linear_names(self) -> tuple[str, ...]:
        return (self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.gate_proj, self.up_proj, self.down_proj)


# Llama-family decoders share one layout; each still gets its own row so that support is explicit and
# tests can require a tiny-model test per row. Mistral GGUFs are written with the llama architecture name.
ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("llama", gguf_arch="llama"),
    "mistral": Adapter("mistral", gguf_arch="llama"),
    "qwen2": Adapter("qwen2", gguf_arch="qwen2", biases=("qkv",)),
    "qwen3": Adapter("qwen3", gguf_arch="qwen3", q_norm="q_norm", k_norm="k_norm"),
    # Gemma 3: norms before and after each sublayer ("post_attention_layernorm" is the attention's post-norm
    # here, not the MLP's pre-norm), (1 + weight) norms, per-head q/k norms, embeddings scaled inside
    # embed_tokens, a tanh-GELU MLP, sliding and full layers interleaved on two rotary bases.
    "gemma3_text": Adapter(
        "gemma3_text", gguf_arch="gemma3", attention_post_norm="post_attention_layernorm",
        mlp_norm="pre_feedforward_layernorm", mlp_post_norm="post_feedforward_layernorm",
        rotary_local="model.rotary_emb_local",
        rope_keywords=("position_embeddings_global", "position_embeddings_local"),
        layer_returns_tuple=True, mixed_attention=True, norm_offset=1.0, embed_scale=True,
        activation="hidden_activation", q_norm="q_norm", k_norm="k_norm"),
}


def supported_architectures() -> list[str]:
    return sorted(ADAPTERS)


def unsupported(model_type, where: str = "") -> ModelError:
    return ModelError(
        f"architecture {model_type!r}{' (' + where + ')' if where else ''} is not supported; supported: "
        f"{', '.join(supported_architectures())}. Pick a model of a supported family, or add a row to "
        "pipeline/model/adapters.py (README: Adding an architecture).")


def adapter_for(config) -> Adapter:
    """The adapter for a transformers config, or a ModelError naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise unsupported(model_type)
    layer_types = getattr(config, "layer_types", None)
    if layer_types and len(set(layer_types)) > 1 and not ADAPTERS[model_type].mixed_attention:
        raise ModelError(
            f"this {model_type} config mixes attention kinds {sorted(set(layer_types))}; dropping layers from "
            f"{model_type} models with mixed sliding/full attention is not supported (it is for: "
            f"{', '.join(sorted(k for k, a in ADAPTERS.items() if a.mixed_attention))}). Use a config with one "
            "attention kind.")
    return ADAPTERS[model_type]


def model_type_for_gguf(arch: str) -> str:
    """The transformers model_type of a GGUF `general.architecture`, or a ModelError naming what is supported."""
    for adapter in ADAPTERS.values():
        if adapter.gguf_arch == arch:
            return adapter.model_type
    raise unsupported(arch, "GGUF general.architecture")


def is_sliding(layer) -> bool:
    """Whether a decoder layer attends within a sliding window (transformers records its kind per layer)."""
    return getattr(layer, "attention_type", "full_attention") == "sliding_attention"


def sliding_window(layer, config) -> int | None:
    """The window of a sliding-window decoder layer (a query sees itself and the window - 1 tokens before it)."""
    return config.sliding_window if is_sliding(layer) else None


def get_path(obj, dotted: str):
    return reduce(getattr, dotted.split("."), obj)


def decoder_layers(model) -> list:
    """The decoder layers of a causal LM, in order."""
    return list(get_path(model, adapter_for(model.config).layers))
