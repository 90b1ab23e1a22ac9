"""The exact cost model of a compressed model: file bytes, KV cache and, from a per-target calibration, peak
memory and decode time. Pure arithmetic on the model's shape (`ModelInfo`) and a `structure.Structure` (what is
kept, how each linear group is stored), so the budget search prices thousands of candidates without a file.

File bytes mirror `pipeline.export.fused` initializer by initializer (packed codes, fp16 scales, zero points,
GGUF offsets, the tied table stored once, norms, the embedding scale, shape constants, and a rotary cache pair
per base a kept layer reads, of `info.max_position_embeddings` rows: `ModelInfo.with_max_length` gives
export.max_length's) plus the protobuf framing of initializers and nodes. Memory and decode time are linear in
these figures with coefficients a target's calibration measured (`pipeline.measure.footprint`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..artifacts import ModelInfo
from .adapters import ADAPTERS
from .structure import KV_BYTES, TABLE, Format, Structure, group_shape

# Serialised node sizes (name, op type, input and output names, attributes), averages measured on fused files;
# initializers are framed exactly (tags, lengths, dims, name).
NODE_BYTES = {"": 74, "MatMulNBits": 238, "GroupQueryAttention": 366, "SkipSimplifiedLayerNormalization": 371,
              "SimplifiedLayerNormalization": 215, "GatherBlockQuantized": 206, "ReduceSum": 105, "Reshape": 94,
              "Split": 109, "MatMul": 78, "Cast": 75}
# Nodes writing act(gate) (pipeline.export.fused.ACTIVATIONS): Sigmoid and Mul, or FastGelu.
ACTIVATION_NODES = {"silu": 2, "gelu_pytorch_tanh": 1}
IO_BYTES = 75     # one graph input or output: name, element type, symbolic shape
GRAPH_BYTES = 60  # model and graph headers, opset imports


# ---------------------------------------------------------------- file bytes

def _varint(n: int) -> int:
    return max(1, (int(n).bit_length() + 6) // 7)


class _Tally:
    """Initializers (payload plus protobuf framing, exact) and nodes (measured average sizes per op type)."""

    def __init__(self):
        self.bytes = GRAPH_BYTES

    def init(self, name: str, shape: tuple[int, ...], itemsize: float = 4) -> None:
        payload = int(round(itemsize * _prod(shape)))
        inner = (sum(1 + _varint(d) for d in shape) + 2 + 1 + _varint(len(name)) + len(name)
                 + 1 + _varint(payload) + payload)
        self.bytes += 1 + _varint(inner) + inner

    def op(self, op_type: str = "", count: int = 1) -> None:
        self.bytes += count * NODE_BYTES.get(op_type, NODE_BYTES[""])


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def file_bytes(info: ModelInfo, s: Structure) -> int:
    """Bytes of the fused ONNX file `pipeline.export.fused.export_fused` writes for this structure."""
    t = _Tally()
    t.init("one_axis", (1,), 8)
    t.init("one", (), 8)
    t.init("axis1", (), 8)
    t.op("ReduceSum")
    t.op(count=5)  # Sub, Cast, Shape, Gather, Cast: the mask's sequence lengths and total length
    table = s.formats.get(TABLE)
    _table(t, info, table)
    ad, h, first, rotary = ADAPTERS[info.model_type], info.hidden_size, True, set()
    if ad.embed_scale:
        t.init("embed_scale", ())
        t.op()  # Mul
    for i in range(info.num_layers):
        if s.attention[i]:
            local = ad.rotary_local is not None and i in info.sliding_layers
            _attention(t, info, s, i, ad, first, local not in rotary, "_local" * local)
            first = False
            rotary.add(local)
        if s.mlp[i]:
            t.init(f"layers.{i}.mlp_norm.weight", (h,))
            t.op("SkipSimplifiedLayerNormalization")
            _linear(t, info, s, f"layers.{i}.gate_up")
            t.init(f"layers.{i}.split", (2,), 8)
            t.op("Split")
            t.op(count=ACTIVATION_NODES[info.activation] + 1)  # act(gate), times up
            _linear(t, info, s, f"layers.{i}.down")
            _post_norm(t, ad.mlp_post_norm, f"layers.{i}.mlp_post_norm", h)
    t.init("final_norm.weight", (h,))
    t.op("SkipSimplifiedLayerNormalization")
    _lm_head(t, info, s, table)
    io = 3 + 4 * sum(s.attention)  # graph inputs and outputs, each with a type and a shape
    return t.bytes + IO_BYTES * io


def _post_norm(t: _Tally, name: str | None, label: str, h: int) -> None:
    if name is not None:
        t.init(f"{label}.weight", (h,))
        t.op("SimplifiedLayerNormalization")


def _attention(t: _Tally, info: ModelInfo, s: Structure, i: int, ad, first: bool, new_rotary: bool,
               suffix: str) -> None:
    h, d = info.hidden_size, info.head_dim
    t.init(f"layers.{i}.attention_norm.weight", (h,))
    t.op("SkipSimplifiedLayerNormalization")
    _linear(t, info, s, f"layers.{i}.qkv")
    if new_rotary:  # each base's pair written once, in the KV precision (GroupQueryAttention's float type)
        for name in ("cos_cache", "sin_cache"):
            t.init(name + suffix, (info.max_position_embeddings, d // 2), KV_BYTES[s.kv_dtype])
    if ad.q_norm is not None:
        t.init(f"layers.{i}.qkv_split", (3,), 8)
        if first:
            t.init("per_head_shape", (4,), 8)
            t.init("flat_heads_shape", (3,), 8)
        t.init(f"layers.{i}.{ad.q_norm}.weight", (d,))
        t.init(f"layers.{i}.{ad.k_norm}.weight", (d,))
        t.op("Split")
        t.op("Reshape", 4)
        t.op("SimplifiedLayerNormalization", 2)
    t.op("GroupQueryAttention")
    if s.kv_dtype == "fp16":  # Casts of its inputs to fp16 and of its output back
        t.op("Cast", 2 + (2 if ad.q_norm is not None else 0))
    _linear(t, info, s, f"layers.{i}.o")
    _post_norm(t, ad.attention_post_norm, f"layers.{i}.attention_post_norm", h)


def _linear(t: _Tally, info: ModelInfo, s: Structure, group: str) -> None:
    n, k = group_shape(info, group)
    fmt = s.formats.get(group)
    if fmt is None:
        t.init(f"{group}.weight", (k, n))
        t.op("MatMul")
    else:
        _quantised(t, group, fmt, n, k)
        t.op("MatMulNBits")
        if fmt.zero_points:
            t.init(f"{group}.zero_points", (n, fmt.zero_point_bytes(n, k) // n), 1)
        if fmt.offsets:
            _offsets(t, f"{group}.offsets_t", fmt, n, k)
    if group.rsplit(".", 1)[-1] in info.biases:
        t.init(f"{group}.bias", (n,))
        t.op("Add")


def _quantised(t: _Tally, prefix: str, fmt: Format, n: int, k: int) -> None:
    """Packed codes and fp16 scales (cast to fp32 in the graph)."""
    b = fmt.blocks(k)
    t.init(f"{prefix}.q{fmt.bits}", (n, b, fmt.block_size * fmt.bits // 8), 1)
    t.init(f"{prefix}.scales_fp16", (n, b), 2)
    t.op("Cast")


def _offsets(t: _Tally, name: str, fmt: Format, n: int, k: int) -> None:
    """Offsets [blocks, N] in fp16 and the exact correction: block sums of the input times the offsets."""
    t.init(f"{name}_fp16", (fmt.blocks(k), n), 2)
    t.init("/blocksum_shape_0", (4,), 8)
    t.init("/blocksum_axis_0", (1,), 8)
    t.op("Cast")
    t.op("Reshape")
    t.op("ReduceSum")
    t.op("MatMul")
    t.op("Add")


def _table(t: _Tally, info: ModelInfo, fmt: Format | None) -> None:
    n, k = group_shape(info, TABLE)
    if fmt is None:
        t.init("embed.weight", (n, k))
        t.op("Gather")
        return
    b = fmt.blocks(k)
    _quantised(t, "embed", fmt, n, k)
    t.init("last_axis", (1,), 8)
    t.init("rows_shape", (3,), 8)
    t.op("Unsqueeze")
    t.op("GatherBlockQuantized")
    t.op("Reshape")
    if fmt.zero_points:
        t.init("embed.zero_points_3d", (n, b, 1), 1)
    if fmt.offsets:
        t.init("embed.offsets_fp16", (n, b), 2)
        t.init("block_shape", (4,), 8)
        t.op("Cast")
        t.op(count=5)  # Gather, Unsqueeze, Expand, Reshape, Add
    if k != b * fmt.block_size:
        t.init("unpad_start", (1,), 8)
        t.init("unpad_end", (1,), 8)
        t.op()


def _lm_head(t: _Tally, info: ModelInfo, s: Structure, table: Format | None) -> None:
    if not info.tie_word_embeddings:
        _linear(t, info, s, "lm_head")
    elif table is None:
        t.init("head_2d", (2,), 8)
        t.init("vocab", (1,), 8)
        t.op("Reshape", 2)
        t.op(count=3)  # Gemm, Shape, Concat
    else:  # MatMulNBits reads the lookup's codes and scales: the table is stored once
        n, k = group_shape(info, TABLE)
        t.op("MatMulNBits")
        if table.zero_points:
            t.init("embed.zero_points", (n, table.zero_point_bytes(n, k) // n), 1)
        if table.offsets:
            _offsets(t, "embed.offsets_t", table, n, k)
    t.op()  # Identity naming the logits


# ---------------------------------------------------------------- runtime figures

def kv_bytes_per_token(info: ModelInfo, s: Structure) -> int:
    """KV cache bytes one token adds at batch 1: a key and a value per kept attention layer."""
    return 2 * sum(s.attention) * info.num_kv_heads * info.head_dim * KV_BYTES[s.kv_dtype]


# Features of the runtime models a target's calibration fits (pipeline.measure.footprint): onnxruntime copies
# and repacks codes at load (a tied table is read by two kernels and kept twice), adds fp32 scales and block sums
# per block, fp32 offsets and their correction, the KV cache, and (a table with offsets) a [chunk, vocab]
# correction at every prefill chunk. Each KV precision is fitted on its own (FootprintCalibration).
PREFILL_CHUNK = 128  # the memory protocol's prefill chunk (ort_runner.MEMORY_CHUNK)
MEMORY_FEATURES = ("base", "linear_codes_mib", "table_codes_mib", "blocks_m", "offset_blocks_m",
                   "table_offsets_mib", "kv_mib")
DECODE_FEATURES = ("base", "attention", "mlp", "linear_codes_mib", "table_codes_mib", "blocks_m")


def runtime_features(info: ModelInfo, s: Structure, context: int) -> dict[str, float]:
    """The structure's figures that peak memory and decode time are linear in."""
    mib = 2 ** 20
    f = dict.fromkeys({*MEMORY_FEATURES, *DECODE_FEATURES}, 0.0)
    f.update(base=1.0, attention=sum(s.attention), mlp=sum(s.mlp),
             kv_mib=kv_bytes_per_token(info, s) * context / mib)
    for g in s.groups(info):
        fmt, (n, k) = s.formats.get(g), group_shape(info, g)
        codes = 4 * n * k if fmt is None else n * fmt.blocks(k) * fmt.block_size * fmt.bits // 8
        f["table_codes_mib" if g in (TABLE, "lm_head") else "linear_codes_mib"] += codes / mib
        if fmt is not None:
            f["blocks_m"] += n * fmt.blocks(k) / 1e6
            f["offset_blocks_m"] += n * fmt.blocks(k) / 1e6 if fmt.offsets else 0
    table = s.formats.get(TABLE)
    if table is not None and table.offsets:
        f["table_offsets_mib"] = PREFILL_CHUNK * info.vocab_size * 4 / mib
    return f


@dataclass(frozen=True)
class Footprint:
    """What a structure costs: the file, the KV cache, and (with a calibration) peak memory and decode time."""

    file_mb: float
    kv_kb_per_token: float
    memory_mb: float | None = None
    decode_ms: float | None = None


def footprint(info: ModelInfo, s: Structure, context: int, calibration=None) -> Footprint:
    """The structure's costs; memory and decode time from `calibration` (a FootprintCalibration), else None."""
    size, kv = file_bytes(info, s), kv_bytes_per_token(info, s)
    if calibration is None:
        return Footprint(size / 1e6, kv / 1024)
    features = runtime_features(info, s, context)
    return Footprint(size / 1e6, kv / 1024, calibration.memory_mb(features, s.kv_dtype),
                     calibration.decode_ms(features, s.kv_dtype))
