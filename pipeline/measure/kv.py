"""KV cache bytes a model holds at a given context, read from its ONNX graph.

Each KV slot holds keys and values of its kept attention layer: `context` positions for a full-attention layer;
for a layer converted to a window of W tokens, the ring buffer onnxruntime-genai allocates for it: W + slack
positions, with the slack of 1 that pipeline.export.mobile writes (measured with onnxruntime-genai 0.18: a window of
16 keeps 17), or fewer while the context is shorter.
"""

from __future__ import annotations

from pathlib import Path

from ..export.mobile import PAST_KEY, RING_SLACK, window_slots

CONTEXTS = (512, 2048, 8192)
_BYTES = {1: 4, 10: 2}  # onnx TensorProto FLOAT, FLOAT16


def kv_slots(onnx_path: Path) -> dict[int, tuple[int, int | None]]:
    """KV slot -> (bytes per token for keys and values, window or None) from the graph."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    windows = window_slots(graph)
    slots = {}
    for value in graph.input:
        match = PAST_KEY.match(value.name)
        if match:
            dims = value.type.tensor_type.shape.dim
            per_token = dims[1].dim_value * dims[3].dim_value * _BYTES[value.type.tensor_type.elem_type]
            slots[int(match[1])] = (2 * per_token, windows.get(int(match[1])))
    return slots


def kv_bytes_at(onnx_path: Path, contexts=CONTEXTS) -> dict[int, int]:
    """context -> KV bytes at batch 1."""
    slots = kv_slots(onnx_path).values()
    return {c: sum(per_token * (c if window is None else min(c, window + RING_SLACK)) for per_token, window in slots)
            for c in contexts}
