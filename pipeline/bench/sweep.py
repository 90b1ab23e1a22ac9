"""`make bench-sweep`: held-out perplexity and multiple-choice accuracy vs sublayers dropped, per kind.

One scoring pass, then for each kind (attention, mlp, blocks, joint) and count, a one-shot drop measured in
PyTorch on the recipe's held-out data. Attention-only points are also exported to ONNX and timed in onnxruntime
beside the undropped model, in interleaved rounds so that machine noise hits them alike. With `ray`, every point
is a Ray task (it loads the model once per worker); the timing stays here, interleaved, on the exported files
(so on a cluster the export folder must be on storage the nodes share).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .. import console
from ..config.recipe import DropSpec, Recipe
from ..fanout import fan_out
from ..measure.torch_lm import torch_accuracy
from ..measure.validate import interleaved_latency, prepare_eval_data
from ..stages import drop, export, plan, prepare, score
from .common import bench_log, pct, write_json

KINDS = ("attention", "mlp", "blocks", "joint")


def sweep(recipe: Recipe, counts: list[int], kinds: list[str], out: str | None = None,
          ray: str | None = None) -> list[dict]:
    with bench_log("sweep", out):
        p = prepare(recipe)
        model, tokenizer = p.loaded.model, p.loaded.tokenizer
        scores = score(model, tokenizer, recipe.calibration, p.loaded.description)
        data = prepare_eval_data(tokenizer, recipe.validate_)
        _LOADED[recipe.model_dump_json()] = (p.loaded, data)
        rows = [{"variant": "none", "dropped": 0, **_figures(model, data)}]
        _say(rows[0], rows[0])
        with tempfile.TemporaryDirectory(prefix="slimformer-sweep-") as tmp:
            timed = {0: export(model, tokenizer, Path(tmp) / "0", recipe.export).path}
            points = [(recipe, scores, kind, n, Path(tmp)) for kind in kinds for n in counts
                      if 0 < n <= (2 * scores.num_layers - 1 if kind == "joint" else scores.num_layers - 1)]
            try:
                measured = fan_out(sweep_point, points, ray=ray, cpus=recipe.validate_.latency.threads)
            finally:
                _LOADED.clear()
            for row in measured:
                if "onnx" in row:
                    timed[len(rows)] = Path(row.pop("onnx"))
                rows.append(row)
                _say(row, rows[0])
            latency = recipe.validate_.latency
            console.say(f"timing {len(timed)} ONNX files, {latency.rounds} interleaved rounds ...")
            timing = interleaved_latency({str(i): path for i, path in timed.items()}, latency, Path(tmp))
            for index in timed:
                rows[index]["decode_p50_ms"] = timing[str(index)]["decode_ms_p50"]
    write_json(out, {"model": p.loaded.description, "scores": scores.to_json(), "rows": rows,
                     "settings": recipe.validate_.model_dump(mode="json")})
    print(markdown_table(rows))
    return rows


_LOADED = {}  # recipe JSON -> (loaded model, evaluation data): once per process (the driver, each Ray worker)


def sweep_point(recipe: Recipe, scores, kind: str, n: int, folder: Path) -> dict:
    """One point: drop `n` sublayers of `kind` one-shot and measure it in PyTorch; attention points are also
    exported to `folder` (the row's 'onnx') for the interleaved timing."""
    key = recipe.model_dump_json()
    if key not in _LOADED:
        loaded = prepare(recipe).loaded
        _LOADED[key] = (loaded, prepare_eval_data(loaded.tokenizer, recipe.validate_))
    loaded, data = _LOADED[key]
    start = time.perf_counter()
    drop_plan = plan(scores, DropSpec(**{kind: n}))
    pruned = drop(loaded.model, drop_plan, loaded.tokenizer)
    row = {"variant": kind, "dropped": n, "attention_dropped": list(drop_plan.attention),
           "mlp_dropped": list(drop_plan.mlp), **_figures(pruned, data)}
    if kind == "attention":
        row["onnx"] = str(export(pruned, loaded.tokenizer, folder / str(n), recipe.export).path)
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _figures(model, data) -> dict:
    acc = torch_accuracy(model, data)
    return {"perplexity": acc.perplexity, "mc_accuracy": acc.mc_accuracy}


def _say(row: dict, base: dict) -> None:
    console.say(f"{row['variant']:>9} {row['dropped']:>3}  ppl {row['perplexity']:8.3f} "
                f"({pct(row['perplexity'], base['perplexity']):>8})  mc {row['mc_accuracy']:.3f}")


def markdown_table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| variant | dropped | perplexity | vs undropped | MC accuracy | decode ms/token p50 | decode vs undropped |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        dec = r.get("decode_p50_ms")
        timing = "| |" if dec is None else f"| {dec:.2f} | {dec / base['decode_p50_ms']:.2f}x |"
        lines.append(f"| {r['variant']} | {r['dropped']} | {r['perplexity']:.2f} | {pct(r['perplexity'], base['perplexity'])} "
                     f"| {r['mc_accuracy']:.3f} {timing}")
    return "\n".join(lines)
