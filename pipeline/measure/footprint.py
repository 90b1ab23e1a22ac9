"""A target's runtime costs for the budget's cost model, measured once and cached: peak memory under the memory
protocol (`ort_runner.memory_protocol`: load, prefill `context` tokens in chunks, decode) and decode time per
token, on seven synthetic fused files of the model's shape that vary one cost at a time (bit width of the
linears and of the table, block size, offsets, KV cache), each written with an fp32 and an fp16 KV cache and
fitted per KV precision by least squares to the cost model's features (`pipeline.model.costs.runtime_features`).

Synthetic files carry random codes: memory and time do not depend on the values, so no weights are loaded and
the calibration can run before a budget is checked (`stages.preflight`). Cached under home()/footprint by the
target, the model's shape, the context, the threads, onnxruntime, the runner's code and the files' list.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import console
from ..artifacts import FootprintCalibration, FootprintPoint, ModelInfo
from ..config.paths import home
from ..model.costs import DECODE_FEATURES, MEMORY_FEATURES, runtime_features
from ..model.structure import KV_BYTES, TABLE, Structure, quant_format
from ..rundir import sha256_file, sha256_json, staged_folder
from .transports import RUNNER, run_on_target

# label -> (linear bits, block size, grid, table bits, table grid, attention kept on every other layer only)
FILES = {"4-bit": (4, 32, "symmetric", 4, "symmetric", False),
         "8-bit": (8, 32, "symmetric", 8, "symmetric", False),
         "4-bit, 8-bit table": (4, 32, "symmetric", 8, "symmetric", False),
         "4-bit, block 128": (4, 128, "symmetric", 4, "symmetric", False),
         "4-bit offsets, symmetric table": (4, 32, "offset", 4, "symmetric", False),
         "4-bit offsets": (4, 32, "offset", 4, "offset", False),
         "4-bit, half the attention": (4, 32, "symmetric", 4, "symmetric", True)}


# The least a feature's MiB can cost at the peak: a filled KV cache is resident at least once.
FLOORS = {"kv_mib": 1.0}


def calibration(info: ModelInfo, target, context: int, threads: int,
                kv_dtypes: tuple[str, ...] = tuple(KV_BYTES)) -> FootprintCalibration:
    """The target's calibration for this model shape and context, each KV precision of `kv_dtypes` measured on
    first use and cached on its own (the budget check measures only the smallest one it needs)."""
    import onnxruntime

    parts = [_precision(info, target, context, threads, kv) for kv in kv_dtypes]
    return fit([p for c in parts for p in c.points], target.name, context, threads, onnxruntime.__version__,
               sum(c.seconds for c in parts))


def _precision(info: ModelInfo, target, context: int, threads: int, kv: str) -> FootprintCalibration:
    """One KV precision's measured points (fitted on read: the points are the measurement)."""
    import onnxruntime

    shape = {k: v for k, v in info.to_json().items() if k != "source"}
    key = {"target": target.model_dump(mode="json"), "shape": shape, "context": context, "threads": threads,
           "onnxruntime": onnxruntime.__version__, "runner": sha256_file(RUNNER), "files": FILES, "kv": kv}
    folder = home() / "footprint" / sha256_json(key)[:20]
    if (folder / FootprintCalibration.filename).is_file():
        return FootprintCalibration.read(folder)
    console.say(f"budget: measuring {target.name}'s memory and decode time for this model shape at {context} "
                f"tokens with an {kv} KV cache (once; cached) ...")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slimformer-footprint-") as tmp:
        points = [_measure(info, label, calibration_structure(info, *spec, kv), target, context, threads, Path(tmp))
                  for label, spec in console.progress(FILES.items(), desc="calibration", total=len(FILES))]
    result = fit(points, target.name, context, threads, onnxruntime.__version__, time.perf_counter() - start)
    with staged_folder(folder) as work:
        result.write(work)
        (work / "key.json").write_text(json.dumps(key, indent=2) + "\n")
    return result


def calibration_structure(info: ModelInfo, bits: int, block: int, grid: str, table_bits: int, table_grid: str,
                          half_attention: bool, kv_dtype: str = "fp32") -> Structure:
    n = info.num_layers
    attention = tuple(i % 2 == 0 for i in range(n)) if half_attention else (True,) * n
    s = Structure(attention, (True,) * n)
    formats = {g: quant_format(table_bits, 32, table_grid) if g in (TABLE, "lm_head") else
               quant_format(bits, block, grid) for g in s.groups(info)}
    return Structure(attention, s.mlp, formats, kv_dtype)


def _measure(info: ModelInfo, label: str, s: Structure, target, context: int, threads: int, tmp: Path):
    from ..export.fused import export_fused
    from ..model.prune import drop_sublayers_inplace

    model = drop_sublayers_inplace(synthetic_model(info), [i for i, k in enumerate(s.attention) if not k], [])
    folder = tmp / "".join(c if c.isalnum() else "-" for c in f"{label} {s.kv_dtype}")
    path = export_fused(model, folder, synthetic_quantizer(s.formats), kv_dtype=s.kv_dtype).path
    inputs = tmp / "empty.npz"
    np.savez(inputs)
    memory = run_on_target(target, path, inputs, tmp / "work", threads, ["--memory-context", str(context)])["memory"]
    size = path.stat().st_size
    shutil.rmtree(folder)
    return FootprintPoint(label=label, kv_dtype=s.kv_dtype, file_bytes=size,
                          features=runtime_features(info, s, context), peak_rss_mb=memory["peak_rss_mb"],
                          decode_ms=memory["decode_ms_p50"])


def synthetic_model(info: ModelInfo):
    """A model of `info`'s shape without loading or initialising weights (norms set to 1: the only floats the
    quantised graph reads from the model besides the rotary tables)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    config = AutoConfig.for_model(
        info.model_type, hidden_size=info.hidden_size, intermediate_size=info.intermediate_size,
        num_hidden_layers=info.num_layers, num_attention_heads=info.num_heads, num_key_value_heads=info.num_kv_heads,
        head_dim=info.head_dim, vocab_size=info.vocab_size, tie_word_embeddings=info.tie_word_embeddings,
        max_position_embeddings=info.max_position_embeddings, attention_bias="qkv" in info.biases)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # skipped with initialisation
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if name.endswith("norm.weight") else 0.0)
    return model.eval()


def synthetic_quantizer(formats: dict, seed: int = 0):
    """A quantizer that writes random codes in each group's format (scales of a plausible magnitude)."""
    from ..export.weights import BlockQuant

    rng = np.random.default_rng(seed)

    def quantize(name: str, parts: list, params: list):
        fmt = formats.get(name)
        if fmt is None:
            return None
        n, k = sum(p.shape[0] for p in parts), parts[0].shape[1]
        b = fmt.blocks(k)
        codes = rng.integers(0, 2 ** fmt.bits, (n, b * fmt.block_size), dtype=np.uint8)
        scales = np.full((n, b), 2.0 ** -8, np.float32)
        zeros = np.full((n, b), 2 ** (fmt.bits - 1), np.uint8) if fmt.zero_points else None
        offsets = np.full((n, b), -2.0 ** -6, np.float32) if fmt.offsets else None
        return BlockQuant(codes, scales, zeros, offsets, fmt.bits, fmt.block_size, k)
    return quantize


def fit(points: list[FootprintPoint], target: str, context: int, threads: int, ort: str,
        seconds: float) -> FootprintCalibration:
    """Least-squares coefficients over the cost model's features for each KV precision the points cover, each
    slope kept at or above its floor (below it is noise: a negative slope, or a filled KV cache that costs less
    than its own bytes, since the files' KV sizes vary only with the half-attention point)."""
    def solve(names, measured, kv):
        own = [p for p in points if p.kv_dtype == kv]
        rows = [[p.features[k] for k in names] for p in own]
        return dict(zip(names, _bounded(rows, [measured(p) for p in own], [FLOORS.get(k, 0.0) for k in names])))
    kvs = sorted({p.kv_dtype for p in points})
    return FootprintCalibration(
        target=target, context=context, threads=threads, onnxruntime=ort, points=tuple(points),
        memory={kv: solve(MEMORY_FEATURES, lambda p: p.peak_rss_mb, kv) for kv in kvs},
        decode={kv: solve(DECODE_FEATURES, lambda p: p.decode_ms, kv) for kv in kvs}, seconds=round(seconds, 1))


def _bounded(rows, values, floors) -> list[float]:
    """Least squares with every coefficient but the first (the intercept) at or above its floor: a coefficient
    below it is fixed there and the rest refitted, until none is."""
    a, floor = np.asarray(rows, float), np.asarray(floors, float)
    y, free = np.asarray(values, float), list(range(a.shape[1]))
    while True:
        coef = floor.copy()
        coef[free] = 0.0
        coef[free] = np.linalg.lstsq(a[:, free], y - a @ coef, rcond=None)[0]
        low = [j for j in free[1:] if coef[j] < floor[j]]
        if not low:
            return [float(c) for c in coef]
        free.remove(low[0])


def resolve_target(name: str, targets: list):
    """The target a budget names: `host`, or a host or ssh entry of validate.targets."""
    from ..config.targets import HostTarget

    for t in targets:
        if t.name == name:
            return t
    return HostTarget(kind="host", name=name)
