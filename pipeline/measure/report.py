"""Human-facing output of a run: the importance plot (PNG) and report.md, original vs compressed.

Everything here reads typed artifacts (Scores, DropPlan, Report) and writes files; no measurement happens here.
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import (BudgetChoice, DropPlan, Gate, HeadScores, HealSummary, ModelFigures, Packages, Report,
                         Scores, TargetRow)
from ..export.mobile import RING_SLACK


def plot_importance(scores: Scores, plan: DropPlan | None, path: Path) -> Path:
    """Per-layer importance of attention, MLP and whole blocks; dropped sublayers marked with x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = range(scores.num_layers)
    fig, ax = plt.subplots(figsize=(9, 4), dpi=110)
    for kind, style in (("attention", "o-"), ("mlp", "s-"), ("block", "^--")):
        ax.plot(layers, getattr(scores, kind), style, label=kind, markersize=4)
    if plan is not None:
        for kind, dropped, color in (("attention", plan.attention, "C0"), ("mlp", plan.mlp, "C1")):
            if dropped:
                ax.scatter(dropped, [getattr(scores, kind)[i] for i in dropped], marker="x", s=90,
                           color="red", zorder=5, label=f"dropped {kind}")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("importance  1 - cos(X, Y)  (log)")
    ax.set_title(f"Sublayer importance, {scores.model} ({scores.tokens} calibration tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


_ROWS = (
    ("file size (MB)", "file_mb", "{:.1f}"),
    ("parameters (M)", "params_m", "{:.2f}"),
    ("attention layers with KV cache", "kv_layers", "{:d}"),
    ("KV cache per token (KB)", "kv_kb_per_token", "{:.1f}"),
    ("held-out perplexity", "perplexity", "{:.3f}"),
    ("multiple-choice accuracy", "mc_accuracy", "{:.3f}"),
    ("prefill ms", "prefill_ms", "{:.1f}"),
    ("decode ms/token p50", "decode_p50_ms", "{:.2f}"),
    ("decode ms/token p90", "decode_p90_ms", "{:.2f}"),
    ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"),
)


def _fmt(fmt: str, value) -> str:
    return "n/a" if value is None else fmt.format(value)


def _ratio(a, b) -> str:
    return f"{b / a:.3f}x" if a and b is not None else ""


def _variants_table(models: dict[str, ModelFigures]) -> list[str]:
    base = models["original"]
    lines = ["", "## Every variant against the original fp32 model", "",
             "| variant | file MB | KV KB/token | perplexity | MC accuracy | decode ms p50 | decode vs original | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for tag, m in models.items():
        lines.append(f"| {tag} | {m.file_mb:.1f} | {m.kv_kb_per_token:.1f} | {m.perplexity:.3f} | "
                     f"{m.mc_accuracy:.3f} | {m.decode_p50_ms:.2f} | {m.decode_p50_ms / base.decode_p50_ms:.2f}x | "
                     f"{m.peak_rss_mb:.0f} |")
    return lines


def _packages_section(packages: Packages) -> list[str]:
    lines = []
    for name, ort in packages.ort.items():
        parity = ort.parity_vs_onnx
        check = (f"; vs its .onnx: max abs logit diff {parity.max_abs_diff:.2e}, top-1 {parity.top1_agreement:.3f}"
                 if parity else "")
        lines.append(f"- `{ort.path.parent.name}/{ort.path.name}`: .ort for onnxruntime mobile builds ({name}, "
                     f"{ort.bytes / 1e6:.1f} MB); usability: {ort.usable_on_mobile}{check}")
    for name, genai in packages.genai.items():
        problem = genai.tokenizer_problem
        lines.append(f"- `{genai.path.name}/`: onnxruntime-genai folder ({name}); tokenizer: "
                     + (f"**PROBLEM**: {problem}" if problem else "onnxruntime-genai encodes like Hugging Face"))
    for pkg in packages.coreml:
        numerics = pkg.numerics
        lines.append(f"- `coreml/{pkg.path.name}`: {pkg.kv_states} KV states, {pkg.weight_bytes / 1e6:.1f} MB of "
                     f"weights; numerics: {'checked' if numerics and numerics.checked else numerics and numerics.reason}")
    return ["", "## Mobile packages", "", *lines] if lines else []


def targets_section(rows: tuple[TargetRow, ...]) -> list[str]:
    """One row per (variant, target): logits against the pruned PyTorch model and against the host running
    the same file, perplexity against the host on the same windows, latency where timing is real."""
    if not rows:
        return []
    lines = ["", "## Targets", "",
             "| variant | target | core / features | onnxruntime | max abs logit error vs PyTorch | top-1 | "
             "max abs diff vs host | relative | perplexity (host) | diff % | decode ms p50 / p90 | peak RSS MB | "
             "seconds |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        real = r.timing == "real"
        decode = f"{r.decode_p50_ms:.2f} / {r.decode_p90_ms:.2f}" if real and r.decode_p50_ms else r.timing
        rss = f"{r.peak_rss_mb:.0f}" if real and r.peak_rss_mb else "n/a"
        lines.append(f"| {r.variant} | {r.target} | {r.cpu} {'+'.join(r.features or [])} | {r.onnxruntime} | "
                     f"{r.max_abs_logit_error:.2e} | {r.top1_agreement:.3f} | {r.max_abs_diff_vs_host:.2e} | "
                     f"{r.max_rel_diff_vs_host:.2e} | {r.perplexity:.3f} ({r.host_perplexity:.3f}) | "
                     f"{r.perplexity_diff_pct:+.3f} | {decode} | {rss} | {r.seconds:.0f} |")
    lines += ["", f"Perplexity on each target is over the first {rows[0].perplexity_tokens} held-out tokens (fewer "
              "under emulation), compared with the host on the same tokens. Latency under QEMU emulation is "
              "emulation time and not reported; ssh targets time the real device."]
    return lines


def gates_section(gates: tuple[Gate, ...]) -> list[str]:
    return ["", "## Gates", ""] + ([
        f"- {'PASS' if g.passed else 'FAIL'} {g.variant}{' on ' + g.target if g.target else ''} `{g.name}`: "
        f"measured {g.value:.4g}, limit {g.limit:.4g}" for g in gates] or ["No gates set in the recipe."])


def kv_section(orig: ModelFigures, comp: ModelFigures, plan: DropPlan) -> list[str]:
    """KV cache held at several context lengths, original vs compressed (windowed layers hold a ring)."""
    if not orig.kv_bytes_at or not comp.kv_bytes_at:
        return []
    lines = ["", "## KV cache at context length", ""]
    if plan.window:
        lines += [f"Layers {list(plan.window)} attend to their last {plan.window_size} tokens (sliding window); "
                  f"onnxruntime-genai keeps a {plan.window_size + RING_SLACK}-position ring buffer for each"
                  + (", with a learned per-head attention sink." if plan.window_sinks else "."), ""]
    lines += ["| context (tokens) | original MB | compressed MB | compressed / original |", "|---:|---:|---:|---:|"]
    for context, before in sorted(orig.kv_bytes_at.items()):
        after = comp.kv_bytes_at[context]
        lines.append(f"| {context} | {before / 1e6:.1f} | {after / 1e6:.1f} | {after / before:.3f}x |")
    return lines


def heal_section(healing: HealSummary | None, original: ModelFigures) -> list[str]:
    """Before/after healing (PyTorch, the run's held-out data), with the training budget and the curve."""
    if healing is None:
        return []
    h, b, a = healing, healing.before, healing.after

    def pct(x):
        return f"{100 * (x / original.perplexity - 1):+.1f} %"
    return ["", "## Healing", "",
            f"{h.objective} on {h.train}: {h.steps} steps ({h.tokens_seen} tokens from {h.windows} windows) in "
            f"{h.seconds:.0f} s on {h.device} (stopped by {h.stopped_by}), {h.trainable_params:,} trainable "
            f"parameters; loss {h.first_loss:.4f} -> {h.last_loss:.4f}. Healed weights sha256 "
            f"`{(h.weights_sha256 or '?')[:16]}...`.", "",
            "| | original (ONNX) | dropped, before healing | dropped, healed |", "|---|---:|---:|---:|",
            f"| held-out perplexity | {original.perplexity:.3f} | {b.perplexity:.3f} ({pct(b.perplexity)}) | "
            f"{a.perplexity:.3f} ({pct(a.perplexity)}) |",
            f"| multiple-choice accuracy | {original.mc_accuracy:.3f} | {b.mc_accuracy:.3f} | {a.mc_accuracy:.3f} |",
            "", "Before and after are measured in PyTorch on the same held-out windows and items; the table above "
            "measures the healed model's ONNX export.", "", "![heal loss](heal_curve.png)"]


def budget_section(b: BudgetChoice | None) -> list[str]:
    """The chosen model's budget: limits and which bind, the cost model's prediction against the measurement."""
    if b is None:
        return []
    formats = {}
    for f in b.formats.values():
        formats[f] = formats.get(f, 0) + 1
    limits = ", ".join(f"{k} {v:g}" for k, v in b.limits.items()) or "none (the most accurate model in the space)"
    lines = ["", f"## Budget: {b.name}", "", f"Limits: {limits}. Binding (within 2 %): "
             f"{', '.join(b.binding) or 'none'}. Chosen by the search (KL {b.kl:.4f} from the original on "
             f"calibration text): attention dropped {list(b.attention_dropped) or 'none'}, MLP dropped "
             f"{list(b.mlp_dropped) or 'none'}; formats {', '.join(f'{n} x {k}' for k, n in sorted(formats.items()))} "
             f"({b.algorithm}; grid {b.grid} where not the source's blocks); KV cache {b.kv_cache}. Per-group "
             "formats: budget.json.", ""]
    if b.compared:
        lines += [f"Source model: {b.model}, of the candidates' choices for this budget the fewest bits per byte of "
                  f"calibration text ({', '.join(f'{k} {v:.4f}' for k, v in b.compared.items())}).", ""]
    lines += [f"| at {b.context} tokens on {b.target} | predicted | measured | error |", "|---|---:|---:|---:|"]
    for label, key, fmt in (("file MB", "file_mb", "{:.2f}"), ("peak memory MB", "memory_mb", "{:.0f}"),
                            ("decode ms/token", "decode_ms", "{:.1f}")):
        p, m = b.predicted.get(key), b.measured.get(key)
        err = f"{100 * (p / m - 1):+.1f} %" if p is not None and m else ""
        lines.append(f"| {label} | {_fmt(fmt, p)} | {_fmt(fmt, m)} | {err} |")
    lines += ["", "Memory: peak RSS of a process that loads the file, prefills the context in chunks of 128 tokens "
              "and decodes 16 tokens (docs/budget.md). The parity check below compares the file with the pruned "
              "PyTorch model holding the file's own quantised weights, so it measures the export, not the "
              "quantisation. The Pareto plot of every candidate is pareto.png in the run folder."]
    return lines


def _summary(plan, heads) -> str:
    """The report's first line: what the run removed or changed, in the user's terms."""
    parts = []
    if plan.attention or plan.mlp:
        parts.append(f"Dropped by `{plan.method}`: attention sublayers {list(plan.attention) or 'none'}, "
                     f"MLP sublayers {list(plan.mlp) or 'none'} (of {plan.num_layers} layers)")
    else:
        parts.append(f"No sublayer dropped (of {plan.num_layers} layers)")
    if heads and heads.method != "none":
        parts.append(f"{heads.removed_groups} KV groups and {heads.removed_query_heads} further query heads removed "
                     f"(`{heads.method}`, see Attention heads)")
    if plan.window:
        parts.append(f"{len(plan.window)} layers attend to a {plan.window_size}-token sliding window")
    return "; ".join(parts) + "."


def markdown(report: Report, head_scores: HeadScores | None = None) -> str:
    """report.md; with `head_scores`, a section on attention heads (and the heads removed, if any)."""
    from .heads_report import heads_section

    validation, plan, heads = report.validation, report.plan, report.head_plan
    # a budget rung's model is named after the rung rather than "compressed"
    tag = "compressed" if "compressed" in validation.models else next(t for t in validation.models if t != "original")
    orig, comp = validation.models["original"], validation.models[tag]
    lines = [f"# slimformer run: {report.name}", "",
             f"**Verdict: {'PASSED' if report.passed else 'FAILED'}**", "",
             _summary(plan, heads), "",
             f"| | original | {tag} | {tag} / original |", "|---|---:|---:|---:|"]
    for label, key, fmt in _ROWS:
        a, b = getattr(orig, key), getattr(comp, key)
        lines.append(f"| {label} | {_fmt(fmt, a)} | {_fmt(fmt, b)} | {_ratio(a, b)} |")
    lines += kv_section(orig, comp, plan)
    lines += heal_section(report.heal, orig)
    if head_scores is not None:
        lines += heads_section(head_scores, heads)
    lines += budget_section(report.budget)
    if len(validation.models) > 2:
        lines += _variants_table(validation.models)
    lines += _packages_section(report.packages)
    lines += ["", "## ONNX vs the pruned PyTorch model", "",
              "| variant | max abs logit error | mean abs | top-1 agreement |", "|---|---:|---:|---:|"]
    for tag, p in validation.parity.items():
        lines.append(f"| {tag} | {p.max_abs_error:.2e} | {p.mean_abs_error:.2e} | {p.top1_agreement:.3f} |")
    first = next(iter(validation.parity.values()))
    lines += ["", f"Left-padded batch of {first.batch}, prefill + {first.decode_steps} decode steps; every file is "
              "fed the PyTorch model's greedy tokens (teacher forcing), so each step compares logits on the same "
              "context."]
    lines += targets_section(validation.targets)
    lines += gates_section(validation.gates)
    s = validation.settings
    cached = " (the original's read from the baseline cache: same file, tokens and settings)" if orig.accuracy_cached else ""
    lines += ["", "## How this was measured", "",
              f"onnxruntime {s.onnxruntime} on the host CPU, {s.threads} threads. Perplexity: {s.perplexity_tokens} "
              f"held-out tokens; multiple choice: {s.mc_items} items (true next sentence vs 3 from another text, mean "
              f"log-probability; chance 0.25){cached}. Prefill: {s.prefill_tokens} tokens; decode: {s.decode_steps} "
              f"steps with {s.decode_context} tokens cached; every file timed once per round in {s.latency_rounds} "
              "interleaved rounds (median), each in a fresh process whose peak RSS is reported.", "",
              "Stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.stage_seconds.items())
              + f"; wall time {report.wall_seconds:.0f} s.", "", "![importance](importance.png)", ""]
    return "\n".join(lines)
