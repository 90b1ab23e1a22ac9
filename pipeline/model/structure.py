"""What a compressed model is, as the budget search and its cost model see it: which sublayers stay
(`Structure`), how each linear group is stored (`Format`: bits, block size, zero points, GGUF offsets, or the
source GGUF's own blocks), and the groups' names, shapes and parameters, read from the adapter row and the
model's shape alone (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import ceil
from typing import Literal

from ..artifacts import ModelInfo
from .adapters import ADAPTERS

KIND_ORDER = ("qkv", "o", "gate_up", "down")
TABLE = "embedding"
KvDtype = Literal["fp32", "fp16"]
KV_BYTES = {"fp32": 4, "fp16": 2}
@dataclass(frozen=True)
class Format:
    """How one linear group's weight is stored: `bits`-bit codes in blocks of `block_size` with an fp16 scale
    each, optional zero points and GGUF Q4_1-style offsets; `source` marks the source GGUF's own blocks."""

    bits: int
    block_size: int
    zero_points: bool = False
    offsets: bool = False
    source: bool = False

    @property
    def grid(self) -> str:
        return "offset" if self.offsets else "asymmetric" if self.zero_points else "symmetric"

    @property
    def name(self) -> str:
        """q4b32 (symmetric), q4b32-zp (integer zero point) or q4b32-min (Q4_1's per-block minimum); source."""
        suffix = {"symmetric": "", "asymmetric": "-zp", "offset": "-min"}[self.grid]
        return "source" if self.source else f"q{self.bits}b{self.block_size}{suffix}"

    def blocks(self, k: int) -> int:
        return ceil(k / self.block_size)

    def payload(self, n: int, k: int) -> int:
        """Bytes of codes and fp16 scales of an [N, K] weight (K padded to whole blocks), without extras."""
        b = self.blocks(k)
        return n * b * self.block_size * self.bits // 8 + 2 * n * b

    def zero_point_bytes(self, n: int, k: int) -> int:
        b = self.blocks(k)
        return n * (b if self.bits == 8 else ceil(b / 2)) if self.zero_points else 0


def quant_format(bits: int, block_size: int, form: str) -> Format:
    """The format the quantisers write for a form: symmetric (scale only), asymmetric (integer zero point),
    offset (Q4_1-like: explicit zero points of 0 and an fp16 offset per block)."""
    return Format(bits, block_size, zero_points=form != "symmetric", offsets=form == "offset")


GGUF_FORMATS = {"Q4_0": Format(4, 32, source=True), "Q8_0": Format(8, 32, source=True),
                "Q4_1": Format(4, 32, zero_points=True, offsets=True, source=True)}


def merged_source(types: list[str]) -> Format | None:
    """The format of a fused group whose parts are the GGUF types `types`, or None when the blocks cannot be
    reused (an unsupported type, or parts of different bit widths). Mixed extras are written for every part."""
    formats = [GGUF_FORMATS.get(t) for t in types]
    if not formats or any(f is None for f in formats) or len({f.bits for f in formats}) > 1:
        return None
    return Format(formats[0].bits, 32, zero_points=any(f.zero_points for f in formats),
                  offsets=any(f.offsets for f in formats), source=True)


@dataclass(frozen=True)
class Structure:
    """A compressed model as the cost model sees it: the kept sublayers (per layer), each kept linear group's
    format (None: fp32) and the table's (`embedding`, also the logits projection when tied; `lm_head` untied),
    and the KV cache precision."""

    attention: tuple[bool, ...]
    mlp: tuple[bool, ...]
    formats: dict[str, Format | None] = field(default_factory=dict)
    kv_dtype: KvDtype = "fp32"

    def keeps(self, group: str) -> bool:
        """Whether the structure keeps the sublayer a group belongs to (tables always stay)."""
        parts = group.split(".")
        if len(parts) < 3:
            return True
        return (self.attention if parts[2] in ("qkv", "o") else self.mlp)[int(parts[1])]

    def groups(self, info: ModelInfo) -> list[str]:
        """The linear groups this structure keeps, in the exporter's order."""
        kept = []
        for i in range(info.num_layers):
            kept += [f"layers.{i}.{k}" for k in KIND_ORDER[:2] if self.attention[i]]
            kept += [f"layers.{i}.{k}" for k in KIND_ORDER[2:] if self.mlp[i]]
        return [*kept, TABLE, *(() if info.tie_word_embeddings else ("lm_head",))]


def group_shape(info: ModelInfo, group: str) -> tuple[int, int]:
    """(N outputs, K inputs) of a group's fused weight."""
    h, q = info.hidden_size, info.num_heads * info.head_dim
    kind = group.rsplit(".", 1)[-1]
    return {"qkv": (q + 2 * info.num_kv_heads * info.head_dim, h), "o": (h, q),
            "gate_up": (2 * info.intermediate_size, h), "down": (h, info.intermediate_size),
            "embedding": (info.vocab_size, h), "lm_head": (info.vocab_size, h)}[kind]


def group_params(info: ModelInfo, group: str) -> list[str]:
    """The parameter paths (without `.weight`) of a group's parts, from the adapter row."""
    ad = ADAPTERS[info.model_type]
    if group in (TABLE, "lm_head"):
        return [ad.embed if group == TABLE else ad.lm_head]
    _, i, kind = group.split(".")
    base = f"{ad.layers}.{i}.{ad.attention if kind in ('qkv', 'o') else ad.mlp}"
    names = {"qkv": (ad.q_proj, ad.k_proj, ad.v_proj), "o": (ad.o_proj,), "gate_up": (ad.gate_proj, ad.up_proj),
             "down": (ad.down_proj,)}[kind]
    return [f"{base}.{n}" for n in names]


def all_groups(info: ModelInfo) -> list[str]:
    return Structure((True,) * info.num_layers, (True,) * info.num_layers).groups(info)
