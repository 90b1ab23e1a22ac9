"""Every check a recipe and the model's shape allow before any work, in one place.

`recipe_problems(recipe)` needs the recipe alone (files exist, names are unique, targets are ready);
`model_problems(recipe, info)` adds what the model's config reveals (drop limits, Core ML block sizes and
context, tied tables). `check_recipe` raises one RecipeError listing every problem. The pipeline calls it right
after reading the model's config.json or GGUF metadata, before loading weights or scoring.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

from ..artifacts import ModelInfo
from ..errors import RecipeError
from .recipe import Recipe
from .targets import ROOT_MARKER

RESERVED_VARIANTS = ("original", "compressed")


def check_recipe(recipe: Recipe, info: ModelInfo | None = None, extra: list[str] = ()) -> None:
    problems = [*recipe_problems(recipe), *(model_problems(recipe, info) if info is not None else ()), *extra]
    if problems:
        raise RecipeError(problems)


def variant_names(recipe: Recipe) -> list[str]:
    if recipe.budget is not None:
        return [name for name, _ in recipe.budget.rungs()]
    return ["compressed", *(q.name for q in recipe.quantize)]


def recipe_problems(recipe: Recipe) -> list[str]:
    problems = []
    if recipe.heal is not None and recipe.drop.method == "none":
        problems.append("heal: nothing is dropped, so there is nothing to heal; set drop counts or remove heal")
    problems += _file_problems(recipe)
    names = [q.name for q in recipe.quantize]
    for name in sorted({n for n in names if names.count(n) > 1 or n in RESERVED_VARIANTS}):
        problems.append(f"quantize: variant name '{name}' is used twice or reserved; give each variant its own name")
    problems += budget_recipe_problems(recipe)
    gated = variant_names(recipe)[1:] if recipe.budget is None else variant_names(recipe)
    for name in recipe.validate_.variant_gates:
        if name not in gated:
            kind = "budget rung" if recipe.budget is not None else "quantize variant"
            problems.append(f"validate.variant_gates.{name}: no {kind} is named '{name}'; "
                            f"variants: {', '.join(gated) or 'none'}")
    problems += _graph_problems(recipe)
    problems += target_problems(recipe.validate_.targets, variant_names(recipe))
    problems += unready_targets(recipe.validate_.targets)
    return problems


def budget_recipe_problems(recipe: Recipe) -> list[str]:
    """What a budget cannot be combined with, and settings that do not fit the rest of the recipe."""
    b, m = recipe.budget, recipe.model
    keys = [s.key for s in m.sources()]
    problems = [f"model.candidates: '{k}' names two source models (candidates are told apart by packaged name or "
                "file/folder name); list each model once, renaming a folder if two share a name"
                for k in sorted({k for k in keys if keys.count(k) > 1})]
    if b is None:
        return problems + (["model.candidates: only a budgeted run chooses among source models; add a budget "
                            "block or remove the candidates"] if m.candidates else [])
    if recipe.drop.method != "none":
        problems.append("drop: the budget search chooses what to drop; remove the drop counts")
    if recipe.drop.window is not None:
        problems.append("drop.window: the budget search does not place windows; remove drop.window or the budget")
    if recipe.heads is not None:
        problems.append("heads: budgeted runs do not analyse heads; remove the heads block (or the budget)")
    if recipe.quantize:
        problems.append("quantize: the budget search chooses every group's format; remove the quantize entries")
    if recipe.heal is not None:
        problems.append("heal: healing changes the weights the search scored; remove heal or budget")
    if recipe.export.graph != "fused":
        problems.append("export.graph: the budget search writes the fused graph; set export.graph: fused")
    names = [name for name, _ in b.rungs()]
    for name in sorted({n for n in names if names.count(n) > 1 or n in RESERVED_VARIANTS}):
        problems.append(f"budget.ladder: rung name '{name}' is used twice or reserved; give each rung its own name")
    target = next((t for t in recipe.validate_.targets if t.name == b.target), None)
    if target is None and b.target != "host":
        problems.append(f"budget.target: no target is named '{b.target}'; use host or the name of a host or ssh "
                        f"target in validate.targets ({', '.join(t.name for t in recipe.validate_.targets) or 'none'})")
    elif target is not None and target.kind == "arm64-emulated":
        problems.append(f"budget.target: '{b.target}' is emulated, so its memory and timing say nothing about a "
                        "device; use host or an ssh target")
    s, samples = b.search, recipe.calibration.samples
    most = max(s.sensitivity_windows, s.selection[-1].windows)
    if most > samples:
        problems.append(f"budget.search: the selection and sensitivities score {most} calibration windows but "
                        f"calibration.samples is {samples}; raise calibration.samples to at least {most}")
    if s.heldout_windows > recipe.validate_.perplexity_windows:
        problems.append(f"budget.search.heldout_windows: {s.heldout_windows} is more than "
                        f"validate.perplexity_windows ({recipe.validate_.perplexity_windows}); lower it")
    if "hqq" in (s.algorithm, s.table_algorithm) and s.forms != ("offset",) and "form" in s.model_fields_set:
        problems.append("budget.search.form: algorithm hqq fits an offset per block; set form: offset or leave it out")
    return problems


def _graph_problems(recipe: Recipe) -> list[str]:
    """Quantiser options the chosen export graph cannot honour."""
    problems = []
    for q in (q for q in recipe.quantize if q.kind != "onnx-fp16"):
        if recipe.export.graph == "fused" and getattr(q, "method", None) == "dynamic":
            problems.append(f"quantize.{q.name}: method dynamic (quantize_dynamic) rewrites optimum's graph; set "
                            "export.graph: optimum, or use method weight-only")
        if recipe.export.graph == "optimum":
            asked = {"algorithm": q.algorithm != "rtn", "form": q.form == "offset",
                     "eight_bit_groups": q.eight_bit_groups > 0, "source_blocks": q.source_blocks}
            problems += [f"quantize.{q.name}.{field}: {getattr(q, field)} needs export.graph: fused (the optimum "
                         "graph is quantised by onnxruntime's own quantiser, round to nearest)"
                         for field, used in asked.items() if used and field in q.model_fields_set]
    return problems


def path_problem(path) -> str | None:
    """Why `path` is not an existing file or folder, or None; never raises (NUL bytes, over-long names...)."""
    try:
        os.stat(path)
        return None
    except FileNotFoundError:
        return "does not exist"
    except (OSError, ValueError) as e:
        return f"cannot be read ({getattr(e, 'strerror', None) or e})"


def _file_problems(recipe: Recipe) -> list[str]:
    listed = [("model.path", [recipe.model.path] if recipe.model.path is not None else []),
              *((f"model.candidates[{i}].path", [c.path]) for i, c in enumerate(recipe.model.candidates)
                if c.path is not None),
              ("calibration.files", recipe.calibration.files or []),
              ("heal.files", (recipe.heal.files or []) if recipe.heal else []),
              ("validate.files", recipe.validate_.files or []),
              ("validate.distractor_files", recipe.validate_.distractor_files or [])]
    problems = []
    for where, paths in listed:
        for p in paths:
            problem = path_problem(p)
            if problem is None and not where.startswith("model") and not Path(p).is_file():
                problem = "is not a file"
            if problem:
                problems.append(f"{where}: {p} {problem}")
    return problems


def target_problems(targets: list, variants: list[str] | None = None) -> list[str]:
    """Unique target names (they key reports and files) and known variant names."""
    names = [t.name for t in targets]
    problems = [f"validate.targets: name '{n}' is used {names.count(n)} times; give each target its own name"
                for n in sorted(set(names)) if names.count(n) > 1]
    for t in targets:
        for v in t.variant_tolerances if variants is not None else ():
            if v not in variants:
                problems.append(f"validate.targets.{t.name}.variant_tolerances: no variant is named '{v}'; "
                                f"variants: {', '.join(variants)}")
    return problems


def unready_targets(targets: list) -> list[str]:
    """What this machine lacks to run the targets: an emulated target's root, root rights for chroot."""
    problems = []
    for t in targets:
        if t.kind == "arm64-emulated":
            if path_problem(t.resolved_root() / ROOT_MARKER):
                problems.append(f"validate.targets.{t.name}: no arm64 root at {t.resolved_root()}; build it with "
                                "`make arm-root` (about 5 minutes, 450 MB) or set `root:`")
            elif os.geteuid() != 0:
                problems.append(f"validate.targets.{t.name}: the arm64 root is entered with chroot, which needs "
                                "root; run as root or remove the target")
    return problems


def model_problems(recipe: Recipe, info: ModelInfo) -> list[str]:
    return [*_drop_problems(recipe, info), *_head_problems(recipe, info), *_fused_problems(recipe, info),
            *_max_length_problems(recipe, info), *coreml_problems(recipe.export.coreml, info),
            *_tied_table_problems(recipe, info), *_budget_model_problems(recipe, info)]


def _max_length_problems(recipe: Recipe, info: ModelInfo) -> list[str]:
    """export.max_length: above the model's positions, on a graph without rotary caches, below a budget's context."""
    length, b = recipe.export.max_length, recipe.budget
    if length is None:
        return []
    problems = []
    if recipe.export.graph != "fused":
        problems.append("export.max_length: only the fused graph has rotary caches to cap (export.graph is "
                        f"{recipe.export.graph!r}); set export.graph: fused or remove export.max_length")
    if length > info.max_position_embeddings:
        problems.append(f"export.max_length: {length} exceeds the model's max_position_embeddings "
                        f"{info.max_position_embeddings}; use at most {info.max_position_embeddings}")
    if b is not None and b.context + MEMORY_DECODE_STEPS > length:
        problems.append(f"export.max_length: {length} positions cannot hold budget.context {b.context} plus "
                        f"{MEMORY_DECODE_STEPS} decoded tokens; use at least {b.context + MEMORY_DECODE_STEPS}")
    return problems


def _fused_problems(recipe: Recipe, info: ModelInfo) -> list[str]:
    """The fused decoder graph (asked for, or written by the budget search) for an architecture it cannot write."""
    if info.fused_graph:
        return []
    if recipe.budget is not None:
        return [f"budget: budgeted models are written as the fused decoder graph, which has no layout for "
                f"{info.model_type} models; remove the budget block and use drop counts with export.graph: optimum"]
    if recipe.export.graph == "fused":
        return [f"export.graph: fused cannot write {info.model_type} models (the fused decoder graph has no layout "
                "for this architecture); set export: {graph: optimum}"]
    return []


MEMORY_DECODE_STEPS = 16  # the memory protocol decodes this many tokens after the context (ort_runner)


def _budget_model_problems(recipe: Recipe, info: ModelInfo) -> list[str]:
    b = recipe.budget
    if b is None:
        return []
    problems = []
    if b.context + MEMORY_DECODE_STEPS > info.max_position_embeddings:
        problems.append(f"budget.context: {b.context} tokens plus {MEMORY_DECODE_STEPS} decoded exceed the model's "
                        f"max_position_embeddings {info.max_position_embeddings}; use at most "
                        f"{info.max_position_embeddings - MEMORY_DECODE_STEPS}")
    widths = info.linear_input_widths
    if b.search.grids == ("offset",) and not any(all(w % s == 0 for w in widths) for s in b.search.block_sizes):
        problems.append(f"budget.search.block_sizes: the offset grid needs a block size that divides every input "
                        f"width {list(widths)}; add one, such as {math.gcd(*widths) if math.gcd(*widths) >= 16 else 32}")
    return problems


def _drop_problems(recipe: Recipe, info: ModelInfo) -> list[str]:
    d, n = recipe.drop, info.num_layers
    limits = {"attention": (n - 1, "attention sublayers"), "mlp": (n - 1, "MLP sublayers"),
              "blocks": (n - 1, "blocks"), "joint": (2 * n - 1, "sublayers")}
    problems = []
    for kind, (limit, what) in limits.items():
        if getattr(d, kind) > limit:
            problems.append(f"drop.{kind}: {getattr(d, kind)} requested but the model has only {limit + 1} {what} "
                            f"and at least one must stay; use at most {limit}")
    window = d.window
    if window is not None:
        if isinstance(window.layers, int) and window.layers > n:
            problems.append(f"drop.window.layers: {window.layers} requested but the model has {n} attention layers")
        if isinstance(window.layers, list) and max(window.layers) >= n:
            problems.append(f"drop.window.layers: layer {max(window.layers)} does not exist in a {n}-layer model; "
                            f"use indices 0 to {n - 1}")
        if window.size >= info.max_position_embeddings:
            problems.append(f"drop.window.size: {window.size} is not below the model's context "
                            f"({info.max_position_embeddings}), so no layer would attend to fewer tokens")
        if recipe.export.graph != "fused":
            problems.append("drop.window: only the fused graph carries windows and sinks "
                            f"(export.graph is {recipe.export.graph!r}); set export.graph: fused")
        if recipe.export.coreml is not None:
            problems.append("drop.window: Core ML packages do not carry sliding windows; remove export.coreml "
                            "or drop.window")
        if d.prunes_heads:
            problems.append("drop.window: the sinks are fitted per head of the unpruned model, so windows and head "
                            "drops are not combined; remove drop.window or drop.heads / drop.query_heads")
    return problems


def _head_problems(recipe: Recipe, info: ModelInfo) -> list[str]:
    """drop.heads / drop.query_heads against the model's layers, query heads and KV heads (uniform before
    pruning); which layers lose attention is known only after scoring, so the plan re-checks the rest."""
    d, n, kv = recipe.drop, info.num_layers, info.num_kv_heads
    groups = d.heads if isinstance(d.heads, dict) else {}
    problems = [f"drop.{field}: layer {layer} is out of range for a {n}-layer model (layers 0..{n - 1})"
                for field, table in (("heads", groups), ("query_heads", d.query_heads))
                for layer in table if layer >= n]
    if not isinstance(d.heads, dict) and d.heads:
        with_attention = n - d.attention - d.blocks
        limit = max(with_attention, 0) * (kv - 1)
        if d.heads > limit:
            why = (f"this model has one KV head per layer, and removing it removes the attention sublayer (use "
                   "drop.attention)" if kv == 1 else f"{with_attention} layers keep attention, each with {kv} KV "
                   f"groups of which one must stay; use at most {limit}")
            problems.append(f"drop.heads: {d.heads} KV groups requested but {why}")
    for layer in [i for i in sorted({*groups, *d.query_heads}) if i < n]:
        try:
            kept_after(info.num_heads, kv, groups.get(layer, []), d.query_heads.get(layer, []))
        except ValueError as e:
            problems.append(f"drop.heads / drop.query_heads, layer {layer}: {e}")
    return problems


def coreml_problems(spec, info: ModelInfo) -> list[str]:
    """What stops Core ML packages of this model from being written as `spec` (export.coreml) asks."""
    if spec is None:
        return []
    problems = []
    if spec.context_length > info.max_position_embeddings:
        problems.append(f"export.coreml.context_length: {spec.context_length} exceeds the model's "
                        f"max_position_embeddings {info.max_position_embeddings}; use at most "
                        f"{info.max_position_embeddings}")
    widths = info.linear_input_widths
    for c in spec.compression:
        bad = [w for w in widths if c.kind == "linear-int4" and w % c.block_size]
        if bad:
            problems.append(f"export.coreml.compression: linear-int4 block_size {c.block_size} does not divide the "
                            f"input width(s) {bad} of this model's weights (coremltools would silently leave them "
                            f"fp16); use a divisor of {math.gcd(*widths)}, such as 32 or 16")
        if c.kind == "palettize" and c.mode == "kmeans" and not have_sklearn():
            problems.append("export.coreml.compression: palettize mode 'kmeans' needs scikit-learn, which is not "
                            "installed; pip install scikit-learn, or use mode 'uniform'")
    return problems


def have_sklearn() -> bool:
    return importlib.util.find_spec("sklearn") is not None


def _tied_table_problems(recipe: Recipe, info: ModelInfo) -> list[str]:
    return [p for q in recipe.quantize if (p := tied_table_problem(q, info.tie_word_embeddings))]


def tied_table_problem(spec, tied: bool) -> str | None:
    """A quantize entry that would store a tied embedding table twice, or None."""
    if tied and getattr(spec, "quantize_embedding", False) and not spec.quantize_lm_head:
        return (f"quantize.{spec.name}: quantize_embedding without quantize_lm_head would store the tied embedding "
                "table twice (fp32 for the lm_head, quantised for the embedding), a larger file than not quantising "
                "it; set quantize_lm_head: true or quantize_embedding: false")
    return None


def kept_after(n_query: int, n_kv: int, groups, query) -> tuple[list[int], list[int]]:
    """(kept query heads, kept KV heads) of a layer with `n_query` / `n_kv` heads after removing KV `groups`
    and `query` heads. ValueError when an index is out of range, no group would stay, or kept groups would keep
    different numbers of query heads (grouped attention repeats each KV head for a fixed number of them)."""
    per_group = n_query // n_kv
    bad = [g for g in groups if not 0 <= g < n_kv] + [h for h in query if not 0 <= h < n_query]
    if bad:
        raise ValueError(f"head indices {sorted(bad)} out of range ({n_query} query heads, {n_kv} KV heads)")
    kv = [g for g in range(n_kv) if g not in set(groups)]
    if not kv:
        raise ValueError(f"removing every KV group ({n_kv}) removes the attention sublayer; drop it as a sublayer "
                         "(drop.attention) instead")
    q = [h for h in range(n_query) if h // per_group in kv and h not in set(query)]
    counts = {g: sum(1 for h in q if h // per_group == g) for g in kv}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise ValueError(f"kept KV groups would keep {counts} query heads; grouped attention needs the same "
                         "number (at least one) in every kept group")
    return q, kv
