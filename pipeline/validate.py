"""Validation in onnxruntime: original vs compressed ONNX on held-out text, plus ONNX-vs-PyTorch parity.

Every model is measured by `pipeline.ort_runner` in a child process (so peak RSS is that of a process
that only runs the model, and the same runner can later run on other targets); this module prepares
the inputs, reads the results back, and applies the recipe's gates.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SlimformerError
from .recipe import GateSpec, LatencySpec, ValidateSpec

RUNNER_TIMEOUT_S = 3600


@dataclass(frozen=True)
class EvalData:
    """Token-level evaluation inputs, all from the held-out split."""

    windows: np.ndarray          # [n, seq] perplexity windows
    mc_items: list               # [(context_ids, [choice_ids...], answer)]
    parity_ids: np.ndarray       # [batch, seq] left-padded
    parity_mask: np.ndarray


def prepare_eval_data(tokenizer, spec: ValidateSpec) -> EvalData:
    from .corpus import distractor_text, evaluation_text, multiple_choice_items, token_windows

    text = evaluation_text(spec.files)
    windows = token_windows(tokenizer, [text], spec.perplexity_windows, spec.seq_len)
    items = multiple_choice_items(text, distractor_text(spec.distractor_files), spec.mc_items, spec.seed)

    def encode(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    mc = [(encode(it.context), [encode(" " + c) for c in it.choices], it.answer) for it in items]
    # Parity batch: three held-out snippets of different lengths, left-padded like a real app batch.
    lengths = (24, 13, 19)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(lengths), max(lengths)), pad, np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = windows[row % len(windows), :n]
        mask[row, -n:] = 1
    return EvalData(windows=windows, mc_items=mc, parity_ids=ids, parity_mask=mask)


def run_runner(onnx_path: Path, out: Path, flags: list[str], inputs: Path | None, spec: ValidateSpec) -> dict:
    lat = spec.latency
    cmd = [sys.executable, "-m", "pipeline.ort_runner", str(onnx_path), "--out", str(out),
           "--threads", str(lat.threads), "--prefill-tokens", str(lat.prefill_tokens),
           "--decode-context", str(lat.decode_context), "--decode-steps", str(lat.decode_steps), *flags]
    if inputs is not None:
        cmd += ["--inputs", str(inputs)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUNNER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SlimformerError(f"onnxruntime runner on {onnx_path} took over {RUNNER_TIMEOUT_S} s; "
                              "lower validate.perplexity_windows / mc_items") from None
    if proc.returncode != 0:
        raise SlimformerError(f"onnxruntime runner failed on {onnx_path}:\n{proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def measure_onnx(onnx_path: Path, inputs: Path, workdir: Path, spec: ValidateSpec, tag: str) -> dict:
    """Accuracy figures (and the parity trace) in one child process, latency and peak RSS in another."""
    acc = run_runner(onnx_path, workdir / f"{tag}.accuracy.json", ["--perplexity", "--mc", "--trace"], inputs, spec)
    lat = run_runner(onnx_path, workdir / f"{tag}.latency.json", ["--latency"], None, spec)
    files = [onnx_path, *onnx_path.parent.glob(onnx_path.name + "*.data"), *onnx_path.parent.glob("*.onnx_data")]
    return {
        "file_mb": sum(f.stat().st_size for f in set(files)) / 1e6,
        "kv_layers": acc["kv_layers"],
        "kv_kb_per_token": acc["kv_bytes_per_token"] / 1024,
        "perplexity": acc["perplexity"]["perplexity"],
        "perplexity_tokens": acc["perplexity"]["tokens"],
        "mc_accuracy": acc["multiple_choice"]["accuracy"],
        "prefill_ms": lat["latency"]["prefill_ms"],
        "decode_p50_ms": lat["latency"]["decode_ms_p50"],
        "decode_p90_ms": lat["latency"]["decode_ms_p90"],
        "peak_rss_mb": lat["peak_rss_mb"],
        "onnxruntime": lat["onnxruntime"],
        "trace_npz": acc["trace"]["npz"],
    }


def evaluate_gates(gates: GateSpec, original: dict, candidate: dict, parity: dict, variant: str) -> list[dict]:
    """Each gate set in `gates` becomes {variant, name, value, limit, passed} for one variant."""
    measured = {
        "max_perplexity_increase_pct": (100 * (candidate["perplexity"] / original["perplexity"] - 1), "<="),
        "max_mc_accuracy_drop": (original["mc_accuracy"] - candidate["mc_accuracy"], "<="),
        "min_top1_agreement": (parity["top1_agreement"], ">="),
        "max_abs_logit_error": (parity["max_abs_error"], "<="),
    }
    results = []
    for name, limit in gates.model_dump().items():
        if limit is None:
            continue
        value, op = measured[name]
        results.append({"variant": variant, "name": name, "value": float(value), "limit": float(limit),
                        "passed": bool(value <= limit if op == "<=" else value >= limit)})
    return results


def gate_failures(validation: dict) -> list[str]:
    return [f"{g['variant']}{' on ' + g['target'] if g.get('target') else ''}: {g['name']}: measured "
            f"{g['value']:.4g}, limit {g['limit']:.4g}" for g in validation["gates"] if not g["passed"]]


def check_targets(targets: list, variants: dict[str, Path], inputs: Path, reference: list, workdir: Path,
                  latency: LatencySpec) -> dict:
    """Every variant on every target: logits against the PyTorch reference and against the host running the
    same file, perplexity against the host on the same windows, and latency and peak RSS where timing is real.
    Returns {"rows": one per (target, variant), "gates": judge()'s gates}."""
    import time

    from .reference import compare_traces
    from .targets import host_counterpart, judge, run_on_target

    timing = ["--latency", "--prefill-tokens", str(latency.prefill_tokens), "--decode-context",
              str(latency.decode_context), "--decode-steps", str(latency.decode_steps)]
    rows, gates, host_runs = [], [], {}
    for target in targets:
        for variant, path in variants.items():
            key = (variant, target.perplexity_windows, target.perplexity_tokens)
            if key not in host_runs:  # the host's figures for the same file and tokens, computed once
                host_runs[key] = run_on_target(host_counterpart(target), path, inputs,
                                               workdir / "-".join(map(str, ("host", *key))),
                                               latency.threads, ["--trace", "--perplexity"])
            host = host_runs[key]
            start = time.perf_counter()
            flags = ["--trace", "--perplexity", *(timing if target.kind != "arm64-emulated" else [])]
            result = run_on_target(target, path, inputs, workdir / f"{target.name}-{variant}", latency.threads, flags)
            seconds = time.perf_counter() - start
            gates += judge(target, variant, host, result, reference)
            vs_ref = compare_traces(list(reference), list(result["trace"]["logits"]))
            host_logits, logits = np.asarray(host["trace"]["logits"]), np.asarray(result["trace"]["logits"])
            vs_host = float(np.abs(logits.astype(np.float64) - host_logits).max())
            ppl, host_ppl = result["perplexity"]["perplexity"], host["perplexity"]["perplexity"]
            lat = result.get("latency") or {}
            info = result["target"]
            rows.append({
                "target": target.name, "kind": target.kind, "variant": variant, "timing": result["timing"],
                "cpu": info.get("cpu") or info.get("machine") or result.get("machine"), "features": info.get("features"),
                "onnxruntime": info.get("onnxruntime") or result.get("onnxruntime"), "seconds": seconds,
                "max_abs_logit_error": vs_ref["max_abs_error"], "top1_agreement": vs_ref["top1_agreement"],
                "max_abs_diff_vs_host": vs_host,
                "max_rel_diff_vs_host": vs_host / float(np.abs(host_logits).max()),
                "perplexity": ppl, "host_perplexity": host_ppl, "perplexity_tokens": result["perplexity"]["tokens"],
                "perplexity_diff_pct": 100 * (ppl / host_ppl - 1),
                "prefill_ms": lat.get("prefill_ms"), "decode_p50_ms": lat.get("decode_ms_p50"),
                "decode_p90_ms": lat.get("decode_ms_p90"), "peak_rss_mb": result.get("peak_rss_mb") if lat else None})
            print(f"  target {target.name} / {variant}: {seconds:.0f} s, max |logit - host| {vs_host:.2e}, "
                  f"perplexity {ppl:.3f} (host {host_ppl:.3f})", file=sys.stderr, flush=True)
    return {"rows": rows, "gates": gates}


def write_runner_inputs(path: Path, pruned_model, data: EvalData, steps: int, mc: bool = True) -> list:
    """Write the runner's inputs.npz and return the pruned PyTorch model's parity trace. Every ONNX file
    decodes the PyTorch model's greedy tokens (teacher forcing), so each step is compared on one context."""
    from .ort_runner import save_inputs
    from .reference import torch_greedy_trace

    reference, tokens = torch_greedy_trace(pruned_model, data.parity_ids, data.parity_mask, steps)
    save_inputs(path, windows=data.windows, trace_input_ids=data.parity_ids, trace_attention_mask=data.parity_mask,
                trace_steps=steps, mc_items=data.mc_items if mc else None, trace_tokens=tokens)
    return reference


def validate(original_onnx: Path, variants: dict[str, Path], original_model, pruned_model, data: EvalData,
             spec: ValidateSpec, workdir: Path, variant_gates: dict[str, GateSpec] | None = None) -> dict:
    """Measure the original ONNX file and every variant of the compressed model ('compressed' is the fp32
    one); each variant's logits are compared with the pruned PyTorch model on the parity batch.
    A variant is gated by `variant_gates[name]` when given, else by the recipe's validate.gates."""
    from .reference import compare_traces

    inputs = workdir / "eval_inputs.npz"
    reference = write_runner_inputs(inputs, pruned_model, data, spec.parity_decode_steps)
    models, parity, gates = {}, {}, []
    for tag, path in {"original": original_onnx, **variants}.items():
        figures = measure_onnx(Path(path), inputs, workdir, spec, tag)
        trace = list(np.load(figures.pop("trace_npz"))["logits"])
        figures["params_m"] = sum(p.numel() for p in (original_model if tag == "original" else pruned_model)
                                  .parameters()) / 1e6
        models[tag] = figures
        if tag == "original":
            continue
        parity[tag] = {**compare_traces(reference, trace), "batch": int(len(data.parity_ids)),
                       "decode_steps": spec.parity_decode_steps}
        gate_spec = (variant_gates or {}).get(tag, spec.gates)
        gates += evaluate_gates(gate_spec, models["original"], figures, parity[tag], tag)
    settings = {"threads": spec.latency.threads, "prefill_tokens": spec.latency.prefill_tokens,
                "decode_context": spec.latency.decode_context, "decode_steps": spec.latency.decode_steps,
                "perplexity_tokens": models["original"]["perplexity_tokens"], "mc_items": len(data.mc_items),
                "onnxruntime": models["original"]["onnxruntime"]}
    targets = {"rows": [], "gates": []}
    if spec.targets:
        targets = check_targets(spec.targets, variants, inputs, reference, workdir / "targets", spec.latency)
    gates += targets["gates"]
    return {"models": models, "parity": parity, "targets": targets["rows"], "gates": gates,
            "passed": all(g["passed"] for g in gates), "settings": settings}
