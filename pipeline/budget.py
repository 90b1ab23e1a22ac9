"""Memory-budgeted models (the recipe's `budget:` block): the check that every budget can be met, run before any
weights load, and the search stage that finds, per budget, the most accurate structure that fits.

The search stage measures each single change's sensitivity once (cached with the scores), builds the greedy
importance-ranked plan from them, refines it by evolutionary search on KL divergence from the original model,
and scores the uniform baselines and the frontier on held-out text for the Pareto report. The stage order
(`run`) stays in `pipeline.stages`, which exports, packages and validates each chosen model like any other.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import console
from .artifacts import BudgetPoint, ModelInfo, Pareto, Scores, Sensitivities
from .config.recipe import Recipe
from .model.structure import KV_BYTES, TABLE, Structure, quant_format
from .model.space import FIGURE, Candidate, Space, build_space, source_formats

# A rung's search stops once its model is this close to the original (KL on calibration tokens): on SmolLM2 an
# fp16 KV cache costs 6e-7 and the cheapest format change (an 8-bit table) 1e-4.
NEGLIGIBLE_KL = 1e-5
LABELS = {"max_file_mb": "file", "max_memory_mb": "peak memory", "max_decode_ms": "decode time"}
UNITS = {"max_file_mb": "MB", "max_memory_mb": "MB", "max_decode_ms": "ms/token"}


def calibration_for(recipe: Recipe, info: ModelInfo, always: bool = False, smallest_kv: bool = False):
    """The target's memory and decode calibration (measured once per target, model shape, context and KV
    precision, cached), when a budget limits memory or decode time or `always`; else None. `smallest_kv`: only
    the search's smallest KV precision, all the reachability check needs."""
    spec = recipe.budget
    limits = [limits.limits() for _, limits in spec.rungs()]
    if not always and not any(k in lim for lim in limits for k in ("max_memory_mb", "max_decode_ms")):
        return None
    from .measure.footprint import calibration, resolve_target

    target = resolve_target(spec.target, recipe.validate_.targets)
    kvs = spec.search.kv_precisions
    return calibration(info, target, spec.context, recipe.validate_.latency.threads,
                       (min(kvs, key=KV_BYTES.get),) if smallest_kv else tuple(kvs))


def budget_space(recipe: Recipe, info: ModelInfo, gguf: Path | None, calibration=None) -> Space:
    """The search space of the recipe's budget for this model; source formats from the `gguf` file's metadata
    (the file the weights came from, if any)."""
    from .export.gguf_blocks import open_gguf
    from .model.structure import all_groups, group_params

    spec, types = recipe.budget, {}
    if gguf is not None and spec.search.source_blocks:
        reader = open_gguf(gguf)
        types = {p: reader.type_of(p) or "" for g in all_groups(info) for p in group_params(info, g)}
    return build_space(info, spec.search, source_formats(info, types), spec.context, calibration)


def budget_problems(recipe: Recipe, infos: dict[str, ModelInfo]) -> list[str]:
    """Every limit below what the smallest reachable model costs (of every source model, keyed as
    `SourceSpec.key`), naming that figure, the model and the field."""
    from .model.loading import source_gguf

    spec, sources = recipe.budget, {s.key: s for s in recipe.model.sources()}
    reach = {}  # source key -> (smallest structure's footprint, its description)
    for key, info in infos.items():
        m = sources[key]
        space = budget_space(recipe.for_source(m), info, source_gguf(m.source, m.name, m.path),
                             calibration_for(recipe, info, smallest_kv=True))
        small = space.smallest()
        who = f"{key}: " if len(infos) > 1 else ""
        reach[key] = (space.footprint(small), who + space.describe(small))
    problems = []
    for name, limits in spec.rungs():
        where = f"budget.ladder.{name}" if spec.ladder else "budget"
        for key, value in limits.limits().items():
            figure, described = min(((getattr(fp, FIGURE[key]), d) for fp, d in reach.values()), key=lambda x: x[0])
            if value < figure:
                problems.append(
                    f"{where}.{key}: {value:g} {UNITS[key]} is below the smallest {LABELS[key]} this search can reach, "
                    f"{figure:.2f} {UNITS[key]} ({described}); raise {where}.{key} to at least "
                    f"{math.ceil(figure * 100) / 100:.2f}{_widen(spec.search, key)}")
    return problems


def reachable(space: Space, limits: dict) -> bool:
    """Whether the smallest structure of `space` meets every limit (so a search for them can start)."""
    return space.fits(space.smallest(), limits)


def _widen(search, key: str) -> str:
    hints = []
    if not search.drop_mlp:
        hints.append("allow MLP drops (budget.search.drop_mlp: true)")
    if 4 not in search.bits or 4 not in search.table_bits:
        hints.append("allow 4-bit groups (budget.search.bits / table_bits: [4, 8])")
    if key == "max_memory_mb" and "fp16" not in search.kv_precisions:
        hints.append("allow an fp16 KV cache (budget.search.kv_precisions)")
    return f", or {' or '.join(hints)}" if hints else ""


# ---------------------------------------------------------------- the search stage

@dataclass
class SearchOutcome:
    space: Space
    chosen: dict[str, Candidate]
    kl: dict[str, float]
    pareto: Pareto
    sensitivities: Sensitivities
    evaluator: object  # pipeline.model.fitness.Evaluator, for held-out scores of extra points (benches)


def search(recipe: Recipe, loaded, info: ModelInfo, scores: Scores, windows: np.ndarray, heldout: np.ndarray,
           progress: bool = True) -> SearchOutcome:
    """Choose one structure per rung of the recipe's budget (or the budget itself) that this model can reach."""
    from .model.evopress import SearchLog, evolve
    from .model.fitness import Evaluator
    from .model.sensitivity import additive_error

    s = recipe.budget.search
    space = budget_space(recipe, info, loaded.gguf, calibration_for(recipe, info, always=True))
    steps = [(step.windows, step.keep) for step in s.selection]
    needed = max(s.sensitivity_windows, steps[-1][0])
    ev = Evaluator(loaded.model, windows[:needed], _group_quantizer(recipe, loaded, windows),
                   int8_inputs=s.accuracy_level == 4)  # score what the file computes
    space = _reusable(space, ev)
    sens = _sensitivities(recipe, loaded, ev, space, windows)
    error, rng, log, chosen = additive_error(space, sens), np.random.default_rng(s.seed), SearchLog(), {}

    def fitness(cands, n):
        return [ev.kl(space.structure(c), n) for c in cands]
    uniform = [c for _, st in uniform_baselines(space, scores, s.baseline_drops) if (c := space.candidate(st))]
    for name, limits in recipe.budget.rungs():
        lim = limits.limits()
        if not reachable(space, lim):  # another source model's (the checks refuse a budget none can reach)
            fp = space.footprint(space.smallest())
            least = ", ".join(f"{LABELS[k]} {getattr(fp, FIGURE[k]):.1f} {UNITS[k]}" for k in lim)
            console.say(f"budget {name}: out of {recipe.model.key}'s reach (its smallest: {least}); not searched")
            continue
        started, generations = time.perf_counter(), log.generations
        starts = search_starts(space, lim, error, uniform)
        values = log.score(starts, steps[-1][0], fitness, space.key)
        seed = starts[int(np.argmin(values))]  # never start below a uniform choice that fits
        scored = time.perf_counter()
        bar = console.progress(total=s.generations, desc=f"search {name}") if progress else None
        best, log = evolve(seed, lambda c, r: space.mutate(c, r, lim), fitness, space.key, steps, s.generations,
                           s.offspring, rng, s.max_seconds, log, (lambda g, f: bar.update()) if bar else None,
                           enough=NEGLIGIBLE_KL)
        if bar is not None:
            bar.close()
        chosen[name] = best
        console.say(f"budget {name}: KL {log.scores[space.key(best)][steps[-1][0]]:.4f} (start "
                    f"{log.scores[space.key(seed)][steps[-1][0]]:.4f}; {_count(len(starts), 'start')} scored in "
                    f"{scored - started:.0f} s, {_count(log.generations - generations, 'generation')} in "
                    f"{time.perf_counter() - scored:.0f} s); {space.describe(best)}")
    kl = {name: log.scores[space.key(c)][steps[-1][0]] for name, c in chosen.items()}
    pareto = _pareto(recipe, space, ev, log, chosen, scores, heldout, steps[0][0], loaded.description)
    return SearchOutcome(space, chosen, kl, pareto, sens, ev)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def search_starts(space: Space, limits: dict, error, uniform: list) -> list:
    """The candidates a rung's search may start from: greedy descents from the most accurate structure and
    from every uniform baseline (a uniform choice just over the limit is often a few cheap steps from the best
    fit), the greedy climb from the smallest structure, and the uniform choices that fit as they are; each once,
    all within `limits`."""
    origins = (space.most_accurate(), space.smallest(), *uniform)
    starts = [space.greedy(c, limits, error) for c in origins] + list(uniform)
    return list({space.key(c): c for c in starts if space.fits(c, limits)}.values())


def _group_quantizer(recipe: Recipe, loaded, windows: np.ndarray):
    """(group, parts, params, format) -> BlockQuant: the GGUF's blocks for source formats, else the recipe's
    quantiser, fitted once per model, calibration windows and quantiser code and kept under home()/fits (the
    calibration Hessians are computed only when something has to be fitted)."""
    from .config.paths import home
    from .export import policy, weights
    from .export.fits import FitCache
    from .export.gguf_blocks import open_gguf
    from .model import calibration
    from .rundir import library_versions, sha256_file, sha256_json

    s = recipe.budget.search
    gguf = open_gguf(loaded.gguf) if loaded.gguf is not None and s.source_blocks else None
    key = {"model": loaded.source_sha256, "windows": sha256_json(np.asarray(windows).tolist()),
           "algorithms": [s.algorithm, s.table_algorithm], "libraries": library_versions(),
           "code": [sha256_file(Path(m.__file__)) for m in (weights, policy, calibration)]}
    cache, hessians = FitCache(home() / "fits" / sha256_json(key)[:24]), {}

    def quantize(group, parts, params, fmt):
        algorithm = (s.table_algorithm or s.algorithm) if group in (TABLE, "lm_head") else s.algorithm

        def fit():
            if algorithm == "gptq" and not fmt.source and not hessians:
                hessians.update(calibration.input_hessians(loaded.model, windows))
            return policy.format_quantizer({group: fmt}, algorithm, gguf, hessians)(group, parts, params)
        return fit() if fmt.source else cache.get(group, fmt.name, fit)
    return quantize


def _reusable(space: Space, ev) -> Space:
    """The space without source levels whose blocks do not match the loaded weights (changed, or permuted
    beyond recognition): the cost model assumed them from the GGUF's metadata alone."""
    levels = {}
    for g, options in space.levels.items():
        keep = []
        for f in options:
            try:
                ev.quantized(g, f) if f.source else None
                keep.append(f)
            except ValueError:
                console.say(f"budget: {g} cannot reuse the source GGUF's blocks; searching its other formats")
        levels[g] = tuple(keep)
    return Space(space.info, levels, space.kv, space.drop_attention, space.drop_mlp, space.context,
                 space.calibration)


def _sensitivities(recipe: Recipe, loaded, ev, space: Space, windows: np.ndarray) -> Sensitivities:
    """Measured once per model, calibration windows, space and evaluator (its code, and whether inputs are
    rounded to int8); kept under home()/sensitivities."""
    from .config.paths import home
    from .export import weights
    from .model import fitness, int8_inputs
    from .model.sensitivity import measure
    from .rundir import library_versions, sha256_file, sha256_json, staged_folder

    s = recipe.budget.search
    n = s.sensitivity_windows
    key = {"model": loaded.source_sha256, "windows": sha256_json(windows[:n].tolist()), "grid": s.grids,
           "algorithm": s.algorithms, "int8_inputs": ev.inputs is not None,
           "code": [sha256_file(Path(m.__file__)) for m in (weights, fitness, int8_inputs)],
           "levels": {g: [f.name for f in v] for g, v in space.levels.items()},
           "kv": list(space.kv), "drops": [space.drop_attention, space.drop_mlp], "libraries": library_versions()}
    folder = home() / "sensitivities" / sha256_json(key)[:24]
    if (folder / Sensitivities.filename).is_file():
        return Sensitivities.read(folder)
    moments = fitness.input_second_moments(loaded.model, windows[:n])
    sens = measure(ev, space, n, moments, loaded.description, console.progress)
    with staged_folder(folder) as tmp:
        sens.write(tmp)
    return sens


# ---------------------------------------------------------------- baselines and the Pareto record

def uniform_baselines(space: Space, scores: Scores, drops: list[int]) -> list[tuple[str, Structure]]:
    """Score-ranked attention drops with one format everywhere: int8, 4-bit (the source's blocks where reusable,
    the table at 8 bits, as the default int4 variant) and 4-bit with a 4-bit table."""
    from .model.plan import plan_drop

    info, out = space.info, []
    grid = next((f.grid for levels in space.levels.values() for f in levels if not f.source), "symmetric")
    for n in (d for d in drops if d < info.num_layers):
        plan = plan_drop(scores, attention=n)
        attention = tuple(i not in plan.attention for i in range(info.num_layers))
        kept = Structure(attention, (True,) * info.num_layers).groups(info)
        for label, body, table in (("int8", 8, 8), ("4-bit", 4, 8), ("all 4-bit", 4, 4)):
            formats = {}
            for g in kept:
                bits = table if g in (TABLE, "lm_head") else body
                source = next((f for f in space.levels.get(g, ()) if f.source and f.bits == bits), None)
                formats[g] = source if label == "4-bit" and source else quant_format(bits, 32, grid)
            out.append((f"uniform {label}, {n} attention dropped", Structure(attention, (True,) * info.num_layers,
                                                                              formats)))
    return out


def frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (smaller size, lower loss), by size."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    out, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            out.append(i)
            best = points[i][1]
    return out


def _pareto(recipe: Recipe, space: Space, ev, log, chosen: dict[str, Candidate], scores: Scores,
            heldout: np.ndarray, first: int, model: str) -> Pareto:
    """Every scored candidate and baseline, priced; perplexity on held-out windows for the chosen models, the
    baselines and up to `heldout_points` frontier points spread over the sizes."""
    s = recipe.budget.search
    heldout = heldout[:s.heldout_windows]
    keys = list(log.candidates)
    names = {}
    for name, c in chosen.items():
        names[space.key(c)] = f"{names[space.key(c)]}, {name}" if space.key(c) in names else f"chosen {name}"
    entries = [(names.get(key, "search"), space.structure(c), log.scores[key].get(first)) for key, c in
               log.candidates.items()]
    entries += [(label, st, None) for label, st in uniform_baselines(space, scores, s.baseline_drops)]
    entries = [(label, st, kl if kl is not None else ev.kl(st, first)) for label, st, kl in entries]
    points = [_point(label, space, st, kl) for label, st, kl in entries]
    front = frontier([(p.file_mb, p.kl) for p in points])
    step = max(1, -(-len(front) // s.heldout_points)) if s.heldout_points else 0
    measured = {i for i, p in enumerate(points) if p.label != "search"} | set(front[::step] if step else [])
    for i in console.progress(sorted(measured), desc="held-out perplexity"):
        points[i] = replace(points[i], perplexity=ev.perplexity(entries[i][1], heldout))
    n = space.info.num_layers
    reference = ev.perplexity(Structure((True,) * n, (True,) * n), heldout)
    return Pareto(model=model, reference_perplexity=reference, kl_tokens=int(ev.windows[:first].size),
                  heldout_tokens=int(heldout[:, 1:].size), points=tuple(points), frontier=tuple(front),
                  budgets={name: limits.limits() for name, limits in recipe.budget.rungs()},
                  chosen={name: keys.index(space.key(c)) for name, c in chosen.items()})


def _point(label: str, space: Space, st: Structure, kl: float | None) -> BudgetPoint:
    from .model.costs import footprint
    from .model.space import describe

    fp = footprint(space.info, st, space.context, space.calibration)
    return BudgetPoint(label=label, structure=describe(space.info, st), file_mb=fp.file_mb,
                       kv_kb_per_token=fp.kv_kb_per_token, memory_mb=fp.memory_mb, decode_ms=fp.decode_ms, kl=kl)
