"""Linear groups: the units a quantised model chooses a weight format for.

A kept attention sublayer has `layers.{i}.qkv` (q, k and v projections, fused into one matmul) and
`layers.{i}.o`; a kept MLP has `layers.{i}.gate_up` (fused) and `layers.{i}.down`; the model has `embedding`
(which is also the logits projection when the table is tied) and, untied, `lm_head`. The fused exporter, the
fake quantisation used by the budget search and the cost model all name groups this way.
"""

from __future__ import annotations

from .adapters import adapter_for, get_path


def linear_groups(model) -> dict[str, list[tuple[str, object]]]:
    """Group name -> [(parameter-path prefix, nn.Linear or nn.Embedding), ...] in fused row order."""
    ad = adapter_for(model.config)
    groups = {}
    for i, layer in enumerate(get_path(model, ad.layers)):
        attn, mlp = getattr(layer, ad.attention), getattr(layer, ad.mlp)
        if attn is not None:
            base = f"{ad.layers}.{i}.{ad.attention}"
            groups[f"layers.{i}.qkv"] = [(f"{base}.{n}", getattr(attn, n)) for n in (ad.q_proj, ad.k_proj, ad.v_proj)]
            groups[f"layers.{i}.o"] = [(f"{base}.{ad.o_proj}", getattr(attn, ad.o_proj))]
        if mlp is not None:
            base = f"{ad.layers}.{i}.{ad.mlp}"
            groups[f"layers.{i}.gate_up"] = [(f"{base}.{n}", getattr(mlp, n)) for n in (ad.gate_proj, ad.up_proj)]
            groups[f"layers.{i}.down"] = [(f"{base}.{ad.down_proj}", getattr(mlp, ad.down_proj))]
    embed, head = get_path(model, ad.embed), get_path(model, ad.lm_head)
    groups["embedding"] = [(ad.embed, embed)]
    if head.weight.data_ptr() != embed.weight.data_ptr():
        groups["lm_head"] = [(ad.lm_head, head)]
    return groups


def tied(model) -> bool:
    return "lm_head" not in linear_groups(model)
