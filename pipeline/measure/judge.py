"""Judging: measured figures against the recipe's gates and the targets' tolerances, as `Gate` records.

`variant_gates`: one variant on this host against the original model and the PyTorch reference.
`check_targets`: every variant on every target, each judged against the PyTorch reference, against this host
running the same file on the same tokens (logits and perplexity), with latency where the target's timing is real.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .. import console
from ..artifacts import Gate, ModelFigures, Parity, TargetRow
from ..config.recipe import GateSpec, LatencySpec
from ..config.targets import host_counterpart
from .reference import compare_traces
from .transports import run_on_target


def make_gates(limits: dict, measured: dict, variant: str, target: str | None = None) -> list[Gate]:
    """One Gate per limit that is set: `measured[name]` is (value, "<=" or ">=")."""
    gates = []
    for name, limit in limits.items():
        if limit is None or name not in measured:
            continue
        value, op = measured[name]
        passed = value <= limit if op == "<=" else value >= limit
        gates.append(Gate(variant=variant, name=name, value=float(value), limit=float(limit), passed=bool(passed),
                          target=target))
    return gates


def variant_gates(gates: GateSpec, original: ModelFigures, candidate: ModelFigures, parity: Parity,
                  variant: str) -> list[Gate]:
    measured = {
        "max_perplexity_increase_pct": (100 * (candidate.perplexity / original.perplexity - 1), "<="),
        "max_mc_accuracy_drop": (original.mc_accuracy - candidate.mc_accuracy, "<="),
        "min_top1_agreement": (parity.top1_agreement, ">="),
        "max_abs_logit_error": (parity.max_abs_error, "<="),
    }
    return make_gates(gates.model_dump(), measured, variant)


def judge(target, variant: str, host_result: dict, target_result: dict, reference_trace) -> list[Gate]:
    """Gates for one variant on one target: parity-trace logits and top-1 against the PyTorch reference, logits
    and perplexity against the host's run of the same file on the same tokens (`host_counterpart`)."""
    tol = target.tolerances_for(variant)
    if "trace" not in target_result or "trace" not in host_result:
        raise ValueError(f"target '{target.name}' and the host need parity traces; run both with --trace")
    logits = np.asarray(target_result["trace"]["logits"], np.float64)
    host_logits = np.asarray(host_result["trace"]["logits"], np.float64)
    stats = compare_traces(list(reference_trace), list(logits))
    measured = {"max_abs_logit_error": (stats.max_abs_error, "<="),
                "min_top1_agreement": (stats.top1_agreement, ">="),
                "max_rel_diff_vs_host": (_rel_diff(logits, host_logits), "<=")}
    if tol.max_perplexity_diff_pct is not None:
        host, here = host_result.get("perplexity"), target_result.get("perplexity")
        if host is None or here is None:
            raise ValueError(f"perplexity gate on target '{target.name}' needs --perplexity on host and target")
        if host["tokens"] != here["tokens"]:
            raise ValueError(f"target '{target.name}' scored {here['tokens']} tokens, the host {host['tokens']}; "
                             "run the host with the same windows (host_counterpart(target))")
        measured["max_perplexity_diff_pct"] = (100 * abs(here["perplexity"] / host["perplexity"] - 1), "<=")
    return make_gates(tol.model_dump(), measured, variant, target.name)


def _rel_diff(logits: np.ndarray, host_logits: np.ndarray) -> float:
    return float(np.abs(logits - host_logits).max() / max(float(np.abs(host_logits).max()), 1e-30))


def check_targets(targets: list, variants: dict[str, Path], inputs: Path, reference: list, workdir: Path,
                  latency: LatencySpec) -> tuple[list[TargetRow], list[Gate]]:
    """Every variant on every target; one row and its gates per (target, variant)."""
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
            rows.append(_row(target, variant, result, host, reference, seconds))
            console.say(f"  target {target.name} / {variant}: {seconds:.0f} s, max |logit - host| "
                        f"{rows[-1].max_abs_diff_vs_host:.2e}, perplexity {rows[-1].perplexity:.3f} "
                        f"(host {rows[-1].host_perplexity:.3f})")
    return rows, gates


def _row(target, variant: str, result: dict, host: dict, reference, seconds: float) -> TargetRow:
    vs_ref = compare_traces(list(reference), list(result["trace"]["logits"]))
    host_logits = np.asarray(host["trace"]["logits"], np.float64)
    logits = np.asarray(result["trace"]["logits"], np.float64)
    ppl, host_ppl = result["perplexity"]["perplexity"], host["perplexity"]["perplexity"]
    lat, info = result.get("latency") or {}, result["target"]
    return TargetRow(
        target=target.name, kind=target.kind, variant=variant, timing=result["timing"],
        cpu=info.get("cpu") or info.get("machine") or result.get("machine"),
        features=tuple(info["features"]) if info.get("features") is not None else None,
        onnxruntime=info.get("onnxruntime") or result.get("onnxruntime"), seconds=seconds,
        max_abs_logit_error=vs_ref.max_abs_error, top1_agreement=vs_ref.top1_agreement,
        max_abs_diff_vs_host=float(np.abs(logits - host_logits).max()),
        max_rel_diff_vs_host=_rel_diff(logits, host_logits), perplexity=ppl, host_perplexity=host_ppl,
        perplexity_tokens=result["perplexity"]["tokens"], perplexity_diff_pct=100 * (ppl / host_ppl - 1),
        prefill_ms=lat.get("prefill_ms"), decode_p50_ms=lat.get("decode_ms_p50"),
        decode_p90_ms=lat.get("decode_ms_p90"), peak_rss_mb=result.get("peak_rss_mb") if lat else None)
