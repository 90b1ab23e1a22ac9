"""What a budgeted run writes for each chosen model, and the ladder: the chosen structure exported as a fused file
with exactly the weights the search scored, its predicted and measured footprint (`budget.json`), and
`ladder.json`, the rungs ordered from most to least capable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import picker
from .artifacts import BudgetChoice, DropPlan, Ladder, LadderRung, ModelFigures, Report
from .config.recipe import Recipe, ValidateSpec
from .model.space import Candidate, Space


def drop_plan(space: Space, c: Candidate) -> DropPlan:
    n = space.info.num_layers
    return DropPlan(method="budget", attention=tuple(i for i in range(n) if not c.attention[i]),
                    mlp=tuple(i for i in range(n) if not c.mlp[i]), num_layers=n)


def structure_weights(structure, evaluator):
    """The quantizer that gives each group of `structure` the BlockQuant the search scored (the evaluator's,
    same object): for the export, and for fake quantisation of the parity reference."""
    formats = structure.formats

    def quantize(name, parts, params):
        return evaluator.quantized(name, formats[name]) if formats.get(name) is not None else None
    return quantize


def export_structure(pruned, structure, evaluator, recipe: Recipe, out: Path, tokenizer=None) -> Path:
    """A structure as a fused file (`pruned` has its sublayers) holding exactly the weights the search judged."""
    from .export.fused import export_fused

    path = export_fused(pruned, out, structure_weights(structure, evaluator), recipe.budget.search.accuracy_level,
                        recipe.export.opset, kv_dtype=structure.kv_dtype, max_length=recipe.export.max_length).path
    if tokenizer is not None:
        pruned.config.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return path


def export_choice(pruned, space: Space, c: Candidate, evaluator, recipe: Recipe, tokenizer, out: Path) -> Path:
    return export_structure(pruned, space.structure(c), evaluator, recipe, out, tokenizer)


def measured_footprint(recipe: Recipe, path: Path, workdir: Path) -> dict:
    """Peak RSS and decode ms per token of the file under the memory protocol at the budget's context."""
    import numpy as np

    from .measure.footprint import resolve_target
    from .measure.transports import run_on_target

    target = resolve_target(recipe.budget.target, recipe.validate_.targets)
    inputs = workdir / "empty.npz"
    np.savez(inputs)
    result = run_on_target(target, path, inputs, workdir, recipe.validate_.latency.threads,
                           ["--memory-context", str(recipe.budget.context)])
    return {"memory_mb": result["memory"]["peak_rss_mb"], "decode_ms": result["memory"]["decode_ms_p50"]}


def choice(recipe: Recipe, name: str, limits, space: Space, c: Candidate, kl: float, path: Path,
           measured: dict, compared: dict[str, float] | None = None) -> BudgetChoice:
    from .measure.validate import file_mb

    s, fp, st = recipe.budget.search, space.footprint(c), space.structure(c)
    plan = drop_plan(space, c)
    return BudgetChoice(
        name=name, limits=limits.limits(), binding=tuple(space.binding(c, limits.limits())),
        attention_dropped=plan.attention, mlp_dropped=plan.mlp,
        formats={g: f.name for g, f in st.formats.items()}, kv_cache=space.kv[c.kv], algorithm=s.algorithms,
        grid=", ".join(s.grids), context=recipe.budget.context, target=recipe.budget.target, kl=kl,
        predicted={"file_mb": fp.file_mb, "memory_mb": fp.memory_mb, "decode_ms": fp.decode_ms,
                   "kv_kb_per_token": fp.kv_kb_per_token},
        measured={"file_mb": file_mb(path), **measured}, model=recipe.model.key, compared=compared or {})


def gates_with_floor(spec: ValidateSpec, name: str, floor: float | None) -> ValidateSpec:
    """The validation settings with the budget's accuracy floor as the variant's perplexity gate."""
    if floor is None:
        return spec
    from .config.recipe import GateOverride

    override = spec.variant_gates.get(name) or GateOverride()
    merged = GateOverride(**{**override.model_dump(), "max_perplexity_increase_pct": floor})
    return spec.model_copy(update={"variant_gates": {**spec.variant_gates, name: merged}})


@dataclass(frozen=True)
class RungSource:
    """Where a rung's model came from: its source model (key, description), that model's target calibration,
    and the held-out windows its perplexity was measured on, with their tokenizer (for bits per byte)."""

    key: str
    description: str
    calibration: object
    tokenizer: object
    windows: object


def ladder(recipe: Recipe, reports: dict[str, Report], folders: dict[str, Path], root: Path,
           sources: dict[str, RungSource]) -> Ladder:
    """ladder.json's record: one rung per report, most accurate (fewest held-out bits per byte) first."""
    from .model.corpus import bits_per_byte

    rungs, models = [], {}
    for name, report in reports.items():
        figures: ModelFigures = report.validation.models[name]
        original = report.validation.models["original"]
        b, src = report.budget, sources[name]
        models[src.key] = {"description": src.description, "original_perplexity": original.perplexity,
                           "original_bits_per_byte": bits_per_byte(original.perplexity, src.tokenizer, src.windows)}
        files = {"onnx": str((folders[name] / f"onnx-{name}" / "model.onnx").relative_to(root))}
        for kind, packages in (("genai", report.packages.genai), ("ort", report.packages.ort)):
            if name in packages:
                files[kind] = str(Path(packages[name].path).relative_to(root))
        rungs.append(LadderRung(
            name=name, files=files, file_mb=figures.file_mb, memory_mb=b.measured["memory_mb"],
            predicted_memory_mb=b.predicted["memory_mb"], kv_kb_per_token=figures.kv_kb_per_token,
            kv_factor=src.calibration.memory[b.kv_cache].get("kv_mib") if src.calibration is not None else None,
            decode_ms=b.measured["decode_ms"], perplexity=figures.perplexity,
            perplexity_increase_pct=100 * (figures.perplexity / original.perplexity - 1),
            mc_accuracy=figures.mc_accuracy, limits=b.limits, passed=report.passed, model=src.key,
            bits_per_byte=bits_per_byte(figures.perplexity, src.tokenizer, src.windows)))
    rungs = sorted(rungs, key=lambda r: r.bits_per_byte)
    context = recipe.budget.context
    rungs = [replace(r, dominated_by=next((o.name for o in rungs if dominates(o, r, context)), None)) for r in rungs]
    return Ladder(models=models, context=context, target=recipe.budget.target, rungs=tuple(rungs))


def dominates(a: LadderRung, b: LadderRung, context: int) -> bool:
    """Whether `a` is at least as good as `b` in everything an app weighs (file, memory at any context, decode
    time, held-out bits per byte) and better in something: then `b` is never worth loading. Memory is linear in the
    context, so being no larger both at the ladder's context and with an empty cache covers every context."""
    def figures(r: LadderRung):
        empty = picker.memory_at(asdict(r), {"context": context}, 0)  # the picker's own rule, its default factor
        return r.file_mb, r.memory_mb, empty, r.decode_ms, r.bits_per_byte
    pairs = list(zip(figures(a), figures(b)))
    return a.name != b.name and all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)


def ladder_markdown(lad: Ladder, plots: list[str]) -> str:
    """report.md of a ladder run; `plots`: the Pareto plots of the source models (paths in the run folder)."""
    several = len(lad.models) > 1
    originals = "; ".join(f"{k} {m['original_perplexity']:.3f}, {m['original_bits_per_byte']:.4f} bits per byte"
                          for k, m in lad.models.items())
    lines = [f"# Model ladder: {'; '.join(m['description'] for m in lad.models.values())}", "",
             f"Most capable (fewest held-out bits per byte) first. Memory: peak RSS of a process that loads the rung, "
             f"prefills {lad.context} tokens and decodes, on {lad.target}; perplexity and bits per byte on the "
             f"held-out text (original: {originals}).", "",
             f"| rung |{' model |' if several else ''} file MB | memory MB (predicted) | KV KB/token | decode ms/token "
             "| perplexity | vs original | bits per byte | MC accuracy | limits | gates |",
             f"|---|{'---|' if several else ''}---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in lad.rungs:
        predicted = f" ({r.predicted_memory_mb:.0f})" if r.predicted_memory_mb is not None else ""
        limits = ", ".join(f"{k.removeprefix('max_')} {v:g}" for k, v in r.limits.items()) or "none"
        lines.append(f"| {r.name} |{f' {r.model} |' if several else ''} {r.file_mb:.1f} | {r.memory_mb:.0f}{predicted} | "
                     f"{r.kv_kb_per_token:.1f} | {r.decode_ms:.1f} | {r.perplexity:.3f} | {r.perplexity_increase_pct:+.1f} % "
                     f"| {r.bits_per_byte:.4f} | {r.mc_accuracy:.3f} | {limits} | {'passed' if r.passed else 'FAILED'} |")
    lines += [f"- {r.name} is dominated by {r.dominated_by} (as accurate, small and fast at every context): the "
              "picker never loads it." for r in lad.rungs if r.dominated_by]
    return "\n".join(lines + [""] + [f"![pareto]({p})" for p in plots] + [""])
