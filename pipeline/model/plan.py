"""Pure planning: importance scores and drop counts in, a drop plan (sublayers), a head plan (KV groups and
query heads) and budget arithmetic out.

No torch here, so every rule (ranking, ties, limits, grouped-attention shapes) is tested with plain numbers.
"""

from __future__ import annotations

from dataclasses import replace

from ..artifacts import DropPlan, HeadPlan, HeadScores, Scores
from ..config.checks import kept_after
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


# ---------------------------------------------------------------- heads

def plan_heads(scores: HeadScores, heads: int | dict[int, list[int]] = 0, query_heads: dict | None = None,
               dropped_attention=()) -> HeadPlan:
    """Which KV groups and query heads to remove. `heads` as a number: the lowest-scoring KV groups over every
    layer whose attention stays, skipping any that would empty a layer or break its grouping; as a mapping:
    layer -> groups. `query_heads`: layer -> query heads (within kept groups). RecipeError names every problem."""
    query_heads = {int(k): list(v) for k, v in (query_heads or {}).items()}
    sizes = {i: (len(scores.importance[i]), len(g)) for i, g in enumerate(scores.group_importance)
             if g and i not in set(dropped_attention)}
    listed = {int(k): list(v) for k, v in heads.items()} if isinstance(heads, dict) else {}
    problems = [f"drop.{field}: layer {layer} has no attention sublayer left (dropped, or out of range)"
                for field, table in (("heads", listed), ("query_heads", query_heads)) for layer in table
                if layer not in sizes]
    if problems:
        raise RecipeError(problems)
    if isinstance(heads, dict):
        groups, method = listed, "per-layer"
    else:
        groups, method = _lowest_groups(scores, sizes, heads, query_heads), "global" if heads else "none"
    for layer in sorted(set(groups) | set(query_heads)):
        try:
            kept_after(*sizes[layer], groups.get(layer, []), query_heads.get(layer, []))
        except ValueError as e:
            problems.append(f"drop.heads / drop.query_heads, layer {layer}: {e}")
    if problems:
        raise RecipeError(problems)
    order = sorted(((layer, g, scores.group_importance[layer][g]) for layer, gs in groups.items() for g in gs),
                   key=lambda u: (u[2], -u[0]))
    kv_heads = tuple(sizes[i][1] - len(groups.get(i, [])) if i in sizes else 0 for i in range(scores.num_layers))
    return HeadPlan(method=method if groups or query_heads else "none",
                    kv_groups={k: tuple(sorted(v)) for k, v in sorted(groups.items()) if v},
                    query_heads={k: tuple(sorted(v)) for k, v in sorted(query_heads.items()) if v},
                    kv_heads=kv_heads, order=tuple(order))


def _lowest_groups(scores: HeadScores, sizes: dict, n: int, query_heads: dict) -> dict[int, list[int]]:
    """The n lowest-scoring KV groups (ties to the deeper layer), skipping those that would leave a layer
    without attention or with uneven groups given its query-head removals."""
    ranked = sorted(((i, g, s) for i in sizes for g, s in enumerate(scores.group_importance[i])),
                    key=lambda u: (u[2], -u[0]))
    chosen: dict[int, list[int]] = {}
    for layer, group, _ in ranked:
        if sum(map(len, chosen.values())) == n:
            break
        try:
            kept_after(*sizes[layer], [*chosen.get(layer, []), group], query_heads.get(layer, []))
        except ValueError:
            continue
        chosen.setdefault(layer, []).append(group)
    found = sum(map(len, chosen.values()))
    if found < n:
        raise RecipeError([f"drop.heads: {n} KV groups requested but only {found} can go while every layer with "
                           "attention keeps at least one (and even groups); lower drop.heads"])
    return chosen
