"""What a night leaves behind: a line in history.jsonl, summary.md and trend.png, in the nightly file's `out`.

history.jsonl gets one `NightReport` per night (appended in one write). summary.md shows the last night (each
recipe's verdict, stage times with the cached ones marked, the side-by-side table against the tagged version)
and the trend of the last nights; trend.png plots perplexity, file size and decode ms/token per night for every
recipe and variant. Both are written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..artifacts import NightReport, RecipeNight
from .compare import LIMITS

TREND_NIGHTS = 14


def write_night(night: NightReport, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "history.jsonl", "a") as f:
        f.write(json.dumps(night.to_json()) + "\n")
    history = read_history(out / "history.jsonl")
    _replace(out / "trend.png", lambda tmp: plot_trend(history, tmp))
    _replace(out / "summary.md", lambda tmp: tmp.write_text(summary(night, history)))
    return out / "summary.md"


def read_history(path: Path) -> list[NightReport]:
    return [NightReport.from_json(json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]


def _replace(path: Path, write) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def summary(night: NightReport, history: list[NightReport]) -> str:
    lines = [f"# Nightly {night.started_utc}", "",
             f"Registry `{night.registry}`, tag `{night.tag}`; wall time {night.wall_seconds:.0f} s"
             + (f"; Ray: {night.ray}" if night.ray else "") + ".", "",
             "| recipe | status | version | compared with | run s | compare s |", "|---|---|---|---|---:|---:|"]
    for r in night.recipes:
        lines.append(f"| {r.name} | {r.status} | {r.version or ''} | {r.previous or '(none)'} | "
                     f"{sum(r.stage_seconds.values()):.0f} | {r.compare_seconds:.0f} |")
    for r in night.recipes:
        lines += ["", *recipe_section(r)]
    lines += ["", f"## Trend (last {TREND_NIGHTS} nights)", "", "![trend](trend.png)", "", *trend_table(history)]
    return "\n".join(lines) + "\n"


def recipe_section(r: RecipeNight) -> list[str]:
    lines = [f"## {r.name} ({r.recipe}): {r.status}", ""]
    if r.error:
        lines += ["```", r.error.strip(), "```", ""]
    if r.stage_seconds:
        cached = set(r.cached_stages)
        lines += ["Stage seconds (cached: output reused from the stage cache): "
                  + ", ".join(f"{s} {t:.1f}" + (" (cached)" if s in cached else "") for s, t in r.stage_seconds.items())
                  + ("; also cached: " + ", ".join(c for c in r.cached_stages if c not in r.stage_seconds)
                     if any(c not in r.stage_seconds for c in r.cached_stages) else ""), ""]
    if r.side_by_side:
        crossed = {(g.variant, g.figure) for g in r.regressions}
        lines += [f"Side by side with {r.previous} (same tokens, same process; latency interleaved):", "",
                  "| variant | figure | previous | new | verdict |", "|---|---|---:|---:|---|"]
        for row in r.side_by_side:
            for figure, _ in LIMITS.values():
                verdict = ("identical file" if row.identical else
                           "**limit crossed**" if (row.variant, figure) in crossed else "within limit")
                lines.append(f"| {row.variant} | {figure} | {row.previous[figure]:.4g} | {row.new[figure]:.4g} | "
                             f"{verdict} |")
    elif r.status != "failed":
        lines.append("No version under the tag yet: nothing to compare with.")
    return lines


def trend_points(history: list[NightReport]) -> dict[str, list[tuple[str, dict]]]:
    """'recipe/variant' -> [(night, {perplexity, file_mb, decode_ms}), ...] over the last nights."""
    series = {}
    for night in history[-TREND_NIGHTS:]:
        for r in night.recipes:
            for variant, f in r.figures.items():
                series.setdefault(f"{r.name}/{variant}", []).append(
                    (night.started_utc, {"perplexity": f.perplexity, "file_mb": f.file_mb,
                                         "decode_ms": f.decode_ms.get("host", float("nan"))}))
    return series


def trend_table(history: list[NightReport]) -> list[str]:
    lines = ["| night | recipe/variant | perplexity | file MB | decode ms/token |", "|---|---|---:|---:|---:|"]
    for label, points in trend_points(history).items():
        lines += [f"| {night} | {label} | {p['perplexity']:.3f} | {p['file_mb']:.1f} | {p['decode_ms']:.2f} |"
                  for night, p in points]
    return lines


def plot_trend(history: list[NightReport], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nights = [n.started_utc for n in history[-TREND_NIGHTS:]]
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for ax, (key, label) in zip(axes, (("perplexity", "held-out perplexity"), ("file_mb", "file MB"),
                                       ("decode_ms", "decode ms/token p50"))):
        for series, points in trend_points(history).items():
            ax.plot([nights.index(n) for n, _ in points], [p[key] for _, p in points], marker="o", label=series)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[-1].set_xticks(range(len(nights)), [n[:16] for n in nights], rotation=30, ha="right", fontsize=8)
    axes[0].set_title("slimformer nightly: per night, recipe and variant")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)
    plt.close(fig)
