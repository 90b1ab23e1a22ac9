"""Write a (pruned, healed, quantised) causal LM as one fused decoder graph, the layout onnxruntime-genai's
model builder writes: GroupQueryAttention with rotary inside (KV only for kept attention layers, each with its own
head counts), SkipSimplifiedLayerNormalization, fused QKV and gate/up projections, and MatMulNBits wherever a
weight is block-quantised (`pipeline.export.weights.BlockQuant`).

The graph is written from the adapter table and the modules' own weights, so the non-uniform structure of a
compressed model is kept: a dropped attention sublayer has no norm, no attention node and no KV; a dropped MLP
has nothing. Inputs: input_ids, attention_mask [batch, total length] (positions come from it: no left
padding), past_key_values.{i}.key/.value [batch, kv_heads_i, past, head_dim]; outputs: logits and
present.{i}.key/.value. The KV cache is fp32, or fp16 with `kv_dtype="fp16"` (half the KV memory:
GroupQueryAttention then runs in fp16 between Casts, with fp16 rotary caches). Quantised weights with GGUF Q4_1
offsets get an exact fp32 correction: the input's per-block sums times the offsets. Family details come from the
adapter row: norms scaling by (offset + weight), scaled embedding rows, the activation, and a second rotary base
for sliding-window layers (Gemma 3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..artifacts import OnnxExport
from ..errors import ExportError
from ..model.adapters import adapter_for, get_path, is_sliding
from ..model.groups import linear_groups
from ..model.window import sink_of, window_of
from .weights import BlockQuant

ONNX_NAME = "model.onnx"
# MLP activation -> how the graph writes act(x); tanh-GELU is onnxruntime's FastGelu (Gelu's approximate
# attribute needs opset 20).
ACTIVATIONS = {
    "silu": lambda g, x: g.op("Mul", [x, g.op("Sigmoid", [x])]),
    "gelu_pytorch_tanh": lambda g, x: g.op("FastGelu", [x], domain="com.microsoft"),
}
# Config settings the graph has no layout for, refused when set (Gemma 3 270M has neither).
UNSUPPORTED = ("final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention")
# (group name such as "layers.3.qkv" or "lm_head", the parts' [N, K] fp32 weights, the parts' parameter names)
# -> the group's BlockQuant, or None to keep it fp32.
Quantizer = Callable[[str, list, list], "BlockQuant | None"]


class _Graph:
    """Nodes and initializers of one graph, with fresh output names."""

    def __init__(self):
        from onnx import TensorProto

        self.nodes, self.inits, self.names, self.float = [], [], set(), TensorProto.FLOAT
        self._count = 0

    def const(self, name: str, array: np.ndarray) -> str:
        """An initializer; asking again for a name already written (a shared shape, say) reuses it."""
        from onnx import numpy_helper

        if name not in self.names:
            self.names.add(name)
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs):
        from onnx import helper

        self._count += 1
        names = outputs if isinstance(outputs, list) else [f"/{op_type}_{self._count}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=f"/{op_type}_{self._count}",
                                           domain=domain, **attrs))
        return names[0] if len(names) == 1 else names

    def float_const(self, name: str, array: np.ndarray) -> str:
        """An fp32 constant stored as fp16 when that is exact (block scales and offsets are), cast at load."""
        array = np.asarray(array, np.float32)
        half = array.astype(np.float16)
        if np.array_equal(half.astype(np.float32), array):
            return self.op("Cast", [self.const(name + "_fp16", half)], to=self.float)
        return self.const(name, array)


KV_TYPES = ("fp32", "fp16")


def export_fused(model, out_dir: Path, quantizer: Quantizer | None = None, accuracy_level: int = 4,
                 opset: int = 18, kv_dtype: str = "fp32", max_length: int | None = None) -> OnnxExport:
    """Write `out_dir/model.onnx` for `model` (not modified); quantised wherever `quantizer` says so, with a
    KV cache of `kv_dtype` (fp32 or fp16) and rotary caches for `max_length` positions (None: the config's
    max_position_embeddings)."""
    import onnx
    import torch
    from onnx import TensorProto, helper

    from .onnx import save_onnx

    ad, config = adapter_for(model.config), model.config
    if not ad.fused_graph:
        raise ExportError(f"the fused export cannot write {config.model_type} models (their norms, activation or "
                          "rotary embeddings have no fused layout); export with export.graph: optimum")
    activation = getattr(config, ad.activation, None)
    if activation not in ACTIVATIONS:
        raise ExportError(f"the fused export supports the MLP activations {sorted(ACTIVATIONS)}, not "
                          f"{ad.activation} {activation!r}; export with export.graph: optimum")
    for name in UNSUPPORTED:
        if getattr(config, name, None):
            raise ExportError(f"the fused export has no layout for {name} ({getattr(config, name)!r} in this "
                              f"{config.model_type} config); export with export.graph: optimum")
    if kv_dtype not in KV_TYPES:
        raise ExportError(f"kv_dtype {kv_dtype!r} is not one of {KV_TYPES}")
    positions = int(getattr(config, "max_position_embeddings", 4096))
    if max_length is not None and max_length > positions:
        raise ExportError(f"max_length {max_length} exceeds the model's max_position_embeddings {positions}")
    g = _Graph()
    writer = _Writer(g, model, ad, quantizer or (lambda *a: None), accuracy_level, kv_dtype,
                     max_length or positions, ACTIVATIONS[activation])
    with torch.no_grad():
        logits, kv = writer.decoder()
    if not kv:
        raise ExportError("every attention layer is dropped, so the model has no KV cache to export; keep at "
                          "least one attention layer in the drop plan.")
    batch, seq, total, past = "batch_size", "sequence_length", "total_sequence_length", "past_sequence_length"
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, seq]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [batch, total])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, seq, config.vocab_size])]
    kv_type = TensorProto.FLOAT16 if kv_dtype == "fp16" else TensorProto.FLOAT
    for slot, (heads, dim) in enumerate(kv):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{slot}.{kind}", kv_type,
                                                        [batch, heads, past, dim]))
            outputs.append(helper.make_tensor_value_info(f"present.{slot}.{kind}", kv_type,
                                                         [batch, heads, total, dim]))
    graph = helper.make_graph(g.nodes, "slimformer-fused", inputs, outputs, g.inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                         helper.make_opsetid("com.microsoft", 1)],
                                   producer_name="slimformer")
    onnx_model.ir_version = min(onnx_model.ir_version, 10)  # onnxruntime 1.32 reads IR <= 10
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ONNX_NAME
    save_onnx(onnx_model, path)
    return OnnxExport(path, len(kv), tuple(i.name for i in inputs), tuple(o.name for o in outputs), graph="fused")


class _Writer:
    """Walks the decoder layer by layer, keeping the residual stream and the sublayer output not yet added to it
    (SkipSimplifiedLayerNormalization adds it while normalising for the next sublayer)."""

    def __init__(self, g: _Graph, model, ad, quantizer: Quantizer, accuracy_level: int, kv_dtype: str,
                 positions: int, activation):
        self.g, self.model, self.ad, self.quantizer, self.level = g, model, ad, quantizer, accuracy_level
        self.half, self.positions, self.activation = kv_dtype == "fp16", positions, activation
        self._cos_sin = {}
        self.config = model.config
        self.residual, self.pending = None, None
        self.groups = linear_groups(model)
        self.block_sums: dict[tuple[str, int], str] = {}

    def decoder(self) -> tuple[str, list[tuple[int, int]]]:
        g, ad = self.g, self.ad
        seqlens = g.op("Cast", [g.op("Sub", [g.op("ReduceSum", ["attention_mask", g.const("one_axis", np.array(
            [1], np.int64))], keepdims=0), g.const("one", np.array(1, np.int64))])], to=6)  # int32
        total = g.op("Cast", [g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const("axis1", np.array(
            1, np.int64))], axis=0)], to=6)
        self.mask = (seqlens, total)
        self.residual = self._embedding()
        kv = []
        for index, layer in enumerate(get_path(self.model, ad.layers)):
            attention = getattr(layer, ad.attention)
            if attention is not None:
                kv.append(self._attention(layer, attention, index, len(kv)))
            if getattr(layer, ad.mlp) is not None:
                self._mlp(layer, index)
        normed = self._norm(get_path(self.model, ad.final_norm), "final_norm")
        return self._lm_head(normed), kv

    # ---------------------------------------------------------------- pieces

    def _gamma(self, module, name: str) -> tuple[str, float]:
        """(the norm's scale as an initializer: offset + weight in fp32, as the module computes it; its epsilon)."""
        gamma = module.weight.detach().float().numpy() + np.float32(self.ad.norm_offset)
        eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
        return self.g.const(f"{name}.weight", gamma), eps

    def _norm(self, module, name: str) -> str:
        """Normalise the residual stream (after adding the pending sublayer output) for the next sublayer."""
        g = self.g
        gamma, eps = self._gamma(module, name)
        if self.pending is None:
            return g.op("SimplifiedLayerNormalization", [self.residual, gamma], axis=-1, epsilon=eps, stash_type=1)
        normed, _, _, self.residual = g.op("SkipSimplifiedLayerNormalization", [self.pending, self.residual, gamma],
                                           4, domain="com.microsoft", epsilon=eps)
        self.pending = None
        return normed

    def _post_norm(self, layer, name: str | None, x: str, label: str) -> str:
        if name is None:
            return x
        gamma, eps = self._gamma(getattr(layer, name), label)
        return self.g.op("SimplifiedLayerNormalization", [x, gamma], axis=-1, epsilon=eps, stash_type=1)

    def _attention(self, layer, attn, index: int, slot: int) -> tuple[int, int]:
        g, ad = self.g, self.ad
        x = self._norm(getattr(layer, ad.attention_norm), f"layers.{index}.attention_norm")
        projections = [getattr(attn, n) for n in (ad.q_proj, ad.k_proj, ad.v_proj)]
        dim = attn.head_dim
        heads, kv_heads = projections[0].out_features // dim, projections[1].out_features // dim
        qkv = self._linear(x, f"layers.{index}.qkv")
        cos, sin = self._rotary(ad.rotary_local is not None and is_sliding(layer))
        window = window_of(attn)
        q_k_v = [qkv, "", ""]
        if ad.q_norm is not None:  # per-head RMSNorm of queries and keys before rotary (the CPU kernel has none)
            q_k_v = self._qk_norm(attn, qkv, index, heads, kv_heads, dim)
        if self.half:  # an fp16 cache: GroupQueryAttention takes every float input in one type
            q_k_v = [g.op("Cast", [x], to=10) if x else x for x in q_k_v]
        inputs = [*q_k_v, f"past_key_values.{slot}.key", f"past_key_values.{slot}.value", *self.mask, cos, sin]
        sink = sink_of(attn)
        if sink is not None:  # inputs 9 and 10 (position ids, attention bias) unused; 11 is the per-head sink
            sink = sink.astype(np.float16 if self.half else np.float32)
            inputs += ["", "", g.const(f"layers.{index}.head_sink", sink)]
        out, _, _ = g.op("GroupQueryAttention", inputs,
                         [f"/layers.{index}/attn", f"present.{slot}.key", f"present.{slot}.value"],
                         domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads, do_rotary=1,
                         rotary_interleaved=0, scale=float(attn.scaling),
                         local_window_size=int(window) if window else -1)
        if self.half:
            out = g.op("Cast", [out], to=self.g.float)
        out = self._linear(out, f"layers.{index}.o")
        self.pending = self._post_norm(layer, ad.attention_post_norm, out, f"layers.{index}.attention_post_norm")
        return kv_heads, dim

    def _qk_norm(self, attn, qkv: str, index: int, heads: int, kv_heads: int, dim: int) -> list[str]:
        g = self.g
        q, k, v = g.op("Split", [qkv, g.const(f"layers.{index}.qkv_split", np.array(
            [heads * dim, kv_heads * dim, kv_heads * dim], np.int64))], 3, axis=-1)
        per_head = g.const("per_head_shape", np.array([0, 0, -1, dim], np.int64))
        flat = g.const("flat_heads_shape", np.array([0, 0, -1], np.int64))
        normed = []
        for name, x in ((self.ad.q_norm, q), (self.ad.k_norm, k)):
            gamma, eps = self._gamma(getattr(attn, name), f"layers.{index}.{name}")
            y = g.op("SimplifiedLayerNormalization", [g.op("Reshape", [x, per_head]), gamma], axis=-1, epsilon=eps,
                     stash_type=1)
            normed.append(g.op("Reshape", [y, flat]))
        return [*normed, v]

    def _mlp(self, layer, index: int) -> None:
        g, ad = self.g, self.ad
        x = self._norm(getattr(layer, ad.mlp_norm), f"layers.{index}.mlp_norm")
        mlp = getattr(layer, ad.mlp)
        gate, up = getattr(mlp, ad.gate_proj), getattr(mlp, ad.up_proj)
        both = self._linear(x, f"layers.{index}.gate_up")
        a, b = g.op("Split", [both, g.const(f"layers.{index}.split", np.array(
            [gate.out_features, up.out_features], np.int64))], 2, axis=-1)
        hidden = g.op("Mul", [self.activation(g, a), b])  # act(gate) * up
        out = self._linear(hidden, f"layers.{index}.down")
        self.pending = self._post_norm(layer, ad.mlp_post_norm, out, f"layers.{index}.mlp_post_norm")

    def _linear(self, x: str, name: str) -> str:
        """x @ W^T (+ bias) for the row-wise concatenation W of the group's weights, quantised or fp32."""
        g = self.g
        params, modules = zip(*self.groups[name])
        weights = [m.weight.detach().float().numpy() for m in modules]
        quantised = self.quantizer(name, weights, params)
        if quantised is None:
            y = g.op("MatMul", [x, g.const(f"{name}.weight", np.concatenate(weights).T)])
        else:
            y = self._nbits(x, name, quantised)
        biases = [m.bias for m in modules]
        if any(b is not None for b in biases):
            full = np.concatenate([b.detach().float().numpy() if b is not None else np.zeros(m.out_features, np.float32)
                                   for b, m in zip(biases, modules)])
            y = g.op("Add", [y, g.const(f"{name}.bias", full)])
        return y

    def _nbits(self, x: str, name: str, w: BlockQuant) -> str:
        g = self.g
        inputs = [x, g.const(f"{name}.q{w.bits}", w.packed()), g.float_const(f"{name}.scales", w.scales)]
        if w.zero_points is not None:
            inputs.append(g.const(f"{name}.zero_points", w.packed_zero_points()))
        y = g.op("MatMulNBits", inputs, domain="com.microsoft", K=w.k, N=w.n, bits=w.bits, block_size=w.block_size,
                 accuracy_level=self.level)
        if w.offsets is None:
            return y
        if w.k % w.block_size:
            raise ExportError(f"{name}: GGUF-style offsets need an input width divisible by the block size "
                              f"({w.k} % {w.block_size})")
        offsets_t = g.float_const(f"{name}.offsets_t", np.ascontiguousarray(w.offsets.T))
        return g.op("Add", [y, g.op("MatMul", [self._block_sums(x, w.block_size, w.k), offsets_t])])

    def _block_sums(self, x: str, block: int, k: int) -> str:
        """[..., K / block] sums of the input over each block (computed once per input)."""
        key = (x, block)
        if key not in self.block_sums:
            g = self.g
            shape = g.const(f"/blocksum_shape_{len(self.block_sums)}", np.array([0, 0, k // block, block], np.int64))
            self.block_sums[key] = g.op("ReduceSum", [g.op("Reshape", [x, shape]), g.const(
                f"/blocksum_axis_{len(self.block_sums)}", np.array([-1], np.int64))], keepdims=0)
        return self.block_sums[key]

    def _rotary(self, local: bool) -> tuple[str, str]:
        """cos/sin caches [positions, head_dim / 2] from the model's own rotary module (so its theta and any
        scaling are taken as they are), the local one for sliding layers of a model with two bases; each
        written once, when a kept layer first uses it."""
        if local not in self._cos_sin:
            import torch

            rotary = get_path(self.model, self.ad.rotary_local if local else self.ad.rotary)
            cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(self.positions)[None])
            half, dtype, suffix = cos.shape[-1] // 2, np.float16 if self.half else np.float32, "_local" * local
            self._cos_sin[local] = (
                self.g.const(f"cos_cache{suffix}", cos[0, :, :half].float().numpy().astype(dtype)),
                self.g.const(f"sin_cache{suffix}", sin[0, :, :half].float().numpy().astype(dtype)))
        return self._cos_sin[local]

    def _embedding(self) -> str:
        """The rows of input_ids, times the module's scale where it has one (the tied logits read the table
        unscaled)."""
        g = self.g
        embed = get_path(self.model, self.ad.embed)
        table = embed.weight.detach().float().numpy()
        self.table = self.quantizer("embedding", [table], [self.ad.embed])
        if self.table is None:
            rows = g.op("Gather", [g.const("embed.weight", table), "input_ids"])
        else:
            rows = self._gather_quantised(self.table)
        if not self.ad.embed_scale:
            return rows
        scale = embed.embed_scale.to(embed.weight.dtype).float().numpy()  # in the weights' dtype, as the module
        return g.op("Mul", [rows, g.const("embed_scale", scale)])

    def _tied(self) -> bool:
        return "lm_head" not in self.groups

    def _table_inputs(self, w: BlockQuant) -> tuple[str, str]:
        """(codes, scales) of the quantised embedding table, written once for the lookup and (tied) the logits."""
        if not hasattr(self, "_table_consts"):
            self._table_consts = (self.g.const(f"embed.q{w.bits}", w.packed()), self.g.float_const("embed.scales", w.scales))
        return self._table_consts

    def _gather_quantised(self, w: BlockQuant) -> str:
        """Rows of the quantised table (GatherBlockQuantized reads MatMulNBits' [rows, blocks, bytes] layout as
        is, so a tied table is stored once for the lookup and the logits), unpadded, plus offsets if any."""
        g = self.g
        codes, scales = self._table_inputs(w)
        axis = g.const("last_axis", np.array([-1], np.int64))
        inputs = [codes, "input_ids", g.op("Unsqueeze", [scales, axis])]
        if w.zero_points is not None:
            inputs.append(g.const("embed.zero_points_3d", w.zero_points[..., None]))
        rows = g.op("GatherBlockQuantized", inputs, domain="com.microsoft", bits=w.bits, block_size=w.block_size,
                    gather_axis=0, quantize_axis=2)
        flat_shape = g.const("rows_shape", np.array([0, 0, -1], np.int64))
        flat = g.op("Reshape", [rows, flat_shape])
        if w.offsets is not None:
            offsets = g.op("Gather", [g.float_const("embed.offsets", w.offsets), "input_ids"])
            per_value = g.op("Expand", [g.op("Unsqueeze", [offsets, axis]), g.const(
                "block_shape", np.array([1, 1, 1, w.block_size], np.int64))])
            flat = g.op("Add", [flat, g.op("Reshape", [per_value, flat_shape])])
        if w.k != w.blocks * w.block_size:
            flat = g.op("Slice", [flat, g.const("unpad_start", np.array([0], np.int64)),
                                  g.const("unpad_end", np.array([w.k], np.int64)), axis])
        return flat

    def _lm_head(self, x: str) -> str:
        g, ad = self.g, self.ad
        if self._tied() and self.table is not None:  # MatMulNBits reads the table written for the lookup
            w = self.table
            codes, scales = self._table_inputs(w)
            inputs = [x, codes, scales]
            if w.zero_points is not None:
                inputs.append(g.const("embed.zero_points", w.packed_zero_points()))
            y = g.op("MatMulNBits", inputs, domain="com.microsoft", K=w.k, N=w.n, bits=w.bits,
                     block_size=w.block_size, accuracy_level=self.level)
            if w.offsets is not None:
                y = g.op("Add", [y, g.op("MatMul", [self._block_sums(x, w.block_size, w.k), g.float_const(
                    "embed.offsets_t", np.ascontiguousarray(w.offsets.T))])])
            return g.op("Identity", [y], ["logits"])
        if self._tied():  # fp32 tied table: Gemm(transB) reads the embedding as stored, so it exists once
            hidden = self.config.hidden_size
            x2d = g.op("Reshape", [x, g.const("head_2d", np.array([-1, hidden], np.int64))])
            y2d = g.op("Gemm", [x2d, "embed.weight"], transB=1)
            shape = g.op("Concat", [g.op("Shape", [x], start=0, end=-1), g.const(
                "vocab", np.array([self.config.vocab_size], np.int64))], axis=0)
            return g.op("Reshape", [y2d, shape], ["logits"])
        return g.op("Identity", [self._linear(x, "lm_head")], ["logits"])
