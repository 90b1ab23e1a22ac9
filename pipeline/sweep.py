"""What matters, measured: held-out perplexity and multiple-choice accuracy vs sublayers dropped.

One scoring pass, then for each variant (attention, mlp, blocks, joint) and count, a one-shot drop
measured in PyTorch on the recipe's held-out data; attention-only points are also exported and
timed in onnxruntime beside the undropped model, in the same run.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from .recipe import Recipe


def accuracy_figures(model, data) -> dict:
    from .ort_runner import multiple_choice, perplexity
    from .torch_lm import TorchLM

    lm = TorchLM(model)
    return {"perplexity": perplexity(lm, data.windows)["perplexity"],
            "mc_accuracy": multiple_choice(lm, data.mc_items)["accuracy"]}


def decode_latency(model, opset: int, spec) -> dict:
    from .export_onnx import export_onnx
    from .ort_runner import OnnxLM, latency

    with tempfile.TemporaryDirectory() as tmp:
        exported = export_onnx(model, Path(tmp), opset=opset)
        lat = latency(OnnxLM(exported.path, threads=spec.threads), spec.prefill_tokens, spec.decode_context,
                      spec.decode_steps)
    return {"decode_p50_ms": lat["decode_ms_p50"], "prefill_ms": lat["prefill_ms"]}


def sweep(recipe: Recipe, counts: list[int], variants: list[str], out: str | None = None) -> list[dict]:
    from .plan import plan_drop
    from .prune import drop_sublayers
    from .run import load, score
    from .validate import prepare_eval_data

    loaded = load(recipe)
    scores = score(loaded.model, loaded.tokenizer, recipe.calibration, loaded.description)
    data = prepare_eval_data(loaded.tokenizer, recipe.validate_)
    lat_spec = recipe.validate_.latency
    base = {"variant": "none", "dropped": 0, **accuracy_figures(loaded.model, data),
            **decode_latency(loaded.model, recipe.export.opset, lat_spec)}
    rows = [base]
    _print_row(base, base)
    for variant in variants:
        for n in (c for c in counts if c > 0):
            if n > (2 * scores.num_layers if variant == "joint" else scores.num_layers - 1):
                continue
            start = time.perf_counter()
            plan = plan_drop(scores, **{variant: n})
            pruned = drop_sublayers(loaded.model, list(plan.attention), list(plan.mlp))
            row = {"variant": variant, "dropped": n, "attention_dropped": list(plan.attention),
                   "mlp_dropped": list(plan.mlp), **accuracy_figures(pruned, data)}
            if variant == "attention":
                row.update(decode_latency(pruned, recipe.export.opset, lat_spec))
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            _print_row(row, base)
    if out:
        Path(out).write_text(json.dumps({"model": loaded.description, "rows": rows,
                                         "settings": recipe.validate_.model_dump(mode="json")}, indent=2))
    print(markdown_table(rows))
    return rows


def _print_row(row: dict, base: dict) -> None:
    print(f"{row['variant']:>9} {row['dropped']:>3}  ppl {row['perplexity']:8.3f} "
          f"({100 * (row['perplexity'] / base['perplexity'] - 1):+6.1f} %)  mc {row['mc_accuracy']:.3f}"
          + (f"  decode {row['decode_p50_ms']:.2f} ms" if "decode_p50_ms" in row else ""),
          file=sys.stderr, flush=True)


def markdown_table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| variant | dropped | perplexity | vs undropped | MC accuracy | decode ms/token p50 | decode vs undropped |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        dec = r.get("decode_p50_ms")
        lines.append(
            f"| {r['variant']} | {r['dropped']} | {r['perplexity']:.2f} | "
            f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.1f} % | {r['mc_accuracy']:.3f} | "
            f"{'' if dec is None else f'{dec:.2f}'} | "
            f"{'' if dec is None else f'{dec / base['decode_p50_ms']:.2f}x'} |")
    return "\n".join(lines)
