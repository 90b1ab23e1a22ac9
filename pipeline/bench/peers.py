"""`make bench`, peer comparison: the path a user takes today without slimformer, beside slimformer's recipe.

Peer path, on the undropped model: optimum's command line (`optimum-cli export onnx --task
text-generation-with-past`), then onnxruntime's quantisers as their documentation shows them: int8 with
`quantize_dynamic` (per-channel, uint8 weights: the type onnxruntime advises on x86 without VNNI, where int8
weights overflow), 4-bit with `MatMulNBitsQuantizer` at slimformer's int4 settings (block size, symmetry,
accuracy level), so that the bit width and block layout match.
slimformer path: the recipe's drop, `pipeline.export.onnx`, and the recipe's onnx-int8 / onnx-int4 variants.
Every file is measured the same way in one run: file size, KV cache per token, held-out perplexity and
multiple-choice accuracy (ort_runner in a child process), decode ms/token timed in interleaved rounds.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from .. import console
from ..config.quantize import OnnxInt4Spec, OnnxInt8Spec
from ..config.recipe import Recipe
from ..errors import ExportError
from ..measure.validate import file_mb, interleaved_latency, prepare_eval_data, run_runner
from ..stages import drop, export, plan, prepare, quantize, score
from .common import bench_log, write_json

EXPORT_TIMEOUT_S = 1800
BITS = ("fp32", "int8", "int4")


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


def peer_quantize(fp32: Path, out_dir: Path, int4: OnnxInt4Spec) -> dict[str, Path]:
    """onnxruntime's int8 dynamic and 4-bit MatMulNBits quantisation of `fp32`, called directly."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    out = {"fp32": fp32, "int8": Path(out_dir) / "int8" / "model.onnx", "int4": Path(out_dir) / "int4" / "model.onnx"}
    for path in (out["int8"], out["int4"]):
        path.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(fp32, out["int8"], per_channel=True, weight_type=QuantType.QUInt8,
                     extra_options={"MatMulConstBOnly": True})
    config = DefaultWeightOnlyQuantConfig(block_size=int4.block_size, is_symmetric=int4.form != "asymmetric",
                                          accuracy_level=int4.accuracy_level)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out["int4"]), use_external_data_format=False)
    return out


def slimformer_files(recipe: Recipe, loaded, folder: Path) -> dict[str, Path]:
    """The recipe's drop, exported and quantised by slimformer's own stages (its first int8 and int4 specs,
    else their defaults)."""
    scores = score(loaded.model, loaded.tokenizer, recipe.calibration, loaded.description)
    pruned = drop(loaded.model, plan(scores, recipe.drop), loaded.tokenizer)
    fp32 = export(pruned, loaded.tokenizer, folder / "fp32", recipe.export)
    specs = [(_first(recipe, "onnx-int8") or OnnxInt8Spec(kind="onnx-int8")).model_copy(update={"name": "int8"}),
             (_first(recipe, "onnx-int4") or OnnxInt4Spec(kind="onnx-int4")).model_copy(update={"name": "int4"})]
    return {"fp32": fp32.path, **quantize(fp32, specs, folder, pruned, loaded, recipe.calibration,
                                          recipe.export.opset)}


def _first(recipe: Recipe, kind: str):
    return next((q for q in recipe.quantize if q.kind == kind), None)


def compare(recipe: Recipe, out: str | None = None) -> list[dict]:
    """Measure the peer path and slimformer's at fp32, int8 and 4-bit; print and return one row per file."""
    from ..measure.ort_runner import save_inputs

    with bench_log("peers", out), tempfile.TemporaryDirectory(prefix="slimformer-peers-") as tmp:
        p = prepare(recipe)
        if p.loaded.folder is None:
            raise ExportError("the peer comparison runs optimum-cli on a Hugging Face folder; use a packaged or hf "
                              "model source, not gguf")
        int4 = _first(recipe, "onnx-int4") or OnnxInt4Spec(kind="onnx-int4")
        data = prepare_eval_data(p.loaded.tokenizer, recipe.validate_)
        tmp = Path(tmp)
        console.say("peer path: optimum-cli export + onnxruntime quantisation ...")
        peer = optimum_cli_export(p.loaded.folder, tmp / "peer" / "fp32", recipe.export.opset)
        files = {("optimum+onnxruntime", b): path for b, path in peer_quantize(peer, tmp / "peer", int4).items()}
        console.say("slimformer path: score, drop, export, quantise ...")
        files |= {("slimformer", b): path for b, path in slimformer_files(recipe, p.loaded, tmp / "slim").items()}
        inputs = tmp / "inputs.npz"
        save_inputs(inputs, windows=data.windows, mc_items=data.mc_items)
        rows = []
        for (path_name, bits), path in files.items():
            acc = run_runner(path, tmp / f"{path_name}-{bits}.json", ["--perplexity", "--mc"], inputs,
                             recipe.validate_.latency)
            rows.append({"path": path_name, "bits": bits, "file_mb": file_mb(path),
                         "kv_kb_per_token": acc["kv_bytes_per_token"] / 1024,
                         "perplexity": acc["perplexity"]["perplexity"], "mc_accuracy": acc["multiple_choice"]["accuracy"]})
            console.say(f"  {path_name} {bits}: {rows[-1]['file_mb']:.1f} MB, perplexity {rows[-1]['perplexity']:.3f}, "
                        f"MC {rows[-1]['mc_accuracy']:.3f}")
        latency = recipe.validate_.latency
        console.say(f"timing {len(files)} files, {latency.rounds} interleaved rounds ...")
        timing = interleaved_latency({f"{k[0]}-{k[1]}": v for k, v in files.items()}, latency, tmp)
        for row in rows:
            row["decode_p50_ms"] = timing[f"{row['path']}-{row['bits']}"]["decode_ms_p50"]
    settings = {"perplexity_tokens": int(data.windows.size - len(data.windows)), "mc_items": len(data.mc_items),
                "threads": latency.threads, "decode_context": latency.decode_context, "rounds": latency.rounds,
                "int4": int4.model_dump(mode="json")}
    write_json(out, {"model": p.loaded.description, "rows": rows, "settings": settings})
    print(markdown_table(rows))
    return rows


def markdown_table(rows: list[dict]) -> str:
    """Both paths at each bit width against the undropped fp32 file (the peer's), then slimformer / peer ratios."""
    by = {(r["path"], r["bits"]): r for r in rows}
    peer_fp32 = by[("optimum+onnxruntime", "fp32")]
    lines = ["| bits | path | file MB | size vs fp32 undropped | KV KB/token | perplexity | vs fp32 undropped | "
             "MC accuracy | decode ms/token | decode vs fp32 undropped |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for bits in BITS:
        for name in ("optimum+onnxruntime", "slimformer"):
            r = by[(name, bits)]
            lines.append(f"| {bits} | {name} | {r['file_mb']:.1f} | {r['file_mb'] / peer_fp32['file_mb']:.3f} | "
                         f"{r['kv_kb_per_token']:.1f} | {r['perplexity']:.3f} | "
                         f"{100 * (r['perplexity'] / peer_fp32['perplexity'] - 1):+.1f} % | {r['mc_accuracy']:.3f} | "
                         f"{r['decode_p50_ms']:.2f} | {r['decode_p50_ms'] / peer_fp32['decode_p50_ms']:.3f}x |")
    lines += ["", "| bits | size slimformer / peer | KV | perplexity | MC accuracy (difference) | decode ms/token |",
              "|---|---:|---:|---:|---:|---:|"]
    for bits in BITS:
        s, p = by[("slimformer", bits)], by[("optimum+onnxruntime", bits)]
        lines.append(f"| {bits} | {s['file_mb'] / p['file_mb']:.3f}x | {s['kv_kb_per_token'] / p['kv_kb_per_token']:.3f}x | "
                     f"{s['perplexity'] / p['perplexity']:.3f}x | {s['mc_accuracy'] - p['mc_accuracy']:+.3f} | "
                     f"{s['decode_p50_ms'] / p['decode_p50_ms']:.3f}x |")
    return "\n".join(lines)
