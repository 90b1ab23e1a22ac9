"""`slimformer nightly`: run every recipe of a nightly file, compare, publish within the limits, report.

Per recipe (`night_for_recipe`, here or as a Ray task): run the recipe through the stage cache; compare the new
model with the version the tag points at, side by side (`compare`); publish it and move the tag (with `latest`)
only when no regression limit is crossed. A recipe that fails is not published and the others still run. Then
`report` appends the night to history.jsonl and writes summary.md and trend.png.
"""

from __future__ import annotations

import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from .. import console
from ..artifacts import NightReport, RecipeNight, Report
from ..errors import GateError, SlimformerError

EXIT_REGRESSION, EXIT_RECIPE_FAILED = 4, 5


def night_for_recipe(recipe_path: str, spec, use_cache: bool = True) -> RecipeNight:
    """Run, compare and (within the limits) publish one recipe. Never raises for the recipe's own failures:
    they come back as status 'failed' with the reason."""
    from ..config.loading import load_recipe
    from ..config.paths import home
    from ..stagecache import StageCache
    from ..stages import run

    recipe = load_recipe(recipe_path)
    base = {"recipe": str(recipe_path), "name": recipe.name}
    cache = StageCache(home() / "stages", reuse=use_cache)
    try:
        run_dir = run(recipe, cache=cache)
    except GateError as e:
        return RecipeNight(**base, status="failed", run_dir=e.run_dir, error=str(e))
    except Exception as e:  # noqa: BLE001 - one recipe's failure must not stop the night
        return RecipeNight(**base, status="failed", error=_reason(e))
    try:
        return _compare_and_publish(run_dir, recipe.name, spec, cache, base)
    except Exception as e:  # noqa: BLE001
        return RecipeNight(**base, status="failed", run_dir=str(run_dir), error=_reason(e))


def _compare_and_publish(run_dir: Path, name: str, spec, cache, base: dict) -> RecipeNight:
    from ..registry import open_store
    from ..registry.layout import figures
    from ..registry.ops import publish
    from .compare import regressions, side_by_side

    report = Report.read(run_dir)
    store = open_store(spec.registry)
    start = time.perf_counter()
    tagged = store.manifest(name, spec.tag)
    previous = tagged[0]["annotations"]["org.opencontainers.image.version"] if tagged else None
    rows = side_by_side(run_dir, store, name, previous, spec, cache) if previous else []
    found = regressions(rows, spec.limits)
    common = dict(base, run_dir=str(run_dir), previous=previous, stage_seconds=report.stage_seconds,
                  cached_stages=report.cached_stages, compare_seconds=round(time.perf_counter() - start, 1),
                  figures=figures(report), side_by_side=tuple(rows), regressions=tuple(found))
    if found:
        return RecipeNight(**common, status="regressed")
    info = publish(run_dir, store, [spec.tag])
    return RecipeNight(**common, status="published", version=info.version)


def _reason(e: Exception) -> str:
    if isinstance(e, SlimformerError):
        return str(e)
    console.say("".join(traceback.format_exception(e)))  # a bug, not bad input: keep the traceback visible
    return f"{type(e).__name__}: {e}"


def nightly(spec, use_cache: bool = True, ray: str | None = None) -> int:
    """Run the night; return the exit code (0, EXIT_REGRESSION or EXIT_RECIPE_FAILED), naming every problem."""
    from ..config.loading import load_recipe
    from ..config.paths import home
    from ..fanout import fan_out
    from ..registry import open_store
    from ..registry.layout import check_name, check_tag
    from ..stagecache import StageCache
    from .report import write_night

    start, started = time.perf_counter(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    names = [check_name(load_recipe(p).name) for p in spec.recipes]
    check_tag(spec.tag)
    open_store(spec.registry)  # unreachable registry or refused credentials: fail before hours of work
    jobs = [(str(p), spec, use_cache) for p in spec.recipes]

    def crashed(job, error) -> RecipeNight:  # a Ray worker died (out of memory, killed): the task could not say
        return RecipeNight(recipe=job[0], name=names[jobs.index(job)], status="failed", error=f"task lost: {error}")

    results = fan_out(night_for_recipe, jobs, ray=ray, cpus=spec.cpus_per_recipe, on_error=crashed)
    night = NightReport(started_utc=started, registry=str(spec.registry), tag=spec.tag, ray=ray,
                        wall_seconds=round(time.perf_counter() - start, 1), recipes=tuple(results))
    summary = write_night(night, Path(spec.out))
    StageCache(home() / "stages").prune(spec.cache_keep_days)
    console.say(f"summary: {summary}")
    return _verdict(night)


def _verdict(night: NightReport) -> int:
    for r in night.recipes:
        if r.status == "published":
            console.say(f"{r.name}: published {r.version}" + (f" (previous {r.previous})" if r.previous else
                                                            " (the first version under this tag)"))
    problems = [f"{r.name}: failed, not published: {r.error}" for r in night.recipes if r.status == "failed"]
    problems += [f"regression, not published: {g.describe(r.name)}" for r in night.recipes for g in r.regressions]
    for line in problems:
        print(f"slimformer: {line}", file=sys.stderr)
    if any(r.status == "failed" for r in night.recipes):
        return EXIT_RECIPE_FAILED
    return EXIT_REGRESSION if problems else 0
