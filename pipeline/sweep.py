"""What matters, measured: held-out perplexity and multiple-choice accuracy vs sublayers dropped.

One scoring pass, then for each variant (attention, mlp, blocks, joint) and count, a one-shot drop
measured in PyTorch on the recipe's held-out data. Attention-only points are also exported to ONNX
and timed in onnxruntime with the undropped model, interleaved in rounds so machine noise hits all alike.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .recipe import Recipe

LATENCY_ROUNDS = 3


def accuracy_figures(model, data) -> dict:
    from .ort_runner import multiple_choice, perplexity
    from .torch_lm import TorchLM

    lm = TorchLM(model)
    return {"perplexity": perplexity(lm, data.windows)["perplexity"],
            "mc_accuracy": multiple_choice(lm, data.mc_items)["accuracy"]}


def interleaved_decode_latency(paths: list[Path], spec, rounds: int = LATENCY_ROUNDS) -> list[float]:
    """Median decode ms/token p50 per file, measuring every file once per round."""
    from .ort_runner import OnnxLM, latency

    samples = [[] for _ in paths]
    for _ in range(rounds):
        for i, path in enumerate(paths):
            lat = latency(OnnxLM(path, threads=spec.threads), spec.prefill_tokens, spec.decode_context,
                          spec.decode_steps)
            samples[i].append(lat["decode_ms_p50"])
    return [float(np.median(s)) for s in samples]


def sweep(recipe: Recipe, counts: list[int], variants: list[str], out: str | None = None) -> list[dict]:
    from .export_onnx import export_onnx
    from .plan import plan_drop
    from .prune import drop_sublayers
    from .run import load, score
    from .validate import prepare_eval_data

    loaded = load(recipe)
    scores = score(loaded.model, loaded.tokenizer, recipe.calibration, loaded.description)
    data = prepare_eval_data(loaded.tokenizer, recipe.validate_)
    rows = [{"variant": "none", "dropped": 0, **accuracy_figures(loaded.model, data)}]
    _print_row(rows[0], rows[0])
    with tempfile.TemporaryDirectory(prefix="slimformer-sweep-") as tmp:
        timed = {0: export_onnx(loaded.model, Path(tmp) / "0", recipe.export.opset).path}
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
                    timed[len(rows)] = export_onnx(pruned, Path(tmp) / str(n), recipe.export.opset).path
                row["seconds"] = round(time.perf_counter() - start, 1)
                rows.append(row)
                _print_row(row, rows[0])
        print(f"timing {len(timed)} ONNX files, {LATENCY_ROUNDS} interleaved rounds ...", file=sys.stderr, flush=True)
        for index, ms in zip(timed, interleaved_decode_latency(list(timed.values()), recipe.validate_.latency)):
            rows[index]["decode_p50_ms"] = ms
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"model": loaded.description, "scores": scores.to_json(), "rows": rows,
                                         "settings": recipe.validate_.model_dump(mode="json")}, indent=2))
    print(markdown_table(rows))
    return rows


def _print_row(row: dict, base: dict) -> None:
    print(f"{row['variant']:>9} {row['dropped']:>3}  ppl {row['perplexity']:8.3f} "
          f"({100 * (row['perplexity'] / base['perplexity'] - 1):+6.1f} %)  mc {row['mc_accuracy']:.3f}",
          file=sys.stderr, flush=True)


def markdown_table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| variant | dropped | perplexity | vs undropped | MC accuracy | decode ms/token p50 | decode vs undropped |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        dec = r.get("decode_p50_ms")
        timing = "| |" if dec is None else f"| {dec:.2f} | {dec / base['decode_p50_ms']:.2f}x |"
        lines.append(
            f"| {r['variant']} | {r['dropped']} | {r['perplexity']:.2f} | "
            f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.1f} % | {r['mc_accuracy']:.3f} {timing}")
    return "\n".join(lines)


def heal_sweep(recipe: Recipe, counts: list[int], sources: dict[str, list[Path] | None] | None = None,
               out: str | None = None) -> list[dict]:
    """Held-out perplexity and multiple-choice accuracy vs attention sublayers dropped, one-shot and after the
    recipe's heal block, for each healing text in `sources` (name -> files; None = the calibration split).
    Same scores, data and budget for every point; PyTorch figures, as in `sweep`."""
    from .corpus import check_disjoint
    from .heal import heal, heal_windows
    from .models import load_model
    from .plan import plan_drop
    from .prune import drop_sublayers
    from .run import evaluation_files, score
    from .validate import prepare_eval_data

    if recipe.heal is None:
        raise ValueError(f"recipe '{recipe.name}' has no heal block; the heal sweep uses its budget and settings")
    sources = sources or {"calibration": None}
    for files in sources.values():
        check_disjoint(files or recipe.calibration.files, evaluation_files(recipe), role="healing")
    loaded = load_model(recipe.model.source, name=recipe.model.name, path=recipe.model.path)
    scores = score(loaded.model, loaded.tokenizer, recipe.calibration, loaded.description)
    data = prepare_eval_data(loaded.tokenizer, recipe.validate_)
    windows = {name: heal_windows(loaded.tokenizer, recipe.heal.model_copy(update={"files": files}),
                                  recipe.calibration.files) for name, files in sources.items()}
    base = {"dropped": 0, **accuracy_figures(loaded.model, data)}
    rows = [base]
    print(f"undropped: perplexity {base['perplexity']:.3f}, MC {base['mc_accuracy']:.3f}", file=sys.stderr, flush=True)
    for n in (c for c in counts if 0 < c < scores.num_layers):
        plan = plan_drop(scores, attention=n)
        pruned = drop_sublayers(loaded.model, list(plan.attention), [])
        row = {"dropped": n, "attention_dropped": list(plan.attention), **accuracy_figures(pruned, data)}
        for name, train in windows.items():
            result = heal(pruned, loaded.model, train, recipe.heal, progress=False)
            healed = accuracy_figures(result.model, data)
            row[f"healed_{name}"] = {**healed, "seconds": round(result.seconds, 1), "steps": result.steps,
                                     "stopped_by": result.stopped_by, "windows": int(len(train))}
            print(f"{n:>3} dropped: perplexity {row['perplexity']:.3f} -> {healed['perplexity']:.3f} ({name}, "
                  f"{result.steps} steps, {result.seconds:.0f} s), MC {row['mc_accuracy']:.3f} -> "
                  f"{healed['mc_accuracy']:.3f}", file=sys.stderr, flush=True)
        rows.append(row)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"model": loaded.description, "rows": rows, "sources": {
            k: [str(f) for f in v] if v else None for k, v in sources.items()}, "heal": recipe.heal.model_dump(
            mode="json"), "settings": recipe.validate_.model_dump(mode="json")}, indent=2))
    print(heal_table(rows, list(sources)))
    return rows


def heal_table(rows: list[dict], sources: list[str]) -> str:
    base = rows[0]

    def pct(x):
        return f"{100 * (x / base['perplexity'] - 1):+.1f} %"
    head = "".join(f" healed on {s}: perplexity | vs undropped | MC | heal s |" for s in sources)
    lines = [f"| attention dropped | one-shot perplexity | vs undropped | MC accuracy |{head}",
             "|---:|---:|---:|---:|" + "---:|---:|---:|---:|" * len(sources)]
    for r in rows:
        cells = "".join(f" {h['perplexity']:.2f} | {pct(h['perplexity'])} | {h['mc_accuracy']:.3f} | {h['seconds']:.0f} |"
                        if (h := r.get(f"healed_{s}")) else " | | | |" for s in sources)
        lines.append(f"| {r['dropped']} | {r['perplexity']:.2f} | {pct(r['perplexity'])} | {r['mc_accuracy']:.3f} |{cells}")
    return "\n".join(lines)
