"""`make bench-peers`: slimformer's recipe against what a mobile team can run today, measured in one run.

Rows: the undropped model exported by optimum-cli (fp32); the recipe's drop exported, quantised and packaged by
the same stage functions as a run (fp32, int8, 4-bit, timed through their onnxruntime-genai folders);
onnxruntime-genai's model builder (int4, fp32) on the undropped model; llama.cpp on the shipped Q4_1 GGUF and on
Q8_0, Q4_K_M and F32 files re-quantised from it. Every path is timed as its users run it (peer_timing), with the
same threads, prompt and decode length, in interleaved rounds. ONNX perplexity: the recipe's held-out windows
through ort_runner; llama.cpp's: llama-perplexity on the text of the same windows (its own scoring).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import console
from ..config.quantize import OnnxInt4Spec, OnnxInt8Spec
from ..config.recipe import Recipe
from ..errors import ExportError, SlimformerError
from ..measure.validate import file_mb, prepare_eval_data, run_runner
from ..stages import drop, export, package, plan, prepare, quantize, score
from .common import bench_log, write_json
from .peer_envs import ensure_builder_env, ensure_llama_cpp
from .peer_models import BUILDER_PRECISIONS, build_with_builder, derived_ggufs
from .peer_timing import TimingSpec, interleaved, llama_perplexity

EXPORT_TIMEOUT_S = 1800
OPTIMUM = "ONNX fp32 undropped (optimum export)"
SLIM = {"fp32": "slimformer fp32 (the recipe's drop)", "int8": "slimformer int8", "int4": "slimformer 4-bit"}
BUILDER = {"int4": "genai builder int4 (undropped)", "fp32": "genai builder fp32"}
LLAMA = {"Q4_1": "llama.cpp Q4_1 (shipped GGUF)", "Q8_0": "llama.cpp Q8_0", "Q4_K_M": "llama.cpp Q4_K_M",
         "F32": "llama.cpp F32"}
# (numerator, denominator, target): slimformer's decode against each peer's
TARGETS = ((SLIM["int4"], LLAMA["Q4_1"], 0.9), (SLIM["int4"], BUILDER["int4"], 0.9), (SLIM["fp32"], LLAMA["F32"], 1.0))


@dataclass(frozen=True)
class PeerFile:
    """One row: the file that is scored, what is timed (a genai folder or the GGUF itself), how it was made."""

    label: str
    kind: str        # "genai" (ONNX through onnxruntime-genai) or "gguf" (llama.cpp)
    model: Path      # the .onnx or .gguf file
    timed: Path      # the genai folder, or the .gguf file
    reference: str   # the row its perplexity is compared with ("vs its fp32")
    made: str


def compare(recipe: Recipe, out: str | None = None, threads: int | None = None, rounds: int | None = None,
            repeats: int = 3) -> dict:
    """Make every row's file, score and time them all, print the table; return (and write) the results.
    Threads and rounds default to the recipe's validate.latency."""
    source = _source_gguf(recipe)
    latency = recipe.validate_.latency
    spec = TimingSpec(threads=threads or latency.threads, rounds=rounds or latency.rounds, repeats=repeats)
    with bench_log("peers", out) as log, tempfile.TemporaryDirectory(prefix="slimformer-peers-") as tmp:
        tmp = Path(tmp)
        console.say("peer environments (built once; llama.cpp takes about 20 minutes on 2 cores) ...")
        tools, builder_python = ensure_llama_cpp() / "bin", ensure_builder_env()
        p = prepare(recipe)
        files = onnx_files(recipe, p.loaded, builder_python, tmp, log)
        files += gguf_files(source, tools / "llama-quantize", spec.threads)
        data = prepare_eval_data(p.loaded.tokenizer, recipe.validate_)
        console.say(f"perplexity of {len(files)} files ...")
        scores = perplexities(files, data, p.loaded.tokenizer, latency.model_copy(update={"threads": spec.threads}),
                              tools, tmp)
        console.say(f"timing {len(files)} paths, {spec.rounds} interleaved rounds ...")
        timing = interleaved({f.label: (f.kind, f.timed) for f in files}, spec, tools / "llama-bench", tmp)
        sizes = {f.label: _size_mb(f) for f in files}  # before the temporary folder goes
    rows = [{"path": f.label, "runtime": f.kind, "file_mb": sizes[f.label], **timing[f.label], **scores[f.label],
             "vs_fp32": scores[f.label]["perplexity"] / scores[f.reference]["perplexity"], "reference": f.reference,
             "made": f.made} for f in files]
    result = {"model": p.loaded.description, "rows": rows, "ratios": ratios(rows), "settings": asdict(spec)}
    write_json(out, result)
    print(markdown_table(result))
    return result


def _source_gguf(recipe: Recipe) -> Path:
    """The GGUF llama.cpp runs: the packaged model's shipped file (the only source with both a GGUF and a
    Hugging Face folder, which optimum-cli and the genai builder need)."""
    if recipe.model.source != "packaged":
        raise SlimformerError(f"the peer comparison needs the model both as GGUF (llama.cpp) and as a Hugging Face "
                              f"folder (optimum-cli, the genai builder); model source {recipe.model.source!r} gives "
                              "one of them. Use `model: {source: packaged}`.")
    from ..model.loading import source_gguf

    return source_gguf("packaged", recipe.model.name)


def onnx_files(recipe: Recipe, loaded, builder_python: Path, tmp: Path, log: Path) -> list[PeerFile]:
    """optimum-cli's undropped export, slimformer's recipe, and the genai builder's int4 and fp32 folders."""
    from ..export.mobile import write_genai_folder

    console.say("optimum-cli export of the undropped model ...")
    undropped = optimum_cli_export(loaded.folder, tmp / "optimum", recipe.export.opset)
    genai = write_genai_folder(undropped, loaded.model.config, loaded.tokenizer, tmp / "optimum-genai")
    files = [PeerFile(OPTIMUM, "genai", undropped, genai, OPTIMUM, "optimum-cli export onnx --task "
                      "text-generation-with-past; genai_config.json written by slimformer")]
    console.say("slimformer: score, drop, export, quantise, package ...")
    for name, (model, folder) in slimformer_files(recipe, loaded, tmp / "slim").items():
        files.append(PeerFile(SLIM[name], "genai", model, folder, OPTIMUM, f"the recipe's drop, then its {name} "
                              "file, from the run's stage functions"))
    console.say("onnxruntime-genai model builder: int4 and fp32 ...")
    for precision in BUILDER_PRECISIONS:
        folder = build_with_builder(builder_python, loaded.folder, tmp / f"builder-{precision}", precision, log)
        files.append(PeerFile(BUILDER[precision], "genai", folder / "model.onnx", folder,
                              BUILDER["fp32"] if precision == "int4" else OPTIMUM,
                              f"python -m onnxruntime_genai.models.builder -p {precision} -e cpu"))
    return files


def optimum_cli_export(hf_folder: Path, out_dir: Path, opset: int) -> Path:
    """`optimum-cli export onnx` of a Hugging Face folder, as a user would run it; returns model.onnx."""
    cmd = [sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model", str(hf_folder),
           "--task", "text-generation-with-past", "--opset", str(opset), str(out_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ExportError(f"optimum-cli export of {hf_folder} took over {EXPORT_TIMEOUT_S} s") from None
    path = Path(out_dir) / "model.onnx"
    if proc.returncode != 0 or not path.is_file():
        raise ExportError(f"optimum-cli export of {hf_folder} failed (exit {proc.returncode}):\n"
                          f"{(proc.stdout + proc.stderr)[-2000:]}")
    return path


def slimformer_files(recipe: Recipe, loaded, folder: Path) -> dict[str, tuple[Path, Path]]:
    """{name: (model.onnx, genai folder)} for fp32, int8 and int4: the recipe's drop, exported, quantised and
    packaged by the run's own stage functions (the recipe's first int8 and int4 specs, else their defaults)."""
    scores = score(loaded.model, loaded.tokenizer, recipe.calibration, loaded.description)
    pruned = drop(loaded.model, plan(scores, recipe.drop), loaded.tokenizer)
    exported = export(pruned, loaded.tokenizer, folder / "onnx", recipe.export)
    specs = [(_first(recipe, "onnx-int8") or OnnxInt8Spec(kind="onnx-int8")).model_copy(update={"name": "int8"}),
             (_first(recipe, "onnx-int4") or OnnxInt4Spec(kind="onnx-int4")).model_copy(update={"name": "int4"})]
    variants = {"fp32": exported.path, **quantize(exported, specs, folder, pruned, loaded, recipe.calibration,
                                                  recipe.export.opset)}
    only_genai = recipe.export.model_copy(update={"genai": True, "ort_format": False, "coreml": None})
    packages = package(variants, pruned, loaded.tokenizer, only_genai, folder)
    return {name: (path, packages.genai[name].path) for name, path in variants.items()}


def _first(recipe: Recipe, kind: str):
    return next((q for q in recipe.quantize if q.kind == kind), None)


def gguf_files(source: Path, quantize_tool: Path, threads: int) -> list[PeerFile]:
    """The shipped GGUF and the types llama-quantize re-quantises from it."""
    files = [PeerFile(LLAMA["Q4_1"], "gguf", source, source, LLAMA["F32"], f"{source.name} as shipped")]
    for kind, path in derived_ggufs(source, quantize_tool, threads).items():
        files.append(PeerFile(LLAMA[kind], "gguf", path, path, LLAMA["F32"],
                              f"llama-quantize --allow-requantize {source.name} {kind} (from the Q4_1 weights)"))
    return files


def perplexities(files: list[PeerFile], data, tokenizer, latency, tools: Path, tmp: Path) -> dict:
    """{label: {perplexity, scorer}}: ONNX files on the held-out windows (ort_runner), GGUF files with
    llama-perplexity on the text of those windows, one chunk per window."""
    from ..measure.ort_runner import save_inputs

    inputs, text = tmp / "windows.npz", tmp / "held-out.txt"
    save_inputs(inputs, windows=data.windows)
    text.write_text(tokenizer.decode(data.windows.reshape(-1).tolist()))
    n, seq = data.windows.shape
    scores = {}
    for i, f in enumerate(console.progress(files, desc="perplexity")):
        if f.kind == "genai":
            result = run_runner(f.model, tmp / f"perplexity-{i}.json", ["--perplexity"], inputs, latency)
            scores[f.label] = {"perplexity": result["perplexity"]["perplexity"], "scorer": "ort_runner", "windows": n}
        else:
            result = llama_perplexity(tools / "llama-perplexity", f.model, text, latency.threads, context=seq,
                                      chunks=n)
            scores[f.label] = {"perplexity": result["perplexity"], "scorer": "llama-perplexity",
                               "windows": result["chunks"]}
    return scores


def _size_mb(f: PeerFile) -> float:
    return file_mb(f.model) if f.kind == "genai" else f.model.stat().st_size / 1e6


def ratios(rows: list[dict]) -> list[dict]:
    """slimformer's decode ms/token over each peer's, with its target (at most)."""
    by = {r["path"]: r for r in rows}
    return [{"numerator": a, "denominator": b, "target": target,
             "ratio": by[a]["decode_ms_per_token"] / by[b]["decode_ms_per_token"]}
            for a, b, target in TARGETS if a in by and b in by]


def markdown_table(result: dict) -> str:
    """The rows, how each file was made, and the decode ratios against their targets."""
    rows, settings = result["rows"], result["settings"]
    lines = [f"| path | file MB | decode ms/token | prefill ms ({settings['prompt_tokens']} tokens) | "
             "held-out perplexity | vs its fp32 |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        mark = " *" if r["scorer"] == "llama-perplexity" else ""
        lines.append(f"| {r['path']} | {r['file_mb']:.1f} | {r['decode_ms_per_token']:.2f} | {r['prefill_ms']:.1f} | "
                     f"{r['perplexity']:.3f}{mark} | {r['vs_fp32']:.3f}x |")
    lines += ["", f"{settings['threads']} thread(s); decode: {settings['new_tokens']} tokens after a "
              f"{settings['prompt_tokens']}-token prompt; median of {settings['rounds']} interleaved rounds of "
              f"{settings['repeats']} repeats.",
              "Perplexity: ONNX rows on the held-out windows (every token of each window); * llama-perplexity on "
              "the text of the same windows, one chunk each, scoring only the second half of each chunk: compare "
              "it with the other llama.cpp rows only. \"vs its fp32\" is against the row named below.", ""]
    lines += [f"- {r['path']}: {r['made']}; vs {r['reference']}" for r in rows]
    lines += ["", "| slimformer decode / peer decode | ratio | target | |", "|---|---:|---:|---|"]
    for q in result["ratios"]:
        verdict = "met" if q["ratio"] <= q["target"] else "missed"
        lines.append(f"| {q['numerator']} / {q['denominator']} | {q['ratio']:.3f}x | <= {q['target']}x | {verdict} |")
    return "\n".join(lines)
