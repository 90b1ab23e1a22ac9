"""Timing and llama.cpp perplexity for `make bench-peers`, every path measured the way its users run it.

onnxruntime-genai folders (ours, the builder's, optimum's undropped export) go through `genai_timing.py` in a
child process; GGUF files through `llama-bench` (decode: `-p 0 -n N -d CONTEXT`; prefill: `-p N -n 0`), whose
JSON is parsed here. Paths are timed in interleaved rounds, each path once per round in the same order, and
each figure is the median over rounds: the machine is shared, and noise then hits every path alike.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import console
from ..errors import SlimformerError

TIMEOUT_S = 1800
GENAI_TIMING = Path(__file__).with_name("genai_timing.py")
_FINAL_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
_CHUNKS = re.compile(r"calculating perplexity over (\d+) chunks")


@dataclass(frozen=True)
class TimingSpec:
    """How every path is timed: threads, the prompt (prefill) and the decode after it, repeats and rounds."""

    threads: int = 2
    prompt_tokens: int = 256
    new_tokens: int = 64
    repeats: int = 3
    rounds: int = 3


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    """`cmd` run to completion, its output captured; a SlimformerError with the end of it when it fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SlimformerError(f"{what} took over {TIMEOUT_S} s and was stopped") from None
    if proc.returncode != 0:
        raise SlimformerError(f"{what} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-2000:]}")
    return proc


def time_genai(folder: Path, spec: TimingSpec, out: Path) -> dict:
    """{prefill_ms, decode_ms_per_token} of an onnxruntime-genai folder, from a fresh child process."""
    _run([sys.executable, str(GENAI_TIMING), str(folder), "--out", str(out), "--threads", str(spec.threads),
          "--prompt-tokens", str(spec.prompt_tokens), "--new-tokens", str(spec.new_tokens),
          "--repeats", str(spec.repeats)], f"onnxruntime-genai timing of {folder}")
    return json.loads(Path(out).read_text())


def parse_llama_bench(text: str) -> list[dict]:
    """The records of `llama-bench -o json` from its stdout (a JSON array; its log goes to stderr)."""
    start, end = text.find("["), text.rfind("]")
    try:
        records = json.loads(text[start:end + 1]) if 0 <= start < end else None
    except json.JSONDecodeError:
        records = None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "samples_ns" in r for r in records):
        raise SlimformerError(f"llama-bench printed no JSON array of results; its output ends:\n{text[-1500:]}")
    return records


def llama_bench_ms(record: dict) -> float:
    """Median wall milliseconds of one llama-bench test over its repetitions (all its tokens)."""
    return statistics.median(record["samples_ns"]) / 1e6


def time_gguf(llama_bench: Path, gguf: Path, spec: TimingSpec) -> dict:
    """{prefill_ms, decode_ms_per_token}: decode with `prompt_tokens` already cached, prefill from empty."""
    common = [str(llama_bench), "-m", str(gguf), "-t", str(spec.threads), "-r", str(spec.repeats), "-o", "json"]
    decode = parse_llama_bench(_run(common + ["-p", "0", "-n", str(spec.new_tokens), "-d", str(spec.prompt_tokens)],
                                    f"llama-bench decode on {gguf.name}").stdout)
    prefill = parse_llama_bench(_run(common + ["-p", str(spec.prompt_tokens), "-n", "0"],
                                     f"llama-bench prefill on {gguf.name}").stdout)
    gen = next(r for r in decode if r["n_gen"] == spec.new_tokens)
    pp = next(r for r in prefill if r["n_prompt"] == spec.prompt_tokens)
    return {"prefill_ms": llama_bench_ms(pp), "decode_ms_per_token": llama_bench_ms(gen) / spec.new_tokens,
            "prompt_tokens": spec.prompt_tokens, "new_tokens": spec.new_tokens, "repeats": spec.repeats,
            "threads": spec.threads, "llama_cpp_build": gen.get("build_commit")}


def interleaved(paths: dict[str, tuple[str, Path]], spec: TimingSpec, llama_bench: Path | None, workdir: Path) -> dict:
    """{label: {prefill_ms, decode_ms_per_token}} medians over `spec.rounds` rounds; `paths` maps each label
    to ("genai", folder) or ("gguf", file)."""
    samples = {label: [] for label in paths}
    bar = console.progress(total=spec.rounds * len(paths), desc="timing")
    for round_ in range(spec.rounds):
        for n, (label, (kind, path)) in enumerate(paths.items()):
            if kind == "genai":
                samples[label].append(time_genai(path, spec, Path(workdir) / f"timing-{round_}-{n}.json"))
            else:
                samples[label].append(time_gguf(llama_bench, path, spec))
            bar.update()
    bar.close()
    return {label: {key: statistics.median(s[key] for s in runs) for key in ("prefill_ms", "decode_ms_per_token")}
            for label, runs in samples.items()}


def parse_llama_perplexity(text: str) -> dict:
    """{perplexity, stderr, chunks} from llama-perplexity's output (chunks: how many it scored, which is fewer
    than asked when the text tokenises shorter)."""
    found, chunks = _FINAL_PPL.search(text), _CHUNKS.search(text)
    if not (found and chunks):
        raise SlimformerError(f"llama-perplexity printed no 'Final estimate' line or chunk count; its output "
                              f"ends:\n{text[-1500:]}")
    return {"perplexity": float(found[1]), "stderr": float(found[2]), "chunks": int(chunks[1])}


def llama_perplexity(tool: Path, gguf: Path, text_file: Path, threads: int, context: int, chunks: int) -> dict:
    """llama.cpp's own held-out perplexity: `chunks` chunks of `context` tokens, the second half of each scored."""
    proc = _run([str(tool), "-m", str(gguf), "-f", str(text_file), "-c", str(context), "--chunks", str(chunks),
                 "-t", str(threads)], f"llama-perplexity on {gguf.name}")
    return {**parse_llama_perplexity(proc.stdout + proc.stderr), "context": context}
