"""Run an exported causal LM with onnxruntime: parity traces, perplexity, multiple choice, latency, RSS.

Self-contained on purpose (standard library, numpy and onnxruntime only): this file is copied alone to
ARM boards and remote machines and run there as `python ort_runner.py MODEL.onnx ...`. Two decoder layouts:
optimum's (input_ids, attention_mask, position_ids, past_key_values.{i}.key/.value in; logits and
present.{i}.key/.value out) and the fused GroupQueryAttention layout of onnxruntime-genai's builder and
slimformer's fused export (no position_ids: positions come from the attention mask, which must not be
left-padded, so padded batches are run one row at a time). KV slots exist only for the layers that were kept,
and each slot may have its own number of KV heads (head-pruned models).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_KV_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxLM:
    """One onnxruntime session over a decoder graph, with its KV-cache layout read from the inputs."""

    def __init__(self, path, threads: int = 2):
        import onnxruntime as ort  # lazy: keeps `--help` and `import pipeline` cheap

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.path, self.threads = str(path), threads
        self.session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = set(inputs)
        self.output_names = [o.name for o in self.session.get_outputs()]
        # No position_ids: a GroupQueryAttention graph that derives positions from the mask (no left padding).
        self.takes_positions = "position_ids" in inputs
        past = [n for n in inputs if _PAST.match(n)]
        # key before value within a slot, slots in numeric order (not string order: 10 < 2)
        self.past_names = sorted(past, key=lambda n: (int(_PAST.match(n)[1]), _PAST.match(n)[2] != "key"))
        fallback = _genai_shape(Path(self.path).with_name("genai_config.json"))
        # (kv_heads, head_dim) per past input: head-pruned layers keep fewer KV heads than others
        self.past_shapes = {n: _kv_shape(inputs[n], fallback) for n in self.past_names}
        types = {inputs[n].type for n in self.past_names}
        if types - set(_KV_DTYPES):
            raise ValueError(f"KV inputs have types {sorted(types)}; expected one of {sorted(_KV_DTYPES)}")
        self.kv_dtype = np.dtype(_KV_DTYPES[types.pop()] if types else np.float32)
        vocab = next((o.shape[-1] for o in self.session.get_outputs() if o.name == "logits"), None)
        self.vocab_size = vocab if isinstance(vocab, int) else None

    @property
    def kv_layers(self) -> int:
        return len(self.past_names) // 2

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {name: np.zeros((batch, heads, 0, dim), self.kv_dtype) for name, (heads, dim) in self.past_shapes.items()}

    def forward(self, input_ids, attention_mask, position_ids, past):
        """(logits [batch, seq, vocab], present keyed by the past input names, ready to feed back)."""
        feed = {"input_ids": np.asarray(input_ids, np.int64),
                "attention_mask": np.asarray(attention_mask, np.int64),
                "position_ids": np.asarray(position_ids, np.int64), **past}
        # Fused graphs lack position_ids (and every graph lacks KV inputs when all attention was dropped).
        feed = {k: v for k, v in feed.items() if k in self.input_names}
        outs = dict(zip(self.output_names, self.session.run(None, feed)))
        present = {k.replace("present.", "past_key_values.", 1): v
                   for k, v in outs.items() if k.startswith("present.")}
        return outs["logits"], present


def _genai_shape(config: Path) -> tuple[int | None, int | None]:
    """(KV heads, head size) from an onnxruntime-genai config beside the model, for graphs whose KV inputs
    leave them symbolic (the genai builder's); (None, None) when there is none."""
    try:
        decoder = json.loads(config.read_text())["model"]["decoder"]
        return decoder.get("num_key_value_heads"), decoder.get("head_size")
    except (OSError, KeyError, ValueError):
        return None, None


def _kv_shape(node, fallback) -> tuple[int, int]:
    heads, dim = node.shape[1], node.shape[3]
    heads = heads if isinstance(heads, int) else fallback[0]
    dim = dim if isinstance(dim, int) else fallback[1]
    if not (isinstance(heads, int) and isinstance(dim, int)):
        raise ValueError(f"{node.name} has shape {node.shape}; expected static KV heads and head size (or a "
                         "genai_config.json beside the model that gives them)")
    return heads, dim


def kv_bytes_per_token(lm: OnnxLM) -> int:
    """Bytes of KV cache one token adds at batch 1 (keys and values of every kept attention layer)."""
    return sum(heads * dim for heads, dim in lm.past_shapes.values()) * lm.kv_dtype.itemsize


def _target_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) per position, without materialising a float64 copy of the logits (vocab is big)."""
    x = logits.astype(np.float32, copy=False)
    peak = x.max(-1, keepdims=True)
    lse = np.log(np.exp(x - peak).sum(-1, dtype=np.float64)) + peak[..., 0]
    picked = np.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
    return picked.astype(np.float64) - lse


def _score_from_scratch(lm: OnnxLM, ids: np.ndarray):
    ids = np.asarray(ids, np.int64)
    batch, seq = ids.shape
    positions = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq))
    return lm.forward(ids, np.ones_like(ids), positions, lm.empty_past(batch))


def perplexity(lm: OnnxLM, windows: np.ndarray) -> dict:
    """Mean next-token NLL over windows [n, seq], each scored alone from an empty cache."""
    windows = np.asarray(windows, np.int64)
    total, count = 0.0, 0
    for window in windows:
        logits, _ = _score_from_scratch(lm, window[None])
        total -= _target_logprobs(logits[0, :-1], window[1:]).sum()
        count += len(window) - 1
    nll = total / count
    return {"perplexity": float(np.exp(nll)), "nll": float(nll), "tokens": int(count)}


def choice_scores(lm: OnnxLM, context: list[int], choices: list[list[int]]) -> np.ndarray:
    """Mean log-prob of each choice's tokens given the context: context run once, then the choices in one
    right-padded batch (one at a time for graphs that take no padding)."""
    if not context or not choices or not all(choices):
        raise ValueError("multiple choice needs a non-empty context and non-empty choices")
    ctx = np.asarray(context, np.int64)[None]
    ctx_logits, present = _score_from_scratch(lm, ctx)
    if not lm.takes_positions:
        return np.array([_choice_logprobs(lm, ctx_logits, present, ctx.shape[1], [c])[0].mean() for c in choices])
    logp = _choice_logprobs(lm, ctx_logits, present, ctx.shape[1], choices)
    return np.array([logp[row, :len(ch)].mean() for row, ch in enumerate(choices)])


def _choice_logprobs(lm: OnnxLM, ctx_logits, present, c: int, choices: list[list[int]]) -> np.ndarray:
    """log p of every choice token [n, width] after a context of length c whose logits and KV are given."""
    n, width = len(choices), max(map(len, choices))
    ids = np.zeros((n, width), np.int64)  # right padding: causal, so real tokens never see it
    mask = np.zeros((n, c + width), np.int64)
    mask[:, :c] = 1
    for row, choice in enumerate(choices):
        ids[row, :len(choice)] = choice
        mask[row, c:c + len(choice)] = 1
    positions = np.broadcast_to(np.arange(c, c + width, dtype=np.int64), (n, width))
    past = {k: np.repeat(v, n, axis=0) for k, v in present.items()}
    logits, _ = lm.forward(ids, mask, positions, past)
    # Token j of a choice is predicted by position j-1 of the choice batch, token 0 by the context's end.
    preds = np.concatenate([np.repeat(ctx_logits[:, -1:], n, axis=0), logits[:, :-1]], axis=1)
    return _target_logprobs(preds, ids)


def multiple_choice(lm: OnnxLM, items) -> dict:
    """Accuracy over items (context_ids, choices, answer); the choice with the best mean log-prob wins."""
    correct = sum(int(np.argmax(choice_scores(lm, ctx, choices)) == answer) for ctx, choices, answer in items)
    return {"accuracy": correct / max(len(items), 1), "n": len(items)}


def greedy_trace(lm: OnnxLM, input_ids, attention_mask, steps: int, forced=None):
    """Left-padded prefill then `steps` decode steps. Returns ([batch, vocab] last-position logits of the
    prefill and of each step, tokens [batch, steps + 1] = their argmaxes).

    Each step feeds the argmax of the previous logits, or `forced[:, step]` when given (teacher forcing:
    a quantised model is then compared with the reference on the reference's own context, instead of
    drifting onto another continuation after its first different token). Graphs that take no padding run
    each row alone, unpadded."""
    ids = np.asarray(input_ids, np.int64)
    mask = np.asarray(attention_mask, np.int64)
    if not lm.takes_positions and not mask.all():
        rows = [greedy_trace(lm, ids[r][mask[r] == 1][None], np.ones((1, int(mask[r].sum())), np.int64), steps,
                             None if forced is None else np.asarray(forced)[r:r + 1]) for r in range(len(ids))]
        trace = [np.concatenate([row[0][t] for row in rows]) for t in range(steps + 1)]
        return trace, np.concatenate([row[1] for row in rows])
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    logits, past = lm.forward(ids, mask, positions, lm.empty_past(len(ids)))
    trace = [logits[:, -1].astype(np.float32)]
    for step in range(steps):
        token = (trace[-1].argmax(-1) if forced is None else np.asarray(forced, np.int64)[:, step])[:, None]
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        logits, past = lm.forward(token, mask, mask.sum(-1, keepdims=True) - 1, past)
        trace.append(logits[:, -1].astype(np.float32))
    return trace, np.stack([t.argmax(-1) for t in trace], axis=1)


def latency(lm: OnnxLM, prefill_tokens: int = 128, decode_context: int = 256, decode_steps: int = 32,
            warmup: int = 3, repeats: int = 5, seed: int = 0) -> dict:
    """Prefill ms (median of `repeats`) and per-token decode ms (p50, p90) on a real KV cache."""
    rng = np.random.default_rng(seed)
    high = lm.vocab_size or 1000
    prompt = rng.integers(3, high, (1, prefill_tokens))
    prefill = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        _score_from_scratch(lm, prompt)
        prefill.append((time.perf_counter() - start) * 1e3)
    _, past = _score_from_scratch(lm, rng.integers(3, high, (1, decode_context)))
    fed = rng.integers(3, high, (warmup + decode_steps, 1, 1))
    decode = []
    for i, token in enumerate(fed):
        length = decode_context + i
        mask, pos = np.ones((1, length + 1), np.int64), np.full((1, 1), length, np.int64)
        start = time.perf_counter()
        _, past = lm.forward(token, mask, pos, past)
        decode.append((time.perf_counter() - start) * 1e3)
    decode = np.array(decode[warmup:])
    return {"prefill_ms": float(np.median(prefill[warmup:])), "prefill_tokens": prefill_tokens,
            "decode_ms_p50": float(np.percentile(decode, 50)), "decode_ms_p90": float(np.percentile(decode, 90)),
            "decode_context": decode_context, "decode_steps": decode_steps}


MEMORY_CHUNK = 128  # prefill chunk of the memory protocol: what an app feeds a long prompt in
MEMORY_DECODE_STEPS = 16


def memory_protocol(lm: OnnxLM, context: int, chunk: int = MEMORY_CHUNK, decode_steps: int = MEMORY_DECODE_STEPS,
                    seed: int = 0) -> dict:
    """The budget's memory protocol, run in a fresh process: prefill `context` tokens in chunks of `chunk` (batch
    1), then decode `decode_steps` tokens one at a time. Returns the peak RSS after it (model load, KV cache at
    `context` tokens, activations) and the decode ms per token (median) with `context` tokens cached."""
    rng = np.random.default_rng(seed)
    high = lm.vocab_size or 1000
    loaded = peak_rss_mb()
    ids = rng.integers(3, high, (1, context))
    past = lm.empty_past(1)
    for start in range(0, context, chunk):
        piece = ids[:, start:start + chunk]
        length = start + piece.shape[1]
        _, past = lm.forward(piece, np.ones((1, length), np.int64), np.arange(start, length)[None], past)
    times = []
    for step in range(decode_steps):
        length = context + step
        start = time.perf_counter()
        _, past = lm.forward(rng.integers(3, high, (1, 1)), np.ones((1, length + 1), np.int64),
                             np.full((1, 1), length, np.int64), past)
        times.append((time.perf_counter() - start) * 1e3)
    return {"context": context, "chunk": chunk, "decode_steps": decode_steps, "load_peak_rss_mb": loaded,
            "decode_ms_p50": float(np.median(times)), "peak_rss_mb": peak_rss_mb()}


def save_inputs(path, windows=None, trace_input_ids=None, trace_attention_mask=None, trace_steps: int = 8,
                mc_items=None, trace_tokens=None) -> None:
    """Write the CLI's inputs.npz. Multiple-choice items are ragged, so they are stored flat:
    mc_tokens = every item's context then its choices, concatenated; mc_lengths = those segments' lengths;
    mc_n_choices and mc_answers one entry per item."""
    arrays = {}
    if windows is not None:
        arrays["windows"] = np.asarray(windows, np.int64)
    if trace_input_ids is not None:
        arrays["trace_input_ids"] = np.asarray(trace_input_ids, np.int64)
        arrays["trace_attention_mask"] = np.asarray(trace_attention_mask, np.int64)
        arrays["trace_steps"] = np.int64(trace_steps)
    if trace_tokens is not None:  # [batch, >= trace_steps] tokens fed at each decode step (teacher forcing)
        arrays["trace_tokens"] = np.asarray(trace_tokens, np.int64)
    if mc_items is not None:
        segments = [seg for ctx, choices, _ in mc_items for seg in [ctx, *choices]]
        arrays["mc_tokens"] = np.array([t for seg in segments for t in seg], np.int64)
        arrays["mc_lengths"] = np.array([len(seg) for seg in segments], np.int64)
        arrays["mc_n_choices"] = np.array([len(choices) for _, choices, _ in mc_items], np.int64)
        arrays["mc_answers"] = np.array([answer for *_, answer in mc_items], np.int64)
    np.savez(path, **arrays)


def load_mc_items(data) -> list:
    """Inverse of save_inputs' flat encoding: [(context, choices, answer), ...] as Python ints."""
    tokens = data["mc_tokens"].tolist()
    bounds = np.concatenate([[0], np.cumsum(data["mc_lengths"])]).tolist()
    segments = [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    items, seg = [], 0
    for n, answer in zip(data["mc_n_choices"].tolist(), data["mc_answers"].tolist()):
        items.append((segments[seg], segments[seg + 1:seg + 1 + n], answer))
        seg += 1 + n
    return items


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far.

    Linux: VmHWM, because ru_maxrss survives execve and would report the parent's peak in a child
    started by a large Python process. Elsewhere ru_maxrss (KB on Linux, bytes on macOS).
    """
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)[1]) / 2**10
    except (OSError, TypeError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _parse_args(argv):
    p = argparse.ArgumentParser(description="Measure an exported ONNX causal LM with onnxruntime (CPU).")
    p.add_argument("model", help="path to the .onnx file")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--inputs", help="inputs .npz written by save_inputs (needed by --perplexity/--mc/--trace)")
    p.add_argument("--out", required=True, help="result .json; trace logits go to <out stem>.trace.npz")
    p.add_argument("--latency", action="store_true", help="time prefill and per-token decode")
    p.add_argument("--perplexity", action="store_true", help="score the `windows` array")
    p.add_argument("--mc", action="store_true", help="score the multiple-choice items")
    p.add_argument("--trace", action="store_true", help="greedy trace of trace_input_ids/trace_attention_mask")
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--decode-context", type=int, default=256)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--memory-context", type=int, default=None,
                   help="run only the memory protocol: prefill this many tokens in chunks, then decode")
    args = p.parse_args(argv)
    if (args.perplexity or args.mc or args.trace) and not args.inputs:
        p.error("--perplexity, --mc and --trace read their data from --inputs; pass an npz from save_inputs")
    return args


def main(argv=None) -> int:
    args = _parse_args(argv)
    import onnxruntime as ort

    start = time.perf_counter()
    lm = OnnxLM(args.model, threads=args.threads)
    out = Path(args.out)
    result = {"model": args.model, "threads": args.threads, "load_ms": (time.perf_counter() - start) * 1e3,
              "onnxruntime": ort.__version__, "numpy": np.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "kv_layers": lm.kv_layers, "kv_bytes_per_token": kv_bytes_per_token(lm)}
    data = np.load(args.inputs) if args.inputs else {}
    if args.memory_context is not None:
        result["memory"] = memory_protocol(lm, args.memory_context)
    if args.latency:
        result["latency"] = latency(lm, args.prefill_tokens, args.decode_context, args.decode_steps)
    if args.perplexity:
        result["perplexity"] = perplexity(lm, data["windows"])
    if args.mc:
        result["multiple_choice"] = multiple_choice(lm, load_mc_items(data))
    if args.trace:
        forced = data["trace_tokens"] if "trace_tokens" in data else None
        trace, tokens = greedy_trace(lm, data["trace_input_ids"], data["trace_attention_mask"],
                                     int(data["trace_steps"]), forced)
        trace_path = out.with_name(out.stem + ".trace.npz")
        np.savez(trace_path, logits=np.stack(trace), tokens=tokens)
        result["trace"] = {"npz": str(trace_path), "decode_steps": len(trace) - 1, "tokens": tokens.tolist(),
                           "teacher_forced": forced is not None}
    result["peak_rss_mb"] = peak_rss_mb()
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
