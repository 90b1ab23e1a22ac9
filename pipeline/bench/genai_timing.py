"""Time an onnxruntime-genai folder as an app runs it: a Generator fed a prompt, then greedy tokens one by one.

Self-contained on purpose (standard library, numpy and onnxruntime_genai only) and run in a child process, one
process per measurement, as `python genai_timing.py FOLDER --out result.json`: a model loaded by an earlier
measurement cannot warm the next one, and a crash inside onnxruntime-genai takes only this process down.
Prefill is the time to the first token (`append_tokens` of the prompt plus choosing the first token); decode is
the mean time of the following `--new-tokens` calls of `generate_next_token`, each one forward pass.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def load(folder: str, threads: int):
    """The folder's model with onnxruntime's intra-op threads fixed (genai_config.json itself is not changed)."""
    import onnxruntime_genai as og

    config = og.Config(folder)
    options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return og.Model(config)


def generate(model, prompt: np.ndarray, new_tokens: int) -> tuple[float, list[float], int]:
    """(ms to the first token, ms of each of the next `new_tokens` tokens, tokens in the sequence at the end),
    greedy, end-of-text suppressed (min_length) so that every run decodes the same number of tokens."""
    import onnxruntime_genai as og

    length = len(prompt) + 1 + new_tokens
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(prompt)
    generator.generate_next_token()  # picks the first token from the prompt's logits: no forward pass
    first = (time.perf_counter() - start) * 1e3
    steps = []
    for _ in range(new_tokens):
        start = time.perf_counter()
        generator.generate_next_token()  # one forward pass over the previous token, then the choice
        steps.append((time.perf_counter() - start) * 1e3)
    return first, steps, int(generator.token_count())


def measure(folder: str, threads: int = 2, prompt_tokens: int = 256, new_tokens: int = 64, repeats: int = 3,
            seed: int = 0) -> dict:
    """Load the folder, warm it up with a short generation, then time `repeats` full ones (like llama-bench's
    warm-up run and `-r`); the medians over repeats of prefill ms and of the mean decode ms per token."""
    model = load(folder, threads)
    vocab = json.loads((Path(folder) / "genai_config.json").read_text())["model"]["vocab_size"]
    rng = np.random.default_rng(seed)
    # Token ids 0-2 are special in most vocabularies; random ordinary tokens time the same as text.
    generate(model, rng.integers(3, vocab, 16).astype(np.int32), 4)
    runs = [generate(model, rng.integers(3, vocab, prompt_tokens).astype(np.int32), new_tokens)
            for _ in range(repeats)]
    return {"prefill_ms": float(np.median([first for first, _, _ in runs])), "prompt_tokens": prompt_tokens,
            "decode_ms_per_token": float(np.median([np.mean(steps) for _, steps, _ in runs])),
            "new_tokens": new_tokens, "repeats": repeats, "threads": threads,
            "sequence_tokens": [count for _, _, count in runs]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Time an onnxruntime-genai model folder: prefill, then decode.")
    p.add_argument("folder", help="a folder with genai_config.json")
    p.add_argument("--out", required=True, help="where the result JSON goes")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed generations after the warm-up")
    args = p.parse_args(argv)
    result = measure(args.folder, args.threads, args.prompt_tokens, args.new_tokens, args.repeats)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
