"""Physically remove attention and MLP sublayers from a causal LM, and rebuild that structure on reload.

A dropped sublayer is gone from the module tree (so from the state dict, safetensors and ONNX), not
zeroed. Kept attention modules get KV-cache slots 0..K-1: transformers' cache sizes masks from slot 0
and counts slots, so an empty slot for a dropped layer silently shifts decode positions under padding.
The drop lists live in `config.slimformer_drop` so a saved folder reloads to the same structure.
"""

from __future__ import annotations

import copy
from functools import cache

from .adapters import adapter_for, decoder_layers

CONFIG_KEY = "slimformer_drop"


class _PrunableLayerMixin:
    """Forward of a decoder layer whose attention (with its norm) or MLP (with its norm) may be None.

    Mixed into the architecture's own decoder-layer class so that transformers' output recorders,
    which select modules by isinstance, keep working on pruned layers.
    """

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, cache_position=None, position_embeddings=None, **kwargs):
        if self.self_attn is not None:
            attn_out, _ = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                cache_position=cache_position, position_embeddings=position_embeddings, **kwargs,
            )
            hidden_states = hidden_states + attn_out
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


@cache
def _prunable_class(layer_cls: type) -> type:
    return type(f"Prunable{layer_cls.__name__}", (_PrunableLayerMixin, layer_cls), {})


def drop_lists(model) -> dict[str, list[int]]:
    """The drop lists recorded in a model's config ({'attention': [], 'mlp': []} when unpruned)."""
    recorded = getattr(model.config, CONFIG_KEY, None) or {}
    return {"attention": sorted(recorded.get("attention", [])), "mlp": sorted(recorded.get("mlp", []))}


def kept_attention_layers(model) -> list[int]:
    dropped = set(drop_lists(model)["attention"])
    return [i for i in range(len(decoder_layers(model))) if i not in dropped]


def drop_sublayers_inplace(model, attention: list[int], mlp: list[int]):
    """Remove the listed sublayers (original layer indices) from `model` and renumber KV slots.

    Idempotent with respect to what is already dropped; returns `model` for chaining.
    """
    ad = adapter_for(model.config)
    layers = decoder_layers(model)
    bad = [i for i in [*attention, *mlp] if not 0 <= i < len(layers)]
    if bad:
        raise ValueError(f"layer indices {bad} out of range for a {len(layers)}-layer model")
    already = drop_lists(model)
    attention = sorted(set(attention) | set(already["attention"]))
    mlp = sorted(set(mlp) | set(already["mlp"]))
    for i, layer in enumerate(layers):
        if not isinstance(layer, _PrunableLayerMixin):
            layer.__class__ = _prunable_class(type(layer))
        # transformers' output recorders restore a patched forward as an instance attribute, which
        # would shadow the class's forward after any call with output_hidden_states=True.
        layer.__dict__.pop("forward", None)
        if i in attention:
            setattr(layer, ad.attention, None)
            setattr(layer, ad.attention_norm, None)
        if i in mlp:
            setattr(layer, ad.mlp, None)
            setattr(layer, ad.mlp_norm, None)
    slot = 0
    for layer in layers:
        attn = getattr(layer, ad.attention)
        if attn is not None:
            attn.layer_idx = slot
            slot += 1
    setattr(model.config, CONFIG_KEY, {"attention": attention, "mlp": mlp})
    return model


def drop_sublayers(model, attention: list[int], mlp: list[int]):
    """A pruned deep copy of `model`; the input is left untouched."""
    return drop_sublayers_inplace(copy.deepcopy(model), attention, mlp)


def restore_structure_inplace(model):
    """After `from_pretrained` of a pruned folder, re-drop the recorded sublayers (their weights were
    absent, so transformers initialised them randomly)."""
    recorded = drop_lists(model)
    if recorded["attention"] or recorded["mlp"]:
        drop_sublayers_inplace(model, recorded["attention"], recorded["mlp"])
    return model
