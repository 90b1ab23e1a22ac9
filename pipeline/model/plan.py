"""Pure planning: importance scores and drop counts in, a drop plan and budget arithmetic out.

No torch here, so every rule (ranking, ties, limits) is tested with plain numbers.
"""

from __future__ import annotations

from dataclasses import replace

from ..artifacts import DropPlan, Scores
from ..errors import RecipeError


def _lowest(scores: list[tuple[str, int, float]], n: int) -> list[tuple[str, int, float]]:
    # Ties go to the deeper layer: the paper finds deep sublayers the most redundant.
    return sorted(scores, key=lambda s: (s[2], -s[1]))[:n]


def plan_drop(scores: Scores, joint: int = 0, attention: int = 0, mlp: int = 0, blocks: int = 0) -> DropPlan:
    """One-shot plan: drop the n lowest-scoring units of the requested kind(s). A plan always keeps at least
    one attention sublayer: under joint ranking the last one is skipped for the next-lowest MLP."""
    n_layers = scores.num_layers
    attn = [("attention", i, s) for i, s in enumerate(scores.attention)]
    ffn = [("mlp", i, s) for i, s in enumerate(scores.mlp)]
    if max(attention, mlp, blocks) >= n_layers or joint >= 2 * n_layers:
        raise RecipeError([f"drop: the counts ({dict(joint=joint, attention=attention, mlp=mlp, blocks=blocks)}) "
                           f"would leave nothing of a {n_layers}-layer model; at least one of each kind must stay"])
    if joint:
        ranked = _lowest(attn + ffn, 2 * n_layers)
        last_attention = max(i for i, (kind, *_) in enumerate(ranked) if kind == "attention")
        order, method = [u for i, u in enumerate(ranked) if i != last_attention][:joint], "joint"
    elif blocks:
        order, method = _lowest([("block", i, s) for i, s in enumerate(scores.block)], blocks), "blocks"
    else:
        order = _lowest(attn, attention) + _lowest(ffn, mlp)
        method = "+".join(k for k, v in (("attention", attention), ("mlp", mlp)) if v) or "none"
    drop_attn = sorted(i for k, i, _ in order if k in ("attention", "block"))
    drop_mlp = sorted(i for k, i, _ in order if k in ("mlp", "block"))
    return DropPlan(method=method, attention=tuple(drop_attn), mlp=tuple(drop_mlp), num_layers=n_layers,
                    order=tuple((k, i, round(s, 8)) for k, i, s in order))


def kv_bytes_per_token(attention_layers: int, kv_heads: int, head_dim: int, bytes_per_value: int = 4) -> int:
    """KV cache bytes for one token at batch 1: a key and a value per kept attention layer."""
    return 2 * attention_layers * kv_heads * head_dim * bytes_per_value


def plan_window(scores: Scores, drop: DropPlan, layers: int | list[int], size: int) -> DropPlan:
    """`drop` with the layers to convert to sliding-window attention and their fitted sinks: the given indices,
    or the `layers` kept attention sublayers whose windowing changes the model least (scores.window_kl);
    ties go to the deeper layer."""
    kept = [i for i in range(drop.num_layers) if i not in drop.attention]
    if len(scores.window_kl) != drop.num_layers or scores.window_size != size:
        raise ValueError(f"scores carry no window measurement for size {size}; score with the recipe's window")
    if isinstance(layers, list):
        gone = sorted(set(layers) - set(kept))
        if gone:
            raise RecipeError([f"drop.window.layers: layers {gone} have no attention after the drop "
                               f"({list(drop.attention)}); name kept layers or give a count"])
        chosen = sorted(layers)
    else:
        if layers > len(kept):
            raise RecipeError([f"drop.window.layers: {layers} requested but only {len(kept)} attention layers "
                               "are kept after the drop"])
        chosen = sorted(sorted(kept, key=lambda i: (scores.window_kl[i], -i))[:layers])
    return replace(drop, window=tuple(chosen), window_size=size,
                   window_sinks={i: tuple(scores.window_sinks[i]) for i in chosen if i in scores.window_sinks})
