"""`make bench-heal`: held-out perplexity and accuracy vs attention sublayers dropped, one-shot and healed.

One scoring pass; at every count the recipe's heal block (same budget) is run once per healing text (the
calibration split, plus any `--heal-files` sources), all measured in PyTorch on the same held-out data.
"""

from __future__ import annotations

from pathlib import Path

from ..config.recipe import DropSpec, Recipe
from ..errors import RecipeError
from ..measure.torch_lm import torch_accuracy
from ..measure.validate import prepare_eval_data
from ..stages import drop, heal, plan, preflight, prepare, score
from .common import bench_log, pct, write_json


def heal_sweep(recipe: Recipe, counts: list[int], sources: dict[str, list[Path] | None] | None = None,
               out: str | None = None) -> list[dict]:
    """For each healing text in `sources` (name -> files; None = the calibration split), heal every point."""
    if recipe.heal is None:
        raise RecipeError([f"heal: recipe '{recipe.name}' has no heal block; the heal sweep heals every point with "
                           "its settings and budget. Add a heal: block (see recipes/smollm2-135m-heal-sweep.yaml)"])
    sources = sources or {"calibration": None}
    variants = {name: recipe.model_copy(update={"heal": recipe.heal.model_copy(update={"files": files})})
                for name, files in sources.items()}
    with bench_log("heal-sweep", out):
        for variant in variants.values():
            preflight(variant)  # each healing text is checked against the evaluation text, up front
        p = prepare(recipe)
        model, tokenizer = p.loaded.model, p.loaded.tokenizer
        scores = score(model, tokenizer, recipe.calibration, p.loaded.description)
        data = prepare_eval_data(tokenizer, recipe.validate_)
        base = torch_accuracy(model, data)
        rows = [{"dropped": 0, "perplexity": base.perplexity, "mc_accuracy": base.mc_accuracy}]
        for n in (c for c in counts if 0 < c < scores.num_layers):
            drop_plan = plan(scores, DropSpec(attention=n))
            pruned = drop(model, drop_plan, tokenizer)
            before = torch_accuracy(pruned, data)
            row = {"dropped": n, "attention_dropped": list(drop_plan.attention), "perplexity": before.perplexity,
                   "mc_accuracy": before.mc_accuracy}
            for name, variant in variants.items():
                _, summary = heal(pruned, model, tokenizer, variant, data, before=before, progress=False)
                row[f"healed_{name}"] = {"perplexity": summary.after.perplexity,
                                         "mc_accuracy": summary.after.mc_accuracy, "seconds": round(summary.seconds, 1),
                                         "steps": summary.steps, "stopped_by": summary.stopped_by,
                                         "windows": summary.windows}
            rows.append(row)
    write_json(out, {"model": p.loaded.description, "rows": rows,
                     "sources": {k: [str(f) for f in v] if v else None for k, v in sources.items()},
                     "heal": recipe.heal.model_dump(mode="json"), "settings": recipe.validate_.model_dump(mode="json")})
    print(heal_table(rows, list(sources)))
    return rows


def heal_table(rows: list[dict], sources: list[str]) -> str:
    base = rows[0]["perplexity"]
    head = "".join(f" healed on {s}: perplexity | vs undropped | MC | heal s |" for s in sources)
    lines = [f"| attention dropped | one-shot perplexity | vs undropped | MC accuracy |{head}",
             "|---:|---:|---:|---:|" + "---:|---:|---:|---:|" * len(sources)]
    for r in rows:
        cells = "".join(f" {h['perplexity']:.2f} | {pct(h['perplexity'], base)} | {h['mc_accuracy']:.3f} | "
                        f"{h['seconds']:.0f} |" if (h := r.get(f"healed_{s}")) else " | | | |" for s in sources)
        lines.append(f"| {r['dropped']} | {r['perplexity']:.2f} | {pct(r['perplexity'], base)} | "
                     f"{r['mc_accuracy']:.3f} |{cells}")
    return "\n".join(lines)
