"""Physically remove attention heads: whole KV groups (a key/value head and its query heads) or query heads
within a group, and rebuild that structure on reload.

The q/k/v projections lose the removed heads' rows and o_proj their columns, so the weights, the KV cache of
that layer and every exported graph shrink. Grouped attention repeats each KV head for a fixed number of query
heads (`num_key_value_groups`, read by transformers' eager and sdpa kernels from the module), so every kept
group of a layer must keep the same number of query heads; the module's own attributes are updated to its new
sizes. The kept heads (original numbering) live in `config.slimformer_heads` so a saved folder reloads alike.
"""

from __future__ import annotations

import copy

from .adapters import adapter_for, decoder_layers
from ..config.checks import kept_after

CONFIG_KEY = "slimformer_heads"
HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads")  # set where an architecture's module keeps them
KV_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads")


def _attention_modules(model) -> list:
    ad = adapter_for(model.config)
    return [getattr(layer, ad.attention, None) for layer in decoder_layers(model)]


def kv_heads_per_layer(model) -> list[int]:
    """KV heads of every decoder layer (0 where the attention sublayer is dropped)."""
    ad = adapter_for(model.config)
    return [0 if a is None else getattr(a, ad.k_proj).out_features // a.head_dim for a in _attention_modules(model)]


def query_heads_per_layer(model) -> list[int]:
    ad = adapter_for(model.config)
    return [0 if a is None else getattr(a, ad.q_proj).out_features // a.head_dim for a in _attention_modules(model)]


def kept_heads(model) -> dict[int, dict[str, list[int]]]:
    """The record of head-pruned layers: {layer: {'query': kept query heads, 'kv': kept KV heads}}, original
    numbering; layers absent from it keep every head."""
    recorded = getattr(model.config, CONFIG_KEY, None) or {}
    return {int(layer): {"query": list(v["query"]), "kv": list(v["kv"])} for layer, v in recorded.items()}


def _rows(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def _shrink(linear, rows: list[int] | None = None, cols: list[int] | None = None) -> None:
    """Keep only `rows` (outputs) or `cols` (inputs) of an nn.Linear, in place: the module object stays, so
    its name, hooks and parent are untouched."""
    import torch

    with torch.no_grad():
        if rows is not None:
            index = torch.tensor(rows, device=linear.weight.device)
            linear.weight = torch.nn.Parameter(linear.weight.index_select(0, index).clone())
            if linear.bias is not None:
                linear.bias = torch.nn.Parameter(linear.bias.index_select(0, index).clone())
            linear.out_features = len(rows)
        if cols is not None:
            index = torch.tensor(cols, device=linear.weight.device)
            linear.weight = torch.nn.Parameter(linear.weight.index_select(1, index).clone())
            linear.in_features = len(cols)


def _prune_attention(attn, ad, query: list[int], kv: list[int]) -> None:
    """Keep query heads `query` and KV heads `kv` (current numbering, already checked) of one module."""
    hd = attn.head_dim
    _shrink(getattr(attn, ad.q_proj), rows=_rows(query, hd))
    _shrink(getattr(attn, ad.k_proj), rows=_rows(kv, hd))
    _shrink(getattr(attn, ad.v_proj), rows=_rows(kv, hd))
    _shrink(getattr(attn, ad.o_proj), cols=_rows(query, hd))
    attn.num_key_value_groups = len(query) // len(kv)
    for names, value in ((HEAD_COUNT_ATTRS, len(query)), (KV_COUNT_ATTRS, len(kv))):
        for name in names:
            if isinstance(getattr(attn, name, None), int):
                setattr(attn, name, value)


def prune_heads_inplace(model, kv_groups: dict[int, list[int]], query_heads: dict[int, list[int]] | None = None):
    """Remove KV groups and query heads, both keyed by decoder layer, in the model's current numbering.

    The record in config keeps original numbering, so pruning twice composes. Returns `model`.
    """
    ad = adapter_for(model.config)
    query_heads = query_heads or {}
    attns = _attention_modules(model)
    sizes = dict(enumerate(zip(query_heads_per_layer(model), kv_heads_per_layer(model))))
    record = kept_heads(model)
    plans = {}
    for layer in sorted(set(kv_groups) | set(query_heads)):
        if sizes.get(layer, (0, 0))[1] == 0:
            raise ValueError(f"layer {layer} has no attention sublayer to prune heads from")
        try:
            plans[layer] = kept_after(*sizes[layer], list(kv_groups.get(layer, ())), list(query_heads.get(layer, ())))
        except ValueError as e:
            raise ValueError(f"layer {layer}: {e}") from None
    for layer, (query, kv) in plans.items():
        _prune_attention(attns[layer], ad, query, kv)
        n_query, n_kv = sizes[layer]
        before = record.get(layer, {"query": list(range(n_query)), "kv": list(range(n_kv))})
        record[layer] = {"query": [before["query"][h] for h in query], "kv": [before["kv"][g] for g in kv]}
    setattr(model.config, CONFIG_KEY, {str(k): v for k, v in sorted(record.items())} or None)
    return model


def prune_heads(model, kv_groups: dict[int, list[int]], query_heads: dict[int, list[int]] | None = None):
    """A head-pruned deep copy of `model`; the input is left untouched."""
    return prune_heads_inplace(copy.deepcopy(model), kv_groups, query_heads)


def restore_heads_inplace(model):
    """After `from_pretrained` of a head-pruned folder (full-size attention built from config), cut every
    recorded layer back to its kept heads; the caller then loads the saved (smaller) tensors into them."""
    ad = adapter_for(model.config)
    attns, sizes = _attention_modules(model), list(zip(query_heads_per_layer(model), kv_heads_per_layer(model)))
    for layer, kept in kept_heads(model).items():
        # a layer already at its kept sizes was restored before (or saved unpruned): nothing to cut
        if attns[layer] is not None and sizes[layer] != (len(kept["query"]), len(kept["kv"])):
            _prune_attention(attns[layer], ad, kept["query"], kept["kv"])
    return model
