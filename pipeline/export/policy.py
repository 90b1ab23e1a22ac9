"""Which weight format each linear group gets: a recipe's quantize entry turned into the callable the fused
exporter asks for every group (and the fake quantisation asks for the same answers).

Order of choice for a group: fp32 when the entry leaves it unquantised (the logits table with
quantize_lm_head: false); the source GGUF's own blocks when every tensor of the group is unchanged and
`source_blocks` is on; otherwise `algorithm` on the entry's grid at 4 bits (8 for int8 entries, for the logits
table at lm_head_bits, and for the groups listed as eight-bit). GPTQ needs an input: an untied embedding (a pure
lookup) is rounded to nearest instead. `format_quantizer` is the same choice made per group by the budget
search: a format (bits, block size, or the source's blocks) for every group.
"""

from __future__ import annotations

import numpy as np

from . import weights as w
from .gguf_blocks import GgufBlocks

TABLES = ("embedding", "lm_head")


def group_bits(spec, name: str, tied: bool, eight_bit: frozenset = frozenset()) -> int | None:
    """Bits the entry gives group `name` (None: left fp32), before any reuse of source blocks. A tied table
    is one group, quantised with the logits projection."""
    if name in TABLES:
        quantised = spec.quantize_lm_head if name == "lm_head" or tied else spec.quantize_embedding
        if not quantised:
            return None
        return 8 if spec.kind == "onnx-int8" else spec.lm_head_bits
    return 8 if spec.kind == "onnx-int8" or name in eight_bit else 4


def make_quantizer(spec, tied: bool, gguf: GgufBlocks | None = None, hessians: dict[str, np.ndarray] | None = None,
                   eight_bit: frozenset = frozenset(), bits_override: dict[str, int | None] | None = None):
    """The fused exporter's quantizer for one quantize entry. `bits_override` (group -> bits or None for fp32)
    replaces the entry's choice group by group: the budget search's per-group formats."""
    def quantize(name: str, parts: list[np.ndarray], params: list[str]) -> w.BlockQuant | None:
        bits = bits_override[name] if bits_override and name in bits_override else group_bits(spec, name, tied, eight_bit)
        if bits is None:
            return None
        if spec.source_blocks and gguf is not None:
            reused = source_blocks(gguf, parts, params)
            if reused is not None:
                return reused
        return run_algorithm(spec.algorithm, spec.grid, name, np.concatenate(parts), bits, spec.block_size, hessians)
    return quantize


def source_blocks(gguf: GgufBlocks, parts: list[np.ndarray], params: list[str]) -> w.BlockQuant | None:
    """The group's weight as the source GGUF's own blocks, when every part has them (unchanged) in one width."""
    reused = [gguf.blocks_for(p, part) for p, part in zip(params, parts)]
    if all(r is not None for r in reused) and len({(r.bits, r.block_size) for r in reused}) == 1:
        return w.concat_rows(reused)
    return None


def run_algorithm(algorithm: str, grid: str, name: str, weight: np.ndarray, bits: int, block_size: int,
                  hessians: dict[str, np.ndarray] | None = None) -> w.BlockQuant:
    if algorithm == "hqq":
        return w.hqq(weight, bits, block_size)
    if algorithm == "gptq" and name in (hessians or {}):
        return w.gptq(weight, hessians[name], bits, block_size, grid)
    if algorithm == "gptq" and name not in TABLES:
        raise ValueError(f"gptq needs the calibration Hessian of group {name}")
    return w.rtn(weight, bits, block_size, grid)


def format_quantizer(formats: dict, algorithm: str = "rtn", gguf: GgufBlocks | None = None,
                     hessians: dict[str, np.ndarray] | None = None):
    """The quantizer of a searched structure: group -> `pipeline.model.structure.Format` (absent or None: fp32).
    A source format reuses the GGUF's blocks, and fails loudly when they cannot be (the cost model and the
    search assumed them)."""
    def quantize(name: str, parts: list[np.ndarray], params: list[str]) -> w.BlockQuant | None:
        fmt = formats.get(name)
        if fmt is None:
            return None
        if fmt.source:
            reused = source_blocks(gguf, parts, params) if gguf is not None else None
            if reused is None:
                raise ValueError(f"{name}: the source GGUF's blocks cannot be reused (no GGUF, or the weights "
                                 "changed since it was read)")
            return reused
        return run_algorithm(algorithm, fmt.grid, name, np.concatenate(parts), fmt.bits, fmt.block_size, hessians)
    return quantize
