"""Human-facing output of the head analysis: heat maps (layers x heads, heads.png) and a markdown section.

Reads HeadScores (and a HeadPlan when heads were removed); no measurement happens here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifacts import HeadPlan, HeadScores

# What the section says about the metric; the module docstring of pipeline.model.heads gives the full reason.
WHY_COSINE = ("Importance of a head is the paper's cosine form applied to one head: the mean over calibration tokens "
              "of 1 - cos(Y, Y with the head's output zeroed), Y = X + Attn(Norm(X)); a KV group zeroes all its "
              "query heads. Zeroing every head gives the sublayer's own score, so heads, groups and sublayers share "
              "one scale. It takes one forward pass; the loss change per zeroed head would take a pass per head "
              "(or gradients through the model).")
LOCAL_TOKENS = 4.0  # a head whose mean attention distance is below this looks at the last few tokens
SINK_SHARE = 0.5  # a head that puts more than this on the window's first token is mostly an attention sink


def _grid(rows: tuple[tuple[float, ...], ...]) -> np.ndarray:
    """[layers, max heads] with NaN where a layer has fewer heads (or none)."""
    width = max((len(r) for r in rows), default=0)
    return np.array([list(r) + [np.nan] * (width - len(r)) for r in rows], dtype=float)


def removed_query_heads(scores: HeadScores, plan: HeadPlan | None) -> list[tuple[int, int]]:
    """(layer, query head) of every query head the plan removes, its KV groups' heads included."""
    if plan is None:
        return []
    out = []
    for layer in range(scores.num_layers):
        n_query, n_kv = len(scores.importance[layer]), len(scores.group_importance[layer])
        per_group = n_query // n_kv if n_kv else 0
        groups = set(plan.kv_groups.get(layer, ()))
        out += [(layer, h) for h in range(n_query)
                if h // max(per_group, 1) in groups or h in plan.query_heads.get(layer, ())]
    return out


def plot_heads(scores: HeadScores, plan: HeadPlan | None, path: Path) -> Path:
    """Six heat maps (two rows of three), layers down, heads across: KV-group and head importance (log colour),
    first-token share, mean attention distance, entropy, redundancy. Removed heads and groups are marked x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    panels = [("KV group importance (log)", _grid(scores.group_importance), True),
              ("head importance (log)", _grid(scores.importance), True),
              ("first-token (sink) share", _grid(scores.sink), False),
              (f"mean distance, first token aside (tokens; window {scores.seq_len})", _grid(scores.distance), False),
              ("attention entropy (nats)", _grid(scores.entropy), False),
              ("redundancy: max cosine to another head", _grid(scores.redundancy), False)]
    marks = {0: [(layer, g) for layer, gs in (plan.kv_groups.items() if plan else ()) for g in gs],
             1: removed_query_heads(scores, plan)}
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 3, figsize=(14, 2 * (0.2 * scores.num_layers + 1.6)), dpi=100)
    for i, (ax, (title, grid, log)) in enumerate(zip(axes.flat, panels)):
        positive = grid[np.isfinite(grid) & (grid > 0)]
        norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if log and positive.size else None
        image = ax.imshow(grid, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.08, pad=0.02)
        for layer, col in marks.get(i, []):
            ax.text(col, layer, "x", ha="center", va="center", color="red", fontsize=9, fontweight="bold")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("KV group" if i == 0 else "query head", fontsize=8)
        ax.set_ylabel("layer" if i % 3 == 0 else "", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"Attention heads, {scores.model} ({scores.tokens} calibration tokens); x: removed", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path)
    plt.close(fig)
    return path


def findings(scores: HeadScores) -> list[str]:
    """Plain statements read off the figures: where the least important groups are, how many heads are local,
    sinks or near-duplicates."""
    groups = sorted(((s, layer, g) for layer, gs in enumerate(scores.group_importance) for g, s in enumerate(gs)))
    heads = [(layer, h) for layer, hs in enumerate(scores.importance) for h in range(len(hs))]
    local = [(layer, h) for layer, h in heads if scores.distance[layer][h] < LOCAL_TOKENS]
    sinks = [(layer, h) for layer, h in heads if scores.sink[layer][h] > SINK_SHARE]
    pair = max(((s, layer, i, j) for layer, rows in enumerate(scores.similarity) for i, row in enumerate(rows)
                for j, s in enumerate(row) if j > i), default=None)
    lines = ["- least important KV groups (layer.group: score): "
             + ", ".join(f"{layer}.{g}: {s:.2e}" for s, layer, g in groups[:8]),
             "- most important: " + ", ".join(f"{layer}.{g}: {s:.2e}" for s, layer, g in groups[::-1][:4]),
             f"- {len(local)} of {len(heads)} heads look at the last few tokens (mean distance < {LOCAL_TOKENS:g}, "
             f"first token aside), in layers {_layers(local)}; {len(sinks)} put over {SINK_SHARE:.0%} of their "
             f"attention on the first token (layers {_layers(sinks)})"]
    if pair is not None:
        lines.append(f"- most alike pair: layer {pair[1]}, heads {pair[2]} and {pair[3]} (cosine {pair[0]:.2f}); "
                     f"mean redundancy {np.nanmean(_grid(scores.redundancy)):.2f}")
    return lines


def _layers(units: list[tuple[int, int]]) -> str:
    return ", ".join(str(layer) for layer in sorted({layer for layer, _ in units})) or "none"


def heads_section(scores: HeadScores, plan: HeadPlan | None) -> list[str]:
    lines = ["", "## Attention heads", "", WHY_COSINE, "", *findings(scores)]
    if plan is not None and plan.method != "none":
        kept = [k for k in plan.kv_heads if k]
        lines += ["", f"Removed ({plan.method}): {plan.removed_groups} KV groups"
                  + (f" and {plan.removed_query_heads} more query heads" if plan.removed_query_heads else "")
                  + f"; KV heads kept per layer with attention: {kept} ({sum(kept)} in all).", "",
                  "| layer | KV groups removed | query heads removed | importance of removed groups |",
                  "|---:|---|---|---|"]
        for layer in sorted(set(plan.kv_groups) | set(plan.query_heads)):
            groups = plan.kv_groups.get(layer, ())
            lines.append(f"| {layer} | {list(groups) or ''} | {list(plan.query_heads.get(layer, ())) or ''} | "
                         + ", ".join(f"{scores.group_importance[layer][g]:.2e}" for g in groups) + " |")
    return lines + ["", "![heads](heads.png)"]
