"""Fitted weights kept on disk: a group's BlockQuant in one format, fitted once per model, calibration text,
quantiser and quantiser code, and read back by every later run (a budget search fits each of about 120 groups in
up to a dozen formats, and GPTQ takes about a second a group).

`FitCache(key)` names a folder under the cache home from `key` (everything the fits depend on);
`get(group, fmt_name, fit)` returns the stored BlockQuant or calls `fit()` and stores its result. 4-bit codes
are stored two a byte. Entries are written to a temporary file and renamed, so a crash leaves none half-written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from .weights import BlockQuant


class FitCache:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def get(self, group: str, fmt_name: str, fit: Callable[[], BlockQuant]) -> BlockQuant:
        path = self.folder / f"{group}.{fmt_name}.npz"
        if path.is_file():
            try:
                return load(path)
            except (OSError, ValueError, KeyError):
                pass  # damaged entry: fit again and replace it
        q = fit()
        save(q, path)
        return q


def save(q: BlockQuant, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"codes": q.packed().reshape(q.n, -1), "scales": q.scales, "shape": np.array([q.bits, q.block_size, q.k])}
    if q.zero_points is not None:
        arrays["zero_points"] = q.zero_points
    if q.offsets is not None:
        arrays["offsets"] = q.offsets
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)


def load(path: Path) -> BlockQuant:
    with np.load(path) as data:
        bits, block_size, k = (int(v) for v in data["shape"])
        codes = data["codes"]
        if bits != 8:
            codes = np.stack([codes & 15, codes >> 4], -1).reshape(codes.shape[0], -1)
        return BlockQuant(codes=codes, scales=data["scales"],
                          zero_points=data["zero_points"] if "zero_points" in data else None,
                          offsets=data["offsets"] if "offsets" in data else None,
                          bits=bits, block_size=block_size, k=k)
