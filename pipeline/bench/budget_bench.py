"""`make bench-budget`: the budget search against what a user gets without it, on one held-out text in one run.

For each file budget (and at the file size of each peer's 4-bit model), the searched model is exported and
scored beside the best uniform choice that fits (score-ranked attention drop with int8, 4-bit or all-4-bit
everywhere) and beside the peers: the onnxruntime-genai model builder's int4 and llama.cpp's Q4_0 re-quantised
from the shipped GGUF, when their environments exist under home()/peers (`make bench-peers` builds them; this
bench never does). ONNX files are scored by ort_runner on the validate split's windows; the GGUF by its own
dequantised weights in PyTorch on the same windows (llama.cpp's int8 activation rounding is not modelled).
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from .. import console
from ..config.budget import BudgetRung
from ..config.paths import home
from ..config.recipe import Recipe
from ..errors import SlimformerError
from ..measure.validate import file_mb, prepare_eval_data, run_runner
from ..stages import baseline_onnx, calibration_windows, drop, prepare, score
from .common import bench_log, pct, write_json

TIMEOUT_S = 1800


def peer_envs() -> dict[str, Path | None]:
    """The peers' finished environments (built by `make bench-peers`), or None where absent."""
    root = home() / "peers"
    quantize = sorted(root.glob("llama.cpp-*/bin/llama-quantize"))
    builder = sorted(p / "bin" / "python" for p in root.glob("genai-builder-*") if (p / "pins.txt").is_file())
    return {"llama-quantize": quantize[-1] if quantize and (quantize[-1].parents[1] / "build.json").is_file()
            else None, "builder": builder[-1] if builder else None}


def peer_files(loaded, tmp: Path) -> tuple[list[dict], list[str]]:
    """([{label, path, kind}], notes on peers skipped)."""
    envs, files, notes = peer_envs(), [], []
    if envs["builder"] is None:
        notes.append("genai builder int4: skipped, no builder environment under home()/peers (make bench-peers)")
    elif loaded.folder is not None:
        out = tmp / "builder-int4"
        _run([str(envs["builder"]), "-m", "onnxruntime_genai.models.builder", "-i", str(loaded.folder), "-o",
              str(out), "-p", "int4", "-e", "cpu", "-c", str(tmp / "builder-cache")], "the genai model builder")
        files.append({"label": "genai builder int4", "path": out / "model.onnx", "kind": "onnx"})
    if envs["llama-quantize"] is None:
        notes.append("llama.cpp Q4_0: skipped, no llama.cpp build under home()/peers (make bench-peers)")
    elif loaded.gguf is not None:
        out = tmp / "Q4_0.gguf"
        _run([str(envs["llama-quantize"]), "--allow-requantize", str(loaded.gguf), str(out), "Q4_0", "2"],
             "llama-quantize to Q4_0")
        files.append({"label": "llama.cpp Q4_0", "path": out, "kind": "gguf"})
    return files, notes


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(["nice", "-n", "19", *cmd], capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0:
        raise SlimformerError(f"{what} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-2000:]}")


def bench_budget(recipe: Recipe, budgets: list[float], out: str | None = None) -> dict:
    from ..budget import search, uniform_baselines
    from ..ladder import export_structure
    from ..measure.ort_runner import save_inputs

    if recipe.budget is None:
        raise SlimformerError("bench-budget needs a recipe with a budget block (its search settings are used)")
    with bench_log("bench-budget", out), tempfile.TemporaryDirectory(prefix="slimformer-bench-budget-") as tmp:
        tmp, p = Path(tmp), prepare(recipe)
        loaded, latency = p.loaded, recipe.validate_.latency
        data = prepare_eval_data(loaded.tokenizer, recipe.validate_)
        inputs = tmp / "windows.npz"
        save_inputs(inputs, windows=data.windows)
        peers, notes = peer_files(loaded, tmp)
        for peer in peers:
            peer["file_mb"] = file_mb(peer["path"]) if peer["kind"] == "onnx" else peer["path"].stat().st_size / 1e6
        rungs = [BudgetRung(name=f"{b:g}MB", max_file_mb=b) for b in budgets]
        rungs += [BudgetRung(name=f"at-{_slug(q['label'])}", max_file_mb=q["file_mb"]) for q in peers]
        laddered = recipe.model_copy(update={"budget": recipe.budget.model_copy(update={"ladder": rungs})})
        scores = score(loaded.model, loaded.tokenizer, recipe.calibration, loaded.description)
        found = search(laddered, loaded, p.info, scores, calibration_windows(loaded.tokenizer, recipe.calibration),
                       data.windows)

        def scored(label, structure):
            pruned = drop(loaded.model, _plan(found.space.info, structure), loaded.tokenizer)
            path = export_structure(pruned, structure, found.evaluator, laddered, tmp / _slug(label))
            ppl = run_runner(path, tmp / f"{_slug(label)}.json", ["--perplexity"], inputs, latency)
            return {"label": label, "file_mb": file_mb(path), "perplexity": ppl["perplexity"]["perplexity"]}
        original = run_runner(baseline_onnx(loaded, recipe.export), tmp / "original.json", ["--perplexity"], inputs,
                              latency)["perplexity"]["perplexity"]
        searched = {r.name: scored(f"searched {r.name}", found.space.structure(found.chosen[r.name])) for r in rungs}
        uniform = [scored(label, st) for label, st in console.progress(
            uniform_baselines(found.space, scores, recipe.budget.search.baseline_drops), desc="uniform baselines")]
        for peer in peers:
            peer["perplexity"] = _peer_perplexity(peer, inputs, tmp, latency, data)
    result = {"model": loaded.description, "original_perplexity": original, "perplexity_tokens": int(
        data.windows[:, 1:].size), "budgets": budgets, "searched": searched, "uniform": uniform,
        "peers": [{k: (str(v) if k == "path" else v) for k, v in q.items()} for q in peers], "notes": notes,
        "search": recipe.budget.search.model_dump(mode="json")}
    write_json(out, result)
    print(markdown_table(result))
    return result


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-")


def _plan(info, structure):
    from ..artifacts import DropPlan

    n = info.num_layers
    return DropPlan(method="budget", attention=tuple(i for i in range(n) if not structure.attention[i]),
                    mlp=tuple(i for i in range(n) if not structure.mlp[i]), num_layers=n)


def _peer_perplexity(peer: dict, inputs: Path, tmp: Path, latency, data) -> float:
    if peer["kind"] == "onnx":
        return run_runner(peer["path"], tmp / f"{_slug(peer['label'])}.json", ["--perplexity"], inputs,
                          latency)["perplexity"]["perplexity"]
    from ..measure.ort_runner import perplexity
    from ..measure.torch_lm import TorchLM
    from ..model.loading import load_gguf_file

    model, _ = load_gguf_file(peer["path"])
    return perplexity(TorchLM(model), data.windows)["perplexity"]


def markdown_table(r: dict) -> str:
    base = r["original_perplexity"]
    lines = [f"Held-out perplexity, {r['perplexity_tokens']} tokens; original (fp32, undropped) {base:.3f}.", "",
             "| file budget MB | searched MB | searched perplexity | vs original | best uniform that fits | its MB | "
             "its perplexity | vs original | searched better |", "|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for name, s in r["searched"].items():
        limit = next((b for b in r["budgets"] if f"{b:g}MB" == name), None)
        if limit is None:
            continue
        fits = [u for u in r["uniform"] if u["file_mb"] <= limit]
        best = min(fits, key=lambda u: u["perplexity"]) if fits else None
        uni = (f"{best['label']} | {best['file_mb']:.1f} | {best['perplexity']:.3f} | {pct(best['perplexity'], base)}"
               if best else "none fits | | |")
        better = "yes" if best is None or s["perplexity"] <= best["perplexity"] else "no"
        lines.append(f"| {limit:g} | {s['file_mb']:.1f} | {s['perplexity']:.3f} | {pct(s['perplexity'], base)} | "
                     f"{uni} | {better} |")
    lines += ["", "| peer | file MB | perplexity | vs original | searched at that size | its perplexity | "
              "vs original | searched better |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for q in r["peers"]:
        s = r["searched"][f"at-{_slug(q['label'])}"]
        lines.append(f"| {q['label']} | {q['file_mb']:.1f} | {q['perplexity']:.3f} | {pct(q['perplexity'], base)} | "
                     f"{s['file_mb']:.1f} | {s['perplexity']:.3f} | {pct(s['perplexity'], base)} | "
                     f"{'yes' if s['perplexity'] < q['perplexity'] else 'no'} |")
    lines += [f"- {n}" for n in r["notes"]]
    lines += ["", "Uniform choices: " + "; ".join(f"{u['label']} {u['file_mb']:.1f} MB {u['perplexity']:.3f}"
                                                  for u in r["uniform"])]
    return "\n".join(lines)
