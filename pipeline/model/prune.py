"""Physically remove attention and MLP sublayers from a causal LM, and rebuild that structure on reload.

A dropped sublayer is gone from the module tree (so from the state dict, safetensors and ONNX), not
zeroed. Kept attention modules get KV-cache slots 0..K-1: transformers' cache sizes masks from slot 0
and counts slots, so an empty slot for a dropped layer silently shifts decode positions under padding.
The drop lists live in `config.slimformer_drop` so a saved folder reloads to the same structure.
Models mixing sliding-window and full layers: transformers types cache slot k by `config.layer_types[k]`,
which renumbered slots no longer follow, so such a pruned model generates with a plain dynamic cache (right
for every kind: the mask applies the window); `kv_cache` builds one typed slot by slot.
"""

from __future__ import annotations

import copy
from functools import cache

from .adapters import adapter_for, decoder_layers, is_sliding

CONFIG_KEY = "slimformer_drop"


class _PrunableLayerMixin:
    """Forward of a decoder layer whose attention sublayer or MLP sublayer (each with its norms) may be None.

    Mixed into the architecture's own decoder-layer class so that transformers' output recorders, which select
    modules by isinstance, keep working on pruned layers. Attribute names come from the class's adapter row.
    """

    _slimformer_adapter = None  # set on each generated class by _prunable_class

    def forward(self, hidden_states, **kwargs):
        ad = self._slimformer_adapter
        position_embeddings = ad.layer_rope(self, kwargs)
        if getattr(self, ad.attention) is not None:
            attn_out = getattr(self, ad.attention)(
                hidden_states=getattr(self, ad.attention_norm)(hidden_states),
                position_embeddings=position_embeddings, **kwargs)[0]
            hidden_states = hidden_states + _post(self, ad.attention_post_norm, attn_out)
        if getattr(self, ad.mlp) is not None:
            mlp_out = getattr(self, ad.mlp)(getattr(self, ad.mlp_norm)(hidden_states))
            hidden_states = hidden_states + _post(self, ad.mlp_post_norm, mlp_out)
        return (hidden_states,) if ad.layer_returns_tuple else hidden_states


def _post(layer, norm: str | None, x):
    return x if norm is None else getattr(layer, norm)(x)


@cache
def _prunable_class(layer_cls: type, adapter) -> type:
    return type(f"Prunable{layer_cls.__name__}", (_PrunableLayerMixin, layer_cls), {"_slimformer_adapter": adapter})


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
            layer.__class__ = _prunable_class(type(layer), ad)
        # transformers' output recorders restore a patched forward as an instance attribute, which
        # would shadow the class's forward after any call with output_hidden_states=True.
        layer.__dict__.pop("forward", None)
        for part in (ad.attention_parts if i in attention else ()) + (ad.mlp_parts if i in mlp else ()):
            setattr(layer, part, None)
    slot = 0
    for layer in layers:
        attn = getattr(layer, ad.attention)
        if attn is not None:
            attn.layer_idx = slot
            slot += 1
    setattr(model.config, CONFIG_KEY, {"attention": attention, "mlp": mlp})
    kinds = getattr(model.config, "layer_types", None)
    if kinds and slot_kinds(model) != kinds[:slot]:
        model.generation_config.cache_implementation = "dynamic_full"
    return model


def slot_kinds(model) -> list[str]:
    """The attention kind of each KV slot (kept attention layer, in order)."""
    layers = decoder_layers(model)
    return ["sliding_attention" if is_sliding(layers[i]) else "full_attention" for i in kept_attention_layers(model)]


def kv_config(model):
    """A copy of the model's config describing its KV cache: one layer per slot, with that slot's kind."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(kept_attention_layers(model))
    if getattr(config, "layer_types", None):
        config.layer_types = slot_kinds(model)
    return config


def kv_cache(model):
    """An empty transformers DynamicCache laid out for the model's slots (sliding ones keep only their window).
    To generate with it, pass `cache_implementation=None` too when the model's generation config names one."""
    from transformers import DynamicCache

    return DynamicCache(config=kv_config(model))


def drop_sublayers(model, attention: list[int], mlp: list[int]):
    """A pruned deep copy of `model`; the input is left untouched."""
    return drop_sublayers_inplace(copy.deepcopy(model), attention, mlp)


def restore_structure_inplace(model):
    """After `from_pretrained` of a pruned folder, re-drop the recorded sublayers (their weights were
    absent, so transformers initialised them randomly) and cut head-pruned attention back to its kept heads
    (the caller loads their saved tensors: `loading.load_hf_folder`)."""
    from .prune_heads import restore_heads_inplace

    recorded = drop_lists(model)
    if recorded["attention"] or recorded["mlp"]:
        drop_sublayers_inplace(model, recorded["attention"], recorded["mlp"])
    return restore_heads_inplace(model)
