"""The source GGUF's own quantised blocks, for the tensors the pipeline left unchanged.

A packaged model that came as a GGUF (SmolLM2's Q4_1 file) was dequantised to fp32 for the pipeline; its weights
still sit on the GGUF's grid. Re-quantising them onto another grid adds error that reusing the blocks does not.
`GgufBlocks.blocks_for` returns a parameter's GGUF blocks when, and only when, they dequantise to exactly the
weight the model holds now (dropping keeps weights; healing changes them, and those get an algorithm instead).
Rows may be permuted: transformers undoes llama.cpp's rotary reordering of q and k when it loads a GGUF.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from .weights import BlockQuant, from_gguf

REUSED = ("Q4_0", "Q4_1", "Q8_0")


class GgufBlocks:
    def __init__(self, path: Path):
        import gguf

        reader = gguf.GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
        by_name = {name: member for member, name in gguf.MODEL_ARCH_NAMES.items()}
        blocks = int(reader.fields[f"{arch}.block_count"].contents())
        self.names = gguf.get_tensor_name_map(by_name[arch], blocks)
        self.tensors = {t.name: t for t in reader.tensors}
        self.path = Path(path)

    def type_of(self, param: str) -> str | None:
        """The GGUF tensor type (Q4_1, Q8_0, F32...) that holds `param`, or None when the file has none."""
        name = self.names.get_name(param)
        tensor = self.tensors.get(f"{name}.weight") if name else None
        return None if tensor is None else tensor.tensor_type.name

    def blocks_for(self, param: str, weight: np.ndarray) -> BlockQuant | None:
        """`param` (a module path such as model.layers.0.self_attn.q_proj) as the GGUF's blocks, rows in the
        model's order, if they dequantise exactly to `weight` [N, K]; else None."""
        name = self.names.get_name(param)
        tensor = self.tensors.get(f"{name}.weight") if name else None
        if tensor is None or tensor.tensor_type.name not in REUSED:
            return None
        k, n = (int(d) for d in tensor.shape[:2])
        if (n, k) != weight.shape:
            return None
        blocks = from_gguf(tensor.tensor_type.name, np.asarray(tensor.data), n, k)
        order = _row_order(blocks.dequantize(), np.asarray(weight, np.float32))
        if order is None:
            return None
        return BlockQuant(codes=blocks.codes[order], scales=blocks.scales[order],
                          zero_points=None if blocks.zero_points is None else blocks.zero_points[order],
                          offsets=None if blocks.offsets is None else blocks.offsets[order],
                          bits=blocks.bits, block_size=blocks.block_size, k=blocks.k)


def open_gguf(path: Path) -> GgufBlocks:
    """One reader per file and process: reading a GGUF's metadata parses its whole vocabulary (seconds)."""
    stat = Path(path).stat()
    return _open(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=2)
def _open(path: str, size: int, mtime_ns: int) -> GgufBlocks:
    return GgufBlocks(Path(path))


def _row_order(source: np.ndarray, weight: np.ndarray) -> np.ndarray | None:
    """Indices such that source[order] == weight exactly, or None when some row of `weight` is not a row of
    `source` (the weight was changed)."""
    if np.array_equal(source, weight):
        return np.arange(len(weight))
    rows = {row.tobytes(): i for i, row in enumerate(source)}
    order = [rows.get(row.tobytes()) for row in weight]
    return None if any(i is None for i in order) else np.asarray(order)
