"""The peers' model files for `make bench-peers`, each made the way that peer's users make it.

llama.cpp: the shipped Q4_1 GGUF as is, and Q8_0, Q4_K_M and F32 files re-quantised from it by `llama-quantize
--allow-requantize` (cached per source file and llama.cpp build). The onnxruntime-genai model builder: int4 and
fp32 folders built from the packaged model's Hugging Face folder in the builder's own venv, with the RoPE base
of the built graph checked against the folder's config (a misread rope_theta costs perplexity silently).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np

from ..errors import SlimformerError
from ..rundir import sha256_file, staged_folder
from .peer_envs import llama_cpp_dir, peers_home

GGUF_TYPES = ("Q8_0", "Q4_K_M", "F32")
BUILDER_PRECISIONS = ("int4", "fp32")
BUILD_TIMEOUT_S = 1800


def derived_ggufs(source: Path, quantize_tool: Path, threads: int = 2) -> dict[str, Path]:
    """{type: file} for GGUF_TYPES, re-quantised from `source` once and kept under home()/peers."""
    folder = peers_home() / f"gguf-{sha256_file(source)[:12]}-{llama_cpp_dir().name}"
    if not all((folder / f"{t}.gguf").is_file() for t in GGUF_TYPES):
        with staged_folder(folder) as work:
            for kind in GGUF_TYPES:
                cmd = [str(quantize_tool), "--allow-requantize", str(source), str(work / f"{kind}.gguf"), kind,
                       str(threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
                if proc.returncode != 0:
                    raise SlimformerError(f"llama-quantize to {kind} failed (exit {proc.returncode}):\n"
                                          f"{(proc.stdout + proc.stderr)[-2000:]}")
    return {kind: folder / f"{kind}.gguf" for kind in GGUF_TYPES}


def build_with_builder(python: Path, hf_folder: Path, out_dir: Path, precision: str, log: Path) -> Path:
    """`python -m onnxruntime_genai.models.builder -i HF -o OUT -p PRECISION -e cpu`; returns OUT."""
    out_dir = Path(out_dir)
    cmd = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o", str(out_dir),
           "-p", precision, "-e", "cpu", "-c", str(out_dir.parent / f".builder-cache-{precision}")]
    with open(log, "a") as sink:
        sink.write(f"$ {' '.join(cmd)}\n")
        sink.flush()
        try:
            proc = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise SlimformerError(f"the genai model builder ({precision}) took over {BUILD_TIMEOUT_S} s") from None
    if proc.returncode != 0 or not (out_dir / "genai_config.json").is_file():
        raise SlimformerError(f"the genai model builder ({precision}) failed (exit {proc.returncode}); the end of "
                              f"{log}:\n{log.read_text(errors='replace')[-2000:]}")
    check_rope_base(out_dir / "model.onnx", rope_theta(json.loads((Path(hf_folder) / "config.json").read_text())))
    return out_dir


def rope_theta(config: dict) -> float:
    """The RoPE base of a Hugging Face config.json: `rope_theta`, or inside `rope_parameters` (transformers 5)."""
    theta = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta"))
    if theta is None:
        raise SlimformerError("config.json has neither rope_theta nor rope_parameters.rope_theta")
    return float(theta)


def check_rope_base(model: Path, theta: float) -> None:
    """The graph's `cos_cache` initializer ([positions, head_dim / 2]) must be cos(p * theta^(-2i/head_dim))."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    graph = onnx.load(str(model), load_external_data=False).graph
    tensor = next((t for t in graph.initializer if t.name == "cos_cache"), None)
    if tensor is None:
        raise SlimformerError(f"{model} has no cos_cache initializer, so its RoPE base cannot be checked")
    if uses_external_data(tensor):
        load_external_data_for_tensor(tensor, str(model.parent))
    cache = numpy_helper.to_array(tensor).astype(np.float64)
    half = cache.shape[1]
    expected = np.cos(np.arange(cache.shape[0])[:, None] * theta ** (-np.arange(half) / half))
    error = float(np.abs(cache - expected).max())
    if error > 1e-2:  # float32 angles at position 8191 are good to about 5e-4; another base is off by ~1
        raise SlimformerError(f"{model}: its rotary cos_cache does not match rope_theta={theta:g} (max error "
                              f"{error:.3g}); the builder read another RoPE base from config.json")
