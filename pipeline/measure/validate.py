"""Validation in onnxruntime: the original and every variant of the compressed model, side by side.

Every file is measured by the self-contained `ort_runner` in a child process (peak RSS is then that of a process
that only runs the model, and the same runner runs on other targets). Accuracy (perplexity, multiple choice, the
teacher-forced parity trace) is deterministic: the original model's is cached beside its baseline ONNX under a
key of the file, the evaluation tokens and the settings, so a run scores only what it made. Latency is measured
every run, in interleaved rounds of original and variants, so that machine noise hits them alike.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import console
from ..artifacts import ModelFigures, Validation, ValidationSettings
from ..config.recipe import LatencySpec, ValidateSpec
from ..errors import SlimformerError
from ..rundir import sha256_json, staged_folder
from .judge import check_targets, variant_gates
from .kv import kv_bytes_at
from .reference import compare_traces

RUNNER_TIMEOUT_S = 3600
RUNNER = Path(__file__).with_name("ort_runner.py")


@dataclass(frozen=True)
class EvalData:
    """Token-level evaluation inputs, all from the held-out split."""

    windows: np.ndarray          # [n, seq] perplexity windows
    mc_items: list               # [(context_ids, [choice_ids...], answer)]
    parity_ids: np.ndarray       # [batch, seq] left-padded
    parity_mask: np.ndarray

    def key(self) -> str:
        """sha256 of every token the evaluation reads: equal keys, equal accuracy figures for one file."""
        return sha256_json({"windows": self.windows.tolist(), "mc": self.mc_items,
                            "parity": [self.parity_ids.tolist(), self.parity_mask.tolist()]})


def prepare_eval_data(tokenizer, spec: ValidateSpec) -> EvalData:
    from ..model.corpus import distractor_text, evaluation_text, multiple_choice_items, start_tokens, token_windows

    text = evaluation_text(spec.files)
    windows = token_windows(tokenizer, [text], spec.perplexity_windows, spec.seq_len)
    items = multiple_choice_items(text, distractor_text(spec.distractor_files), spec.mc_items, spec.seed)

    def encode(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    start = start_tokens(tokenizer)
    mc = [(start + encode(it.context), [encode(" " + c) for c in it.choices], it.answer) for it in items]
    # Parity batch: three held-out snippets of different lengths, left-padded like a real app batch.
    lengths = (24, 13, 19)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(lengths), max(lengths)), pad, np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = windows[row % len(windows), :n]
        mask[row, -n:] = 1
    return EvalData(windows=windows, mc_items=mc, parity_ids=ids, parity_mask=mask)


def run_runner(onnx_path: Path, out: Path, flags: list[str], inputs: Path | None, latency: LatencySpec) -> dict:
    """ort_runner.py on `onnx_path` in a child process; its JSON result."""
    cmd = [sys.executable, str(RUNNER), str(onnx_path), "--out", str(out), "--threads", str(latency.threads),
           "--prefill-tokens", str(latency.prefill_tokens), "--decode-context", str(latency.decode_context),
           "--decode-steps", str(latency.decode_steps), *flags, *(["--inputs", str(inputs)] if inputs else [])]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUNNER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SlimformerError(f"onnxruntime runner on {onnx_path} took over {RUNNER_TIMEOUT_S} s; "
                              "lower validate.perplexity_windows / mc_items") from None
    if proc.returncode != 0:
        raise SlimformerError(f"onnxruntime runner failed on {onnx_path}:\n{proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def file_mb(onnx_path: Path) -> float:
    """Size of an ONNX file with its external data, if any."""
    files = {onnx_path, *onnx_path.parent.glob(onnx_path.name + "*.data"), *onnx_path.parent.glob("*.onnx_data")}
    return sum(f.stat().st_size for f in files) / 1e6


def accuracy(onnx_path: Path, inputs: Path, workdir: Path, latency: LatencySpec, tag: str) -> dict:
    """Perplexity, multiple choice and the parity trace of one file: {perplexity, perplexity_tokens, mc_accuracy,
    kv_layers, kv_kb_per_token, onnxruntime, trace (list of [batch, vocab] logits)}."""
    out = run_runner(onnx_path, workdir / f"{tag}.accuracy.json", ["--perplexity", "--trace", "--mc"], inputs, latency)
    with np.load(out["trace"]["npz"]) as npz:
        trace = [np.asarray(x) for x in npz["logits"]]
    return {"perplexity": out["perplexity"]["perplexity"], "perplexity_tokens": out["perplexity"]["tokens"],
            "mc_accuracy": out["multiple_choice"]["accuracy"], "kv_layers": out["kv_layers"],
            "kv_kb_per_token": out["kv_bytes_per_token"] / 1024, "onnxruntime": out["onnxruntime"], "trace": trace}


def cached_accuracy(onnx_path: Path, inputs: Path, workdir: Path, latency: LatencySpec, cache: Path, key: dict,
                    tag: str = "original", keep_trace: bool = False) -> dict:
    """`accuracy` of a file that never changes (the undropped baseline; with `keep_trace`, a variant whose file
    hash is in `key`), computed once per `key` and kept in `cache` (one folder per key, written atomically)."""
    folder = Path(cache) / f"accuracy-{sha256_json(key)[:16]}"
    if (folder / "figures.json").is_file() and (not keep_trace or (folder / "trace.npz").is_file()):
        figures = json.loads((folder / "figures.json").read_text())
        if keep_trace:
            with np.load(folder / "trace.npz") as npz:
                figures["trace"] = [npz[f"step{i}"] for i in range(len(npz.files))]
        return {**figures, "cached": True}
    figures = accuracy(onnx_path, inputs, workdir, latency, tag)
    trace = figures.pop("trace")
    with staged_folder(folder) as tmp:
        (tmp / "figures.json").write_text(json.dumps(figures, indent=2))
        (tmp / "key.json").write_text(json.dumps(key, indent=2))
        if keep_trace:
            np.savez(tmp / "trace.npz", **{f"step{i}": step for i, step in enumerate(trace)})
    return {**figures, "cached": False, **({"trace": trace} if keep_trace else {})}


def model_sha256(onnx_path: Path) -> str:
    """sha256 over an ONNX file and its external data files, if any."""
    from ..rundir import sha256_file

    path = Path(onnx_path)
    files = sorted({path, *path.parent.glob(path.name + "*.data"), *path.parent.glob("*.onnx_data")})
    return sha256_json([sha256_file(f) for f in files])


def interleaved_latency(paths: dict[str, Path], latency: LatencySpec, workdir: Path) -> dict[str, dict]:
    """Prefill and decode timing and peak RSS of every file, one child process per file per round, files in
    the same order each round; the median of each figure over the rounds."""
    samples = {tag: [] for tag in paths}
    bar = console.progress(total=latency.rounds * len(paths), desc="latency")
    for round_ in range(latency.rounds):
        for tag, path in paths.items():
            out = run_runner(path, workdir / f"{tag}.latency-{round_}.json", ["--latency"], None, latency)
            samples[tag].append({**out["latency"], "peak_rss_mb": out["peak_rss_mb"]})
            bar.update()
    bar.close()
    return {tag: {k: float(np.median([s[k] for s in runs])) for k in
                  ("prefill_ms", "decode_ms_p50", "decode_ms_p90", "peak_rss_mb")} for tag, runs in samples.items()}


def write_runner_inputs(path: Path, pruned_model, data: EvalData, steps: int, mc: bool = True) -> list:
    """Write the runner's inputs.npz and return the pruned PyTorch model's parity trace. Every ONNX file
    decodes the PyTorch model's greedy tokens (teacher forcing), so each step is compared on one context."""
    from .ort_runner import save_inputs
    from .reference import torch_greedy_trace

    reference, tokens = torch_greedy_trace(pruned_model, data.parity_ids, data.parity_mask, steps)
    save_inputs(path, windows=data.windows, trace_input_ids=data.parity_ids, trace_attention_mask=data.parity_mask,
                trace_steps=steps, mc_items=data.mc_items if mc else None, trace_tokens=tokens)
    return reference


def validate(original_onnx: Path, variants: dict[str, Path], params_m: dict[str, float], pruned_model,
             data: EvalData, spec: ValidateSpec, workdir: Path, baseline_cache: Path,
             accuracy_cache: Path | None = None) -> Validation:
    """Measure the original file and every variant ('compressed' is the fp32 one). Each variant's logits are
    compared with the pruned PyTorch model on the parity batch and gated by `spec.gates_for(name)`.
    `params_m` holds the parameter count of 'original' and 'compressed' (variants share the latter's).
    With `accuracy_cache`, a variant's accuracy and trace are reused when its file and the tokens are unchanged."""
    inputs = workdir / "eval_inputs.npz"
    reference = write_runner_inputs(inputs, pruned_model, data, spec.parity_decode_steps)
    key = _accuracy_key(data, spec.latency)
    measured = {"original": cached_accuracy(original_onnx, inputs, workdir, spec.latency, baseline_cache, key)}
    for tag, path in variants.items():
        if accuracy_cache is None:
            measured[tag] = accuracy(path, inputs, workdir, spec.latency, tag)
        else:
            measured[tag] = cached_accuracy(path, inputs, workdir, spec.latency, accuracy_cache,
                                            {**key, "file": model_sha256(path), "trace_steps": spec.parity_decode_steps},
                                            tag, keep_trace=True)
    timing = interleaved_latency({"original": original_onnx, **variants}, spec.latency, workdir)
    models, parity, gates = {}, {}, []
    for tag, path in {"original": original_onnx, **variants}.items():
        acc, lat = measured[tag], timing[tag]
        models[tag] = ModelFigures(
            file_mb=file_mb(Path(path)), kv_layers=acc["kv_layers"], kv_kb_per_token=acc["kv_kb_per_token"],
            perplexity=acc["perplexity"], perplexity_tokens=acc["perplexity_tokens"], mc_accuracy=acc["mc_accuracy"],
            prefill_ms=lat["prefill_ms"], decode_p50_ms=lat["decode_ms_p50"], decode_p90_ms=lat["decode_ms_p90"],
            peak_rss_mb=lat["peak_rss_mb"], onnxruntime=acc["onnxruntime"],
            params_m=params_m["original" if tag == "original" else "compressed"],
            accuracy_cached=bool(acc.get("cached")), kv_bytes_at=kv_bytes_at(Path(path)))
        if tag != "original":
            parity[tag] = compare_traces(reference, acc["trace"])
            gates += variant_gates(spec.gates_for(tag), models["original"], models[tag], parity[tag], tag)
    rows = []
    if spec.targets:
        rows, target_gates = check_targets(spec.targets, variants, inputs, reference, workdir / "targets",
                                           spec.latency)
        gates += target_gates
    settings = ValidationSettings(
        threads=spec.latency.threads, prefill_tokens=spec.latency.prefill_tokens,
        decode_context=spec.latency.decode_context, decode_steps=spec.latency.decode_steps,
        latency_rounds=spec.latency.rounds, perplexity_tokens=models["original"].perplexity_tokens,
        mc_items=len(data.mc_items), onnxruntime=models["original"].onnxruntime)
    return Validation(models=models, parity=parity, targets=tuple(rows), gates=tuple(gates), settings=settings)


def _accuracy_key(data: EvalData, latency: LatencySpec) -> dict:
    """What the original's accuracy figures depend on besides the file (whose folder holds the cache): the
    evaluation tokens, the thread count (summation order), onnxruntime and the runner's code."""
    import onnxruntime

    from ..rundir import sha256_file

    return {"data": data.key(), "threads": latency.threads, "onnxruntime": onnxruntime.__version__,
            "runner": sha256_file(RUNNER)}
