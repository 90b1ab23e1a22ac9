"""Block-quantised weights in the form onnxruntime's MatMulNBits and GatherBlockQuantized read, and the
algorithms that make them.

A `BlockQuant` holds a [N, K] weight (N outputs, blocks of `block_size` along K) as
    w[n, k] = scale[n, b] * (code[n, k] - zero[n, b]) + offset[n, b]        (k in block b)
with unsigned `bits`-bit codes, fp16-exact scales, an optional uint8 zero point (default 2^(bits-1)) and an
optional per-block offset: the minimum of GGUF's Q4_1 blocks, which MatMulNBits cannot hold and the fused graph
adds back exactly as (per-block sums of the input) x offsets. `dequantize` is the arithmetic the graph does, so
PyTorch can run a model "fake-quantised exactly as the ONNX file is" (the budget search does).

Algorithms: `rtn` (round to nearest: symmetric like GGUF Q4_0/Q8_0, asymmetric with an integer zero point, or
min/offset like Q4_1), `hqq` (min/offset form with scale and offset fitted by half-quadratic optimisation),
`gptq` (error feedback over the input dimension with a calibration Hessian) and `from_gguf` (a GGUF tensor's
own Q4_0/Q4_1/Q8_0 blocks, reused bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

Form = Literal["symmetric", "asymmetric", "offset"]


@dataclass(frozen=True)
class BlockQuant:
    codes: np.ndarray               # uint8 [N, blocks * block_size], one code per element (unpacked)
    scales: np.ndarray              # float32 [N, blocks], each exactly representable in fp16
    zero_points: np.ndarray | None  # uint8 [N, blocks]; None means 2^(bits-1)
    offsets: np.ndarray | None      # float32 [N, blocks], fp16-exact; None means 0
    bits: int
    block_size: int
    k: int                          # unpadded input width

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    @property
    def blocks(self) -> int:
        return self.scales.shape[1]

    def zeros(self) -> np.ndarray:
        if self.zero_points is not None:
            return self.zero_points.astype(np.float32)
        return np.full(self.scales.shape, 2 ** (self.bits - 1), np.float32)

    def dequantize(self) -> np.ndarray:
        """The float32 [N, K] weight the ONNX graph computes with."""
        q = self.codes.reshape(self.n, self.blocks, self.block_size).astype(np.float32)
        w = self.scales[..., None] * (q - self.zeros()[..., None])
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        return w.reshape(self.n, -1)[:, :self.k]

    def packed(self) -> np.ndarray:
        """uint8 [N, blocks, block_size * bits / 8]: MatMulNBits' B (4-bit: two codes a byte, low nibble first)."""
        q = self.codes.reshape(self.n, self.blocks, self.block_size)
        if self.bits == 8:
            return np.ascontiguousarray(q)
        return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)

    def packed_zero_points(self) -> np.ndarray | None:
        """MatMulNBits' zero points: 4-bit packed two a byte along the blocks, 8-bit one a byte."""
        if self.zero_points is None or self.bits == 8:
            return self.zero_points
        z = self.zero_points
        if z.shape[1] % 2:
            z = np.pad(z, ((0, 0), (0, 1)))
        return np.ascontiguousarray(z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)

    def file_bytes(self) -> int:
        """Bytes this weight takes in the ONNX file: codes, fp16 scales, zero points, fp16 offsets."""
        size = self.n * self.blocks * self.block_size * self.bits // 8 + 2 * self.scales.size
        if self.zero_points is not None:
            size += self.packed_zero_points().size
        if self.offsets is not None:
            size += 2 * self.offsets.size
        return size


def concat_rows(parts: list[BlockQuant]) -> BlockQuant:
    """Stack weights along N (a fused QKV or gate/up projection): blocks run along K, so rows stay exact."""
    first = parts[0]
    if any((p.bits, p.block_size, p.k) != (first.bits, first.block_size, first.k) for p in parts):
        raise ValueError("fused projections need one bit width, block size and input width")
    if len({p.zero_points is None for p in parts}) > 1 or len({p.offsets is None for p in parts}) > 1:
        parts = [_explicit(p) for p in parts]

    def cat(name):
        arrays = [getattr(p, name) for p in parts]
        return None if arrays[0] is None else np.concatenate(arrays)
    return replace(first, codes=cat("codes"), scales=cat("scales"), zero_points=cat("zero_points"),
                   offsets=cat("offsets"))


def _explicit(p: BlockQuant) -> BlockQuant:
    zeros = p.zero_points if p.zero_points is not None else p.zeros().astype(np.uint8)
    offsets = p.offsets if p.offsets is not None else np.zeros_like(p.scales)
    return replace(p, zero_points=zeros, offsets=offsets)


# ---------------------------------------------------------------- algorithms

def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    """float64 [N, blocks, block] of a [N, K] weight, K padded with zeros to whole blocks."""
    w = np.asarray(w, np.float64)
    pad = -w.shape[1] % block
    return np.pad(w, ((0, 0), (0, pad))).reshape(w.shape[0], -1, block)


def _fp16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64).astype(np.float16).astype(np.float64)


def _codes(x: np.ndarray, bits: int) -> np.ndarray:
    return np.clip(np.rint(x), 0, 2 ** bits - 1).astype(np.uint8)


def rtn(w: np.ndarray, bits: int = 4, block_size: int = 32, form: Form = "symmetric") -> BlockQuant:
    """Round to nearest, one scale per block. symmetric: GGUF Q4_0/Q8_0's rule (the largest-magnitude value maps
    to the lowest code, zero point 2^(bits-1)); asymmetric: min/max with an integer zero point; offset: GGUF
    Q4_1's rule (scale = (max - min) / (2^bits - 1), offset = min, zero point 0)."""
    x = _blocks(w, block_size)
    scale, zero, offset = _grid(x, bits, form)
    return _encode(x, scale, zero, offset, bits, block_size, w.shape[1])


def _grid(x: np.ndarray, bits: int, form: Form, shrink: float = 1.0):
    """(scale, zero point or None, offset or None) per block of `x` [N, blocks, block], fp16-exact. `shrink` < 1
    narrows the range to that fraction (about its middle for the offset form): values outside it clip."""
    top = 2 ** bits - 1
    if form == "symmetric":
        extreme = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]
        return _fp16(shrink * extreme / -(2 ** (bits - 1))), None, None
    if form == "asymmetric":  # the zero point must be a code, so the range includes 0
        low, high = shrink * np.minimum(x.min(-1), 0), shrink * np.maximum(x.max(-1), 0)
        scale = _fp16((high - low) / top)
        return scale, np.clip(np.rint(-low / np.where(scale == 0, 1, scale)), 0, top), None
    low, high = x.min(-1), x.max(-1)
    middle = (low + high) / 2
    low, high = middle + shrink * (low - middle), middle + shrink * (high - middle)
    return _fp16((high - low) / top), np.zeros(low.shape), _fp16(low)


COARSE, FINE = (1.0, 0.85, 0.7, 0.55), 0.05  # the 5 % grid from 1 to 0.55 in six tries per block instead of ten


def _searched_grid(x: np.ndarray, bits: int, form: Form, importance: np.ndarray):
    """The grid per block, among round to nearest's range shrunk to 55-100 % of itself (coarse steps, then
    5 % either side of each block's best), with the least squared rounding error weighted by `importance` (per
    input, broadcast along x's last axis): clipping a block's outliers buys finer steps for the rest, and in
    blocks of 64 or 128 that usually pays. At 8 bits the steps are fine already: the plain grid."""
    if bits >= 8:
        return _grid(x, bits, form)
    best = None

    def consider(shrink: np.ndarray) -> None:
        nonlocal best
        grid = _grid(x, bits, form, shrink)
        error = (importance * (x - _rounded(x, grid, bits)) ** 2).sum(-1)
        if best is None:
            best = grid, error, shrink
            return
        better = error < best[1]
        best = (tuple(None if b is None else np.where(better, g, b) for b, g in zip(best[0], grid)),
                np.minimum(error, best[1]), np.where(better, shrink, best[2]))
    for shrink in COARSE:
        consider(np.full(x.shape[:-1], shrink))
    centre = best[2]
    for step in (-FINE, FINE):
        consider(np.clip(centre + step, COARSE[-1], COARSE[0]))
    return best[0]


def _zeros(scale: np.ndarray, zero: np.ndarray | None, bits: int) -> np.ndarray:
    """Per-block zero points: the given ones, or MatMulNBits' default 2^(bits-1)."""
    return np.full(scale.shape, 2 ** (bits - 1)) if zero is None else zero


def _rounded(x: np.ndarray, grid, bits: int) -> np.ndarray:
    """x rounded to the nearest level of its blocks' grid, as the graph will compute it."""
    scale, zero, offset = grid
    zeros = _zeros(scale, zero, bits)
    shift = 0 if offset is None else offset[..., None]
    return scale[..., None] * (_nearest(x, scale, zeros, offset, bits) - zeros[..., None]) + shift


def _nearest(x, scale, zeros, offset, bits) -> np.ndarray:
    shifted = x - (0 if offset is None else offset[..., None])
    return _codes(np.divide(shifted, scale[..., None], out=np.zeros_like(shifted), where=scale[..., None] != 0)
                  + zeros[..., None], bits)


def _encode(x, scale, zero, offset, bits, block_size, k) -> BlockQuant:
    """Codes of `x` on the given per-block grid, nearest level."""
    codes = _nearest(x, scale, _zeros(scale, zero, bits), offset, bits)
    return _pack(codes, scale, None if zero is None else zero.astype(np.uint8), offset, bits, block_size, k)


def _pack(codes, scale, zero, offset, bits, block_size, k) -> BlockQuant:
    n = codes.shape[0]
    return BlockQuant(codes=codes.reshape(n, -1), scales=scale.astype(np.float32),
                      zero_points=zero, offsets=None if offset is None else offset.astype(np.float32),
                      bits=bits, block_size=block_size, k=k)


def hqq(w: np.ndarray, bits: int = 4, block_size: int = 32, iters: int = 20, p: float = 0.7) -> BlockQuant:
    """Offset form (w = scale * code + offset, like Q4_1) fitted by half-quadratic optimisation (Badri & Shaji,
    2023): alternately round the codes and refit scale and offset per block to an lp-shrunk residual (p < 1
    makes outliers matter less than a least-squares fit would). Starts from Q4_1's min/max rule and keeps, per
    block, whichever of the two has the lower squared error."""
    x = _blocks(w, block_size)
    start = rtn(w, bits, block_size, "offset")
    scale, offset = start.scales.astype(np.float64), start.offsets.astype(np.float64)
    top, beta = 2 ** bits - 1, 10.0
    for _ in range(iters):
        safe = np.where(scale == 0, 1, scale)
        q = np.clip(np.rint((x - offset[..., None]) / safe[..., None]), 0, top)
        err = x - (scale[..., None] * q + offset[..., None])
        with np.errstate(divide="ignore"):  # |0|^(p-1) is inf: a zero residual stays zero
            shrunk = np.sign(err) * np.maximum(np.abs(err) - np.abs(err) ** (p - 1) / beta, 0)  # lp proximal step
        target = x - shrunk
        scale, offset = _fit_affine(q, target, scale, offset)
        beta *= 1.01
    fitted = _encode(x, _fp16(scale), np.zeros(scale.shape), _fp16(offset), bits, block_size, w.shape[1])
    return _better_per_block(w, start, fitted)


def _fit_affine(q, target, scale, offset):
    """Least-squares scale and offset per block for target ~ scale * q + offset (kept where degenerate)."""
    mean_q, mean_t = q.mean(-1), target.mean(-1)
    var = ((q - mean_q[..., None]) ** 2).mean(-1)
    cov = ((q - mean_q[..., None]) * (target - mean_t[..., None])).mean(-1)
    ok = var > 0
    new_scale = np.where(ok, cov / np.where(ok, var, 1), scale)
    return new_scale, np.where(ok, mean_t - new_scale * mean_q, offset)


def _better_per_block(w: np.ndarray, a: BlockQuant, b: BlockQuant) -> BlockQuant:
    x = _blocks(w, a.block_size)

    def err(q):
        return ((_blocks(q.dequantize(), a.block_size) - x) ** 2).sum(-1)
    pick_b = err(b) < err(a)
    codes = np.where(pick_b.repeat(a.block_size, 1), b.codes, a.codes)
    return replace(a, codes=codes, scales=np.where(pick_b, b.scales, a.scales),
                   offsets=np.where(pick_b, b.offsets, a.offsets))


def gptq(w: np.ndarray, hessian: np.ndarray, bits: int = 4, block_size: int = 32, form: Form = "symmetric",
         damp: float = 0.01) -> BlockQuant:
    """GPTQ (Frantar et al., 2022): quantise the input columns in order and push each column's rounding error
    onto the columns not yet quantised through the inverse of the calibration Hessian H = X^T X (this linear's
    inputs). Each block's grid is chosen when the block starts, on its already corrected weights, by
    `_searched_grid` weighted by the Hessian's diagonal (each input's mean square)."""
    w = _blocks(w, block_size).reshape(w.shape[0], -1)
    n, k = w.shape
    h = np.zeros((k, k))
    h[:hessian.shape[0], :hessian.shape[0]] = hessian
    dead = np.diag(h) == 0  # inputs never seen (and padding): their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H^-1
    grids, codes = [], np.zeros((n, k), np.uint8)
    for start in range(0, k, block_size):  # lazy batches: the errors of a block reach later columns in one matmul
        stop = start + block_size
        block, errors = w[:, start:stop].copy(), np.zeros((n, block_size))
        scale, zero, offset = _searched_grid(block[:, None, :], bits, form, np.diag(h)[start:stop])
        grids.append((scale, zero, offset))
        zeros = _zeros(scale, zero, bits)
        shift = 0 if offset is None else offset[:, 0]
        for j in range(block_size):
            q = _codes(np.divide(block[:, j] - shift, scale[:, 0], out=np.zeros(n), where=scale[:, 0] != 0)
                       + zeros[:, 0], bits)
            codes[:, start + j] = q
            errors[:, j] = (block[:, j] - (scale[:, 0] * (q - zeros[:, 0]) + shift)) / u[start + j, start + j]
            block[:, j + 1:] -= np.outer(errors[:, j], u[start + j, start + j + 1:stop])
        w[:, stop:] -= errors @ u[start:stop, stop:]
    scale = np.concatenate([g[0] for g in grids], 1)
    zero = None if grids[0][1] is None else np.concatenate([g[1] for g in grids], 1).astype(np.uint8)
    offset = None if grids[0][2] is None else np.concatenate([g[2] for g in grids], 1)
    return _pack(codes, scale, zero, offset, bits, block_size, hessian.shape[0])


# ---------------------------------------------------------------- GGUF blocks, reused exactly

GGUF_BLOCK = 32


def from_gguf(kind: str, raw: np.ndarray, n: int, k: int) -> BlockQuant:
    """A GGUF tensor's blocks as a BlockQuant that dequantises exactly as ggml does. `raw` is the tensor's uint8
    data [n, k / 32 * bytes per block]. Q8_0: d (fp16) + 32 int8; Q4_0: d + 16 bytes of nibbles, w = d (q - 8);
    Q4_1: d, m (fp16) + 16 bytes, w = d q + m. ggml stores a block's first 16 values in the low nibbles."""
    blocks = raw.reshape(n, k // GGUF_BLOCK, -1)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        q = blocks[..., 2:34].copy().view(np.int8).astype(np.int16) + 128
        return BlockQuant(q.astype(np.uint8).reshape(n, k), d, None, None, 8, GGUF_BLOCK, k)
    if kind not in ("Q4_0", "Q4_1"):
        raise ValueError(f"GGUF block type {kind} is not reused; only Q4_0, Q4_1 and Q8_0 are")
    start = 2 if kind == "Q4_0" else 4
    nibbles = blocks[..., start:start + 16]
    q = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).astype(np.uint8).reshape(n, k)
    if kind == "Q4_0":
        return BlockQuant(q, d, None, None, 4, GGUF_BLOCK, k)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    return BlockQuant(q, d, np.zeros(d.shape, np.uint8), m, 4, GGUF_BLOCK, k)
