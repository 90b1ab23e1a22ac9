"""pareto.png: every model the budget search priced, file size against KL (left) and against held-out perplexity
(right), the frontier drawn, the uniform baselines and peers marked, each chosen model starred and each budget's
file limit drawn. Reads the Pareto record only.
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import Pareto

MARKERS = {"uniform int8": ("s", "C2"), "uniform 4-bit": ("^", "C1"), "uniform all 4-bit": ("v", "C3"),
           "peer": ("D", "C4")}


def _kind(label: str) -> str:
    for k in MARKERS:
        if label.startswith(k):
            return k
    return "chosen" if label.startswith("chosen") else "search"


def plot_pareto(p: Pareto, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), dpi=110)
    pts = p.points
    search = [q for q in pts if _kind(q.label) == "search" and q.kl is not None]
    left.scatter([q.file_mb for q in search], [max(q.kl, 1e-6) for q in search], s=8, color="0.7",
                 label=f"searched ({len(search)})")
    front = [pts[i] for i in p.frontier]
    left.plot([q.file_mb for q in front], [max(q.kl, 1e-6) for q in front], "-", color="C0", label="frontier")
    measured = [q for q in front if q.perplexity is not None]
    right.plot([q.file_mb for q in measured], [q.perplexity for q in measured], "o-", color="C0", markersize=4,
               label="frontier (measured points)")
    for kind, (marker, color) in MARKERS.items():
        group = [q for q in pts if _kind(q.label) == kind]
        if group:
            left.scatter([q.file_mb for q in group if q.kl is not None], [max(q.kl, 1e-6) for q in group
                         if q.kl is not None], marker=marker, color=color, label=kind)
            right.scatter([q.file_mb for q in group if q.perplexity], [q.perplexity for q in group if q.perplexity],
                          marker=marker, color=color, label=kind)
    for name, i in p.chosen.items():
        q = pts[i]
        left.scatter([q.file_mb], [max(q.kl or 1e-6, 1e-6)], marker="*", s=220, color="red", zorder=5)
        if q.perplexity:
            right.scatter([q.file_mb], [q.perplexity], marker="*", s=220, color="red", zorder=5)
            right.annotate(name, (q.file_mb, q.perplexity), textcoords="offset points", xytext=(6, 6), fontsize=8)
    for name, limits in p.budgets.items():
        if "max_file_mb" in limits:
            for ax in (left, right):
                ax.axvline(limits["max_file_mb"], color="red", linestyle=":", linewidth=1)
            right.annotate(f"{name} {limits['max_file_mb']:g} MB", (limits["max_file_mb"], p.reference_perplexity),
                           rotation=90, fontsize=7, color="red", va="bottom")
    right.axhline(p.reference_perplexity, color="k", linestyle="--", linewidth=1, label="original (fp32)")
    left.set_yscale("log")
    left.set_ylabel(f"KL from the original ({p.kl_tokens} calibration tokens, log)")
    right.set_ylabel(f"held-out perplexity ({p.heldout_tokens} tokens)")
    for ax in (left, right):
        ax.set_xlabel("file MB")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Budget search: {p.model}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
