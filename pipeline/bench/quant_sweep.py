"""`make bench-quant`: the 4-bit quantisers side by side, on the weights the packaged model has (on the source
GGUF's Q4_1 grid) and on weights moved off any grid, held-out perplexity and file size of the fused file.

Off-grid weights: every weight of the recipe's (dropped) model moved by seeded uniform noise of up to half its
own GGUF block's step, so that no quantiser can land back on the source grid; their fp32 file is the reference
those rows are compared with. With `search_mb`, the budget search's per-group mixed precision is measured too: on
the off-grid weights of the undropped model (the search keeps every sublayer), the most accurate choice of
4 or 8 bits and block size per group and for the table whose file fits `search_mb`, beside that model's fp32.
Accuracy figures only (deterministic): speed is `make bench-peers`' business.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .. import console
from ..config.quantize import OnnxInt4Spec
from ..config.recipe import Recipe
from ..errors import SlimformerError
from ..measure.validate import file_mb, prepare_eval_data
from ..stages import calibration_windows, drop, export, plan, prepare, quantize_fused, score
from .common import bench_log, pct, write_json

ROWS = {  # name -> the onnx-int4 entry's fields
    "source GGUF blocks": {"source_blocks": True},
    "rtn symmetric": {"source_blocks": False},
    "rtn asymmetric": {"source_blocks": False, "form": "asymmetric"},
    "rtn offset (Q4_1 rule)": {"source_blocks": False, "form": "offset"},
    "hqq": {"source_blocks": False, "algorithm": "hqq"},
    "gptq symmetric": {"source_blocks": False, "algorithm": "gptq"},
    "gptq offset": {"source_blocks": False, "algorithm": "gptq", "form": "offset"},
    "hqq + 12 groups at 8 bits": {"source_blocks": False, "algorithm": "hqq", "eight_bit_groups": 12},
}


def off_grid(model, seed: int = 0):
    """A copy of `model` whose linear weights are moved by uniform noise of up to half their block step
    (block = 32 inputs, step = (max - min) / 15, GGUF Q4_1's), seeded."""
    import copy

    import torch

    from ..model.groups import linear_groups

    moved = copy.deepcopy(model)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for members in linear_groups(moved).values():
            for _, module in members:
                w = module.weight.detach().float().numpy()
                blocks = w.reshape(w.shape[0], -1, 32)
                step = (blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)) / 15
                noise = rng.uniform(-0.5, 0.5, blocks.shape) * step
                module.weight.copy_(torch.from_numpy((blocks + noise).reshape(w.shape).astype(np.float32)))
    return moved


def quant_sweep(recipe: Recipe, out: str | None = None, rows: list[str] | None = None,
                search_mb: float | None = None, search_algorithm: str = "gptq",
                search_table_algorithm: str | None = None) -> list[dict]:
    from ..export.gguf_blocks import GgufBlocks
    from ..measure.ort_runner import OnnxLM, perplexity

    rows = list(ROWS) if rows is None else rows
    if unknown := [r for r in rows if r not in ROWS]:
        raise SlimformerError(f"quant-sweep rows {unknown} are unknown; choose from {', '.join(ROWS)}")
    with bench_log("quant-sweep", out), tempfile.TemporaryDirectory(prefix="slimformer-quant-") as tmp:
        p = prepare(recipe)
        loaded, tmp = p.loaded, Path(tmp)
        scores = score(loaded.model, loaded.tokenizer, recipe.calibration, loaded.description)
        pruned = drop(loaded.model, plan(scores, recipe.drop), loaded.tokenizer)
        data = prepare_eval_data(loaded.tokenizer, recipe.validate_)
        windows = calibration_windows(loaded.tokenizer, recipe.calibration)
        gguf = GgufBlocks(loaded.gguf) if loaded.gguf else None
        results = []
        for weights, model in (("packaged (on the GGUF grid)", pruned), ("off-grid (seeded noise)", off_grid(pruned))):
            fp32 = export(model, loaded.tokenizer, tmp / "fp32", recipe.export).path
            base = {"weights": weights, "quantiser": "fp32", "file_mb": file_mb(fp32),
                    "perplexity": perplexity(OnnxLM(fp32), data.windows)["perplexity"]}
            results.append(base)
            for name in rows:
                if name.startswith("source") and (gguf is None or model is not pruned):
                    continue
                spec = OnnxInt4Spec(kind="onnx-int4", **ROWS[name])
                path = quantize_fused(spec, model, tmp / name.replace(" ", "-"), gguf, windows, recipe.export.opset).path
                ppl = perplexity(OnnxLM(path), data.windows)["perplexity"]
                results.append({"weights": weights, "quantiser": name, "file_mb": file_mb(path), "perplexity": ppl,
                                "vs_fp32_pct": 100 * (ppl / base["perplexity"] - 1)})
                _say(results[-1], base)
        if search_mb is not None:
            results += searched_rows(recipe, p, data, windows, scores, search_mb,
                                     (search_algorithm, search_table_algorithm), tmp)
    write_json(out, {"model": loaded.description, "rows": results, "tokens": int(data.windows.size - len(data.windows))})
    print(markdown_table(results))
    return results


def _say(row: dict, base: dict) -> None:
    console.say(f"  {row['weights']} / {row['quantiser']}: {row['file_mb']:.1f} MB, perplexity "
                f"{row['perplexity']:.3f} ({pct(row['perplexity'], base['perplexity'])})")


def searched_rows(recipe: Recipe, p, data, windows, scores, max_mb: float, algorithms: tuple[str, str | None],
                  tmp: Path) -> list[dict]:
    """The undropped model's off-grid weights: their fp32 file, and the budget search's most accurate per-group
    formats within `max_mb` (fitted by the first of `algorithms`, the table by the second or else the first),
    exported and scored like the other rows. `windows` are the calibration windows; `scores` (the sweep's own)
    only rank drops, and this search drops nothing, so the off-grid model is not scored again."""
    import dataclasses

    from ..budget import search
    from ..config.budget import BudgetSpec, SearchSpec, SelectionStep
    from ..ladder import export_structure
    from ..measure.ort_runner import OnnxLM, perplexity

    loaded = p.loaded
    moved = dataclasses.replace(loaded, model=off_grid(loaded.model), gguf=None,
                                source_sha256=f"{loaded.source_sha256}:off-grid-0")  # its own cached sensitivities
    forms = "offset" if "hqq" in algorithms else ["offset", "symmetric"]  # hqq fits offset blocks only
    spec = SearchSpec(algorithm=algorithms[0], table_algorithm=algorithms[1], form=forms, source_blocks=False,
                      drop_attention=False, kv_precisions=["fp32"], generations=20, offspring=8, max_seconds=400,
                      heldout_points=0, baseline_drops=[0],
                      selection=[SelectionStep(windows=1, keep=2), SelectionStep(windows=4, keep=1)])
    budget = BudgetSpec(name="off-grid", max_file_mb=max_mb, search=spec,
                        context=recipe.validate_.latency.decode_context)  # only the file is limited
    budgeted = recipe.model_copy(update={"budget": budget})
    weights = "off-grid (seeded noise), undropped"
    fp32 = export(moved.model, loaded.tokenizer, tmp / "fp32-undropped", recipe.export).path
    base = {"weights": weights, "quantiser": "fp32", "file_mb": file_mb(fp32),
            "perplexity": perplexity(OnnxLM(fp32), data.windows)["perplexity"]}
    found = search(budgeted, moved, p.info, scores, windows, data.windows)
    structure = found.space.structure(found.chosen["off-grid"])
    path = export_structure(moved.model, structure, found.evaluator, budgeted, tmp / "searched")
    ppl = perplexity(OnnxLM(path), data.windows)["perplexity"]
    row = {"weights": weights, "quantiser": f"budget search <= {max_mb:g} MB ({spec.algorithms})",
           "file_mb": file_mb(path), "perplexity": ppl, "vs_fp32_pct": 100 * (ppl / base["perplexity"] - 1),
           "structure": found.space.describe(found.chosen["off-grid"])}
    _say(row, base)
    return [base, row]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| weights | quantiser | file MB | held-out perplexity | vs fp32 of the same weights |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        vs = "" if r["quantiser"] == "fp32" else f"{r['vs_fp32_pct']:+.1f} %"
        lines.append(f"| {r['weights']} | {r['quantiser']} | {r['file_mb']:.1f} | {r['perplexity']:.3f} | {vs} |")
    lines += [f"- {r['quantiser']}: {r['structure']}" for r in rows if "structure" in r]
    return "\n".join(lines)
