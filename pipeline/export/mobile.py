"""Mobile deliverables made from an exported (possibly quantised) decoder ONNX file.

`to_ort_format`: onnxruntime's own converter (.ort plus the required-operators config for a minimal build)
and its mobile usability checker, summarised. `write_genai_folder`: a folder onnxruntime-genai runs as is
(genai_config.json, tokenizer files, the model), with the KV layer count read from the graph's inputs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Literal

from ..artifacts import OrtFormat, OrtParity
from ..errors import ExportError

# Positions beyond the window in genai's KV ring for windowed layers (decoder.sliding_window.cache_slack): with
# 0 genai doubles the ring to 2W; 1 keeps W + 1 and generates the same tokens.
RING_SLACK = 1

TOOL_TIMEOUT_S = 1800
GENAI_CONFIG = "genai_config.json"
_VERDICT = re.compile(r"Model should perform well with (.+?) (as is|if modified to have fixed input shapes): (\w+)")
PAST_KEY = re.compile(r"^past_key_values\.(\d+)\.key$")
# Run in a child process: onnxruntime-genai can abort outright on tokenizer files it does not support.
GENAI_ENCODE = ("import json, sys, onnxruntime_genai as og; folder, text = json.load(sys.stdin); "
                "print(json.dumps([int(t) for t in og.Tokenizer(og.Model(folder)).encode(text)]))")


def _run_tool(args: list[str], what: str) -> str:
    try:
        proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ExportError(f"{what} took over {TOOL_TIMEOUT_S} s and was stopped.") from None
    if proc.returncode != 0:
        raise ExportError(f"{what} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-2000:]}")
    return proc.stdout + proc.stderr


def to_ort_format(onnx_path: Path, out_dir: Path, style: Literal["Fixed", "Runtime"] | None = None,
                  target_platform: Literal["arm", "amd64"] = "arm") -> OrtFormat:
    """Convert to `out_dir/<stem>.ort` (+ `<stem>.required_operators.config` beside it) and check usability.

    Fixed style bakes CPU-EP optimisations into the file (onnxruntime's advice for the CPU EP); Runtime
    leaves some for load time (for NNAPI/CoreML). Both change quantised outputs slightly: validate the .ort.
    None picks Fixed, or Runtime for fp16 weights: Fixed constant-folds the CPU EP's casts back to fp32 into
    the file (SmolLM2-135M fp16: a 564 MB .ort from a 267 MB .onnx).
    """
    onnx_path, out_dir = Path(onnx_path).resolve(), Path(out_dir)
    if not onnx_path.is_file():
        raise ExportError(f"cannot convert {onnx_path} to ORT format: no such file.")
    style = style or ("Runtime" if _mostly_fp16(onnx_path) else "Fixed")
    out_dir.mkdir(parents=True, exist_ok=True)
    _run_tool(["onnxruntime.tools.convert_onnx_models_to_ort", "--optimization_style", style,
               "--target_platform", target_platform, "--output_dir", str(out_dir), str(onnx_path)],
              f"onnxruntime's ORT-format conversion of {onnx_path}")
    suffix = ".with_runtime_opt" if style == "Runtime" else ""
    ort_path = out_dir / f"{onnx_path.stem}{suffix}.ort"
    config = out_dir / f"{onnx_path.stem}.required_operators{suffix}.config"
    if not (ort_path.is_file() and config.is_file()):
        raise ExportError(f"the ORT-format converter reported success but {ort_path.name} or {config.name} "
                          f"is missing from {out_dir}; check the onnxruntime version.")
    text = _run_tool(["onnxruntime.tools.check_onnx_model_mobile_usability", "--log_level", "info", str(onnx_path)],
                     f"onnxruntime's mobile usability check of {onnx_path}")
    verdict, details = _summarise_usability(text)
    return OrtFormat(ort_path, config, verdict, tuple(details + _build_notes(onnx_path, config)),
                     bytes=ort_path.stat().st_size)


def ort_parity(onnx_path: Path, ort_path: Path, input_ids, steps: int = 4, threads: int = 2) -> OrtParity:
    """The .ort file against the .onnx it came from: a prefill of `input_ids` [batch, seq] plus `steps`
    decode steps, both fed the .onnx file's greedy tokens; max abs logit difference and top-1 agreement."""
    import numpy as np

    from ..measure.ort_runner import OnnxLM, greedy_trace

    ids = np.asarray(input_ids, np.int64)
    mask = np.ones_like(ids)
    want, tokens = greedy_trace(OnnxLM(onnx_path, threads), ids, mask, steps)
    got, _ = greedy_trace(OnnxLM(ort_path, threads), ids, mask, steps, forced=tokens)
    want, got = np.stack(want), np.stack(got)
    return OrtParity(max_abs_diff=float(np.abs(got - want).max()),
                     top1_agreement=float((got.argmax(-1) == want.argmax(-1)).mean()), steps=steps)


def _mostly_fp16(onnx_path: Path) -> bool:
    """Whether most initializer elements of the graph are float16."""
    import onnx
    from onnx import TensorProto

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    sizes = {}
    for t in graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        sizes[t.data_type] = sizes.get(t.data_type, 0) + n
    return sizes.get(TensorProto.FLOAT16, 0) > sum(sizes.values()) / 2


def _build_notes(onnx_path: Path, config: Path) -> list[str]:
    """What a mobile onnxruntime build needs for this graph."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    contrib = sorted({n.op_type for n in graph.node if n.domain == "com.microsoft"})
    notes = []
    if "MatMulNBits" in contrib:
        notes.append("4/8-bit weights: the mobile build must include the com.microsoft MatMulNBits op "
                     "(onnxruntime's full Android/iOS packages do; a minimal build gets it from the config).")
    if contrib:
        notes.append(f"com.microsoft contrib ops in the .onnx: {', '.join(contrib)}")
    notes.append(f"a custom minimal build takes {config.name} as --include_ops_by_config")
    return notes


def _summarise_usability(text: str) -> tuple[str, list[str]]:
    """('CPU EP' or 'try NNAPI/CoreML ...', one line per EP verdict) from the checker's log."""
    verdicts: dict[str, str] = {}
    for ep, _, answer in _VERDICT.findall(text):
        # a later "if modified to have fixed input shapes" line may upgrade the "as is" answer
        rank = {"NO": 0, "MAYBE": 1, "YES": 2}
        if rank.get(answer, 0) >= rank.get(verdicts.get(ep, "NO"), 0):
            verdicts[ep] = answer
    if not verdicts:
        raise ExportError("onnxruntime's mobile usability checker printed no verdict; its output format changed:\n"
                          + text[-1000:])
    useful = [ep for ep, answer in verdicts.items() if answer != "NO"]
    verdict = ("CPU EP (NNAPI/CoreML cannot take the model)" if not useful
               else f"CPU EP; {', '.join(useful)} worth comparing")
    return verdict, [f"{ep}: {answer}" for ep, answer in verdicts.items()]


def write_genai_folder(onnx_path: Path, model_config, tokenizer, out_dir: Path) -> Path:
    """Write genai_config.json, the tokenizer files and the model (hard link, else copy) into `out_dir`.

    onnxruntime-genai names KV inputs `past_key_values.%d.key` for d < decoder.num_hidden_layers, so that
    field holds the graph's KV slot count (kept attention layers), not the model's depth.
    """
    import onnx

    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    config = genai_config(graph, model_config, tokenizer, onnx_path.name)
    tokenizer.save_pretrained(out_dir)
    windows = _windowed_slots(graph)
    if windows:  # a copy whose windowed layers keep window-sized KV buffers in genai
        from .onnx import save_onnx

        model = onnx.load(str(onnx_path))
        for node in model.graph.node:
            if node.op_type == "GroupQueryAttention" and _slot(node) in windows:
                node.attribute.append(onnx.helper.make_attribute("sliding_window_cache", 1))
        save_onnx(model, out_dir / onnx_path.name)
        config["model"]["decoder"]["sliding_window"] = {
            "window_size": next(iter(set(windows.values()))), "layers": sorted(windows),
            "slide_key_value_cache": False, "slide_inputs": False, "cache_slack": RING_SLACK}
    else:
        for src in (onnx_path, onnx_path.with_name(onnx_path.name + "_data")):
            if src.exists():
                _link_or_copy(src, out_dir / src.name)
    (out_dir / GENAI_CONFIG).write_text(json.dumps(config, indent=4))
    return out_dir


def _slot(node) -> int:
    """The KV slot a GroupQueryAttention node reads (from its past_key input's name)."""
    return int(PAST_KEY.match(node.input[3])[1])


def window_slots(graph) -> dict[int, int]:
    """KV slot -> window size of every GroupQueryAttention node with a local window."""
    from onnx import helper

    windows = {}
    for node in graph.node:
        if node.op_type == "GroupQueryAttention" and PAST_KEY.match(node.input[3]):
            size = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "local_window_size"), -1)
            if size > 0:
                windows[_slot(node)] = size
    return windows


def _windowed_slots(graph) -> dict[int, int]:
    """window_slots, checked for what onnxruntime-genai takes: one window size for all of them."""
    windows = window_slots(graph)
    if len(set(windows.values())) > 1:
        raise ExportError(f"onnxruntime-genai keeps one sliding-window size, but this graph has several "
                          f"({sorted(set(windows.values()))}); convert every windowed layer to one size")
    return windows


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists() and dst.samefile(src):
        return
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def _kv_layout(graph) -> tuple[int, int, int]:
    """(KV slots, KV heads, head size) from the past_key_values inputs; KV heads is the largest slot's (head-pruned
    layers have fewer)."""
    past = {int(m[1]): i for i in graph.input if (m := PAST_KEY.match(i.name))}
    if not past or sorted(past) != list(range(len(past))):
        raise ExportError(f"the graph's KV inputs {sorted(past)} are not past_key_values.0..K-1.key; "
                          "onnxruntime-genai needs that layout (export with pipeline.export.onnx).")
    dims = [i.type.tensor_type.shape.dim for i in past.values()]
    return len(past), max(d[1].dim_value for d in dims), dims[0][3].dim_value


def _rotary_rows(graph) -> list[int]:
    """Positions of the rotary caches GroupQueryAttention reads (a fused graph's export.max_length), if any."""
    caches = {n.input[7] for n in graph.node if n.op_type == "GroupQueryAttention" and len(n.input) > 7}
    return [t.dims[0] for t in graph.initializer if t.name in caches]


def genai_config(graph, model_config, tokenizer, filename: str) -> dict:
    """onnxruntime-genai's config for an optimum-layout decoder graph, search defaulting to greedy.

    genai's config has one num_key_value_heads; without a shared past/present buffer (as here) genai 0.18 takes
    each past input's shape from the graph, so layers with fewer KV heads (head pruning) run as they are
    (tests/test_mobile.py checks genai's greedy tokens against PyTorch on such a folder)."""
    kv_layers, kv_heads, head_size = _kv_layout(graph)
    names = {i.name for i in graph.input}
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    if "position_ids" in names:
        inputs["position_ids"] = "position_ids"
    eos = model_config.eos_token_id if model_config.eos_token_id is not None else tokenizer.eos_token_id
    pad = next((t for t in (model_config.pad_token_id, tokenizer.pad_token_id, eos) if t is not None), 0)
    context = min([int(getattr(model_config, "max_position_embeddings", 2048)), *_rotary_rows(graph)])
    decoder = {"session_options": {"log_id": "onnxruntime-genai", "provider_options": []}, "filename": filename,
               "head_size": head_size, "hidden_size": model_config.hidden_size, "inputs": inputs,
               "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                           "present_value_names": "present.%d.value"},
               "num_attention_heads": model_config.num_attention_heads,
               "num_hidden_layers": kv_layers, "num_key_value_heads": kv_heads}
    # genai wants a number; a model without a BOS token (byte-level BPEs often have none) gets the EOS id.
    bos = next((t for t in (model_config.bos_token_id, tokenizer.bos_token_id, eos, pad) if t is not None), 0)
    model = {"bos_token_id": bos, "context_length": context, "decoder": decoder,
             "eos_token_id": eos if eos is not None else pad, "pad_token_id": pad,
             "type": model_config.model_type, "vocab_size": model_config.vocab_size}
    # GroupQueryAttention writes new keys and values into a max_length buffer in place (no copy per token);
    # optimum's graph concatenates past and new (present = past + 1), so genai must not share one buffer.
    shared = any(n.op_type == "GroupQueryAttention" for n in graph.node)
    search = {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
              "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
              "num_return_sequences": 1, "past_present_share_buffer": shared, "repetition_penalty": 1.0,
              "temperature": 1.0, "top_k": 1, "top_p": 1.0}
    return {"model": model, "search": search}


def genai_tokenizer_problem(folder: Path, tokenizer, text: str) -> str | None:
    """None if onnxruntime-genai's tokenizer (onnxruntime-extensions) reads the folder's tokenizer files and
    encodes `text` as `tokenizer` does; otherwise what went wrong. Loads the model once (a session), in a
    child process: onnxruntime-genai can crash outright on tokenizer files it does not support."""
    try:
        proc = subprocess.run([sys.executable, "-c", GENAI_ENCODE], input=json.dumps([str(folder), text]),
                              capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"onnxruntime-genai took over {TOOL_TIMEOUT_S} s to load the tokenizer files in {folder}"
    if proc.returncode != 0:
        died = (f"it died of {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
                else f"exit code {proc.returncode}")
        reason = (proc.stderr.strip().splitlines() or [""])[-1]
        return f"onnxruntime-genai cannot load the tokenizer files in {folder} ({died}){': ' + reason if reason else ''}"
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    want = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if got == want:
        return None
    at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return (f"onnxruntime-genai encodes the text differently from the Hugging Face tokenizer from token {at} "
            f"(genai {got[at:at + 5]}, Hugging Face {want[at:at + 5]}); apps would feed the model wrong ids. "
            "Check tokenizer.json: a byte-level BPE whose decoder is SentencePiece-style (Replace '\u2581', as "
            "transformers' GGUF conversion writes) makes onnxruntime-extensions encode spaces as '\u2581'.")
