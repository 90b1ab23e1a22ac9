"""Quantise an exported fp32 decoder ONNX file: 8/4-bit block-wise weights (MatMulNBits), int8 dynamic, fp16.

Configured by the recipe blocks in `pipeline.config.quantize`. Owns the entry point `quantize_onnx` and the
rewrite of export_onnx's tied lm_head (Gemm(transB=1) over the embedding table, which onnxruntime's quantiser
skips) into MatMulNBits whose quantised table the embedding Gather reads too. Output: one `model.onnx`.
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import QuantizedModel
from ..config.checks import tied_table_problem
from ..config.quantize import OnnxFp16Spec, OnnxInt8Spec, QuantSpec
from ..errors import ExportError
from .onnx import save_onnx

OUT_NAME = "model.onnx"
HEAD_GEMM = "lm_head_gemm"  # export_onnx's name for the tied logits projection


def quantize_onnx(src: Path, out_dir: Path, spec: QuantSpec) -> QuantizedModel:
    """Write `out_dir/model.onnx`, the quantised copy of the fp32 file `src`. Nothing else is copied."""
    import onnx

    src, out_dir = Path(src), Path(out_dir)
    if not src.is_file():
        raise ExportError(f"cannot quantise {src}: no such file; export the fp32 model first.")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / OUT_NAME
    if path.resolve() == src.resolve():
        raise ExportError(f"quantising {src} would overwrite it; give a different out_dir.")
    model = onnx.load(str(src))
    try:
        if spec.kind == "onnx-int8" and spec.method == "dynamic":
            _int8_dynamic(model, path, spec)
        elif spec.kind == "onnx-fp16":
            save_onnx(_fp16(model, spec), path)
        else:
            save_onnx(_weight_only(model, spec, 8 if spec.kind == "onnx-int8" else 4), path)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"onnxruntime could not quantise {src} as {spec.kind}: {e}") from e
    size = sum(f.stat().st_size for f in (path, path.with_name(path.name + "_data")) if f.exists())
    return QuantizedModel(path, spec.kind, spec.name, size)


def _graph_parts(graph):
    """(logits projection node or None, embedding Gather or None, whether both read one table)."""
    inits = {t.name for t in graph.initializer}
    gather = next((n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
                   and n.input[1] == "input_ids"), None)
    head = next((n for n in graph.node if n.op_type == "Gemm" and n.name == HEAD_GEMM), None)
    if head is None:
        head = next((n for n in graph.node if n.op_type == "MatMul" and "logits" in n.output), None)
    tied = head is not None and gather is not None and head.input[1] == gather.input[0]
    return head, gather, tied


def _check_tied_choice(tied: bool, spec) -> None:
    problem = tied_table_problem(spec, tied)
    if problem:
        raise ExportError(problem)


def _int8_dynamic(model, path: Path, spec: OnnxInt8Spec) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    head, _, tied = _graph_parts(model.graph)
    _check_tied_choice(tied, spec)
    # The tied head is a Gemm: onnxruntime quantises it as MatMulInteger over a transposed 8-bit copy.
    ops = ["MatMul", *(["Gemm"] if spec.quantize_lm_head else []), *(["Gather"] if spec.quantize_embedding else [])]
    exclude = [head.name] if head is not None and not spec.quantize_lm_head else []
    big = model.ByteSize() > 2**31 - 2**24
    # uint8 weights: x86 AVX2 kernels without VNNI saturate int16 sums for int8 weights x uint8 activations
    # (SmolLM2-135M perplexity 55 -> 34 million measured); uint8 x uint8 takes another kernel path.
    quantize_dynamic(model, path, per_channel=spec.per_channel, weight_type=QuantType.QUInt8,
                     op_types_to_quantize=ops, nodes_to_exclude=exclude, use_external_data_format=big,
                     extra_options={"MatMulConstBOnly": True})


def _weight_only(model, spec, bits: int):
    """MatMulNBits at `bits` for every constant-weight MatMul; the logits projection and the embedding
    table at `lm_head_bits` (int4 spec) or `bits`."""
    import logging

    # The module logs every node at INFO (it calls logging.basicConfig on import): keep its warnings only.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    head, gather, tied = _graph_parts(model.graph)
    _check_tied_choice(tied, spec)
    body, table_cfg = _nbits_config(spec, bits), _nbits_config(spec, getattr(spec, "lm_head_bits", bits))
    head_apart = head is not None and (not spec.quantize_lm_head or table_cfg.bits != bits)
    # The stock pass: every MatMul with a constant weight, an untied lm_head too unless it is set apart.
    model = _nbits_pass(model, body, [head.name] if head_apart else [])
    table = None
    if head is not None and head.op_type == "Gemm" and spec.quantize_lm_head:
        table = _head_gemm_to_nbits(model.graph, head.name, table_cfg)
    elif head_apart and spec.quantize_lm_head:  # an untied MatMul head at its own bit width
        model = _nbits_pass(model, table_cfg, [n.name for n in model.graph.node if n.name != head.name])
    if gather is not None and spec.quantize_embedding:
        _gather_to_block_quantized(model.graph, gather.name, table_cfg, table if tied else None)
    _drop_unused_initializers(model.graph)
    return model


def _nbits_pass(model, config, exclude: list[str]):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def _nbits_config(spec, bits: int):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    return DefaultWeightOnlyQuantConfig(block_size=spec.block_size, is_symmetric=spec.form != "asymmetric",
                                        bits=bits, accuracy_level=spec.accuracy_level, op_types_to_quantize=("MatMul",))


def _block_quant(table, config):
    """(packed uint8 [rows, blocks, bytes per block], scales [rows, blocks], zero points or None) of a
    [rows, cols] table, blocks along cols: MatMulNBits' layout for B = table.T, by onnxruntime's own code."""
    import numpy as np
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    packed, scales, zero_points = DefaultWeightOnlyQuantizer(config).qbits_block_quant(np.ascontiguousarray(table.T))
    return packed, scales, None if config.is_symmetric else zero_points


def _add_table(graph, base: str, table, config) -> tuple[list[str], int]:
    """Add a table's quantised initializers; return their names (data, scales[, zero points]) and padded cols."""
    from onnx import numpy_helper

    packed, scales, zero_points = _block_quant(table, config)
    arrays = {f"{base}_Q{config.bits}": packed, f"{base}_scales": scales}
    if zero_points is not None:
        arrays[f"{base}_zero_points"] = zero_points
    graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in arrays.items())
    return list(arrays), packed.shape[1] * config.block_size


def _initializer(graph, name: str):
    from onnx import numpy_helper

    return numpy_helper.to_array(next(t for t in graph.initializer if t.name == name))


def _head_gemm_to_nbits(graph, name: str, config) -> tuple[list[str], int]:
    """Replace the tied Gemm(x, E, transB=1) by MatMulNBits over a quantised E; return the table's names."""
    from onnx import helper

    gemm = next(n for n in graph.node if n.name == name)
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    if len(gemm.input) != 2 or attrs.get("transB") != 1 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
        raise ExportError(f"the tied lm_head node {name} is not Gemm(x, E, transB=1) without bias; "
                          "it was not written by this version of export_onnx. Re-export the model.")
    table = _initializer(graph, gemm.input[1])
    names, padded = _add_table(graph, gemm.input[1], table, config)
    kwargs = {"accuracy_level": config.accuracy_level} if config.accuracy_level else {}
    node = helper.make_node("MatMulNBits", [gemm.input[0], *names], list(gemm.output), name=f"{name}_Q{config.bits}",
                            domain="com.microsoft", K=table.shape[1], N=table.shape[0], bits=config.bits,
                            block_size=config.block_size, **kwargs)
    _replace_node(graph, gemm, [node])
    return names, padded


def _gather_to_block_quantized(graph, name: str, config, shared: tuple[list[str], int] | None) -> None:
    """Replace Gather(E, ids) by GatherBlockQuantized over a quantised E: the lm_head's (`shared`) or its own.

    It reads MatMulNBits' [rows, blocks, bytes] table as is (blocks on axis 2), so no Reshape of the table
    exists for onnxruntime to constant-fold into a second copy (in memory, and in .ort files); only the
    small scales (and zero points) get a [rows, blocks, 1] copy. Rows come out [.., blocks, block_size].
    """
    import numpy as np
    from onnx import helper, numpy_helper

    gather = next(n for n in graph.node if n.name == name)
    rows, cols = (int(d) for d in next(t for t in graph.initializer if t.name == gather.input[0]).dims)
    if shared is None:
        shared = _add_table(graph, gather.input[0], _initializer(graph, gather.input[0]), config)
    (data, *quant), padded = shared
    arrays = [_initializer(graph, quant[0]).reshape(rows, -1, 1)]
    if len(quant) > 1:  # zero points: MatMulNBits packs two 4-bit ones per byte; here one per [.., 1] slot
        zp = _initializer(graph, quant[1])
        zp = np.stack([zp & 15, zp >> 4], -1).reshape(rows, -1) if config.bits == 4 else zp.reshape(rows, -1)
        arrays.append(np.ascontiguousarray(zp[:, :arrays[0].shape[1], None]))
    extra = {f"{n}_3d": a for n, a in zip(quant, arrays)} | {f"{name}_rows_shape": np.array([0, 0, -1], np.int64)}
    graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in extra.items())
    out = gather.output[0]
    blocks, flat = f"{out}_blocks", (out if padded == cols else f"{out}_padded")
    nodes = [helper.make_node("GatherBlockQuantized", [data, gather.input[1], *list(extra)[:-1]], [blocks],
                              name=f"{name}_Q{config.bits}", domain="com.microsoft", bits=config.bits,
                              block_size=config.block_size, gather_axis=0, quantize_axis=2),
             helper.make_node("Reshape", [blocks, f"{name}_rows_shape"], [flat], name=f"{name}_rows")]
    if flat != out:  # blocks pad each row up to a whole block: cut the padding off again
        consts = {"starts": [0], "ends": [cols], "axes": [-1]}
        graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), f"{name}_slice_{k}")
                                 for k, v in consts.items())
        nodes.append(helper.make_node("Slice", [flat, *(f"{name}_slice_{k}" for k in consts)], [out],
                                      name=name + "_unpad"))
    _replace_node(graph, gather, nodes)


def _replace_node(graph, old, new: list) -> None:
    at = list(graph.node).index(old)
    graph.node.remove(old)
    for offset, node in enumerate(new):
        graph.node.insert(at + offset, node)


def _drop_unused_initializers(graph) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)


def _fp16(model, spec: OnnxFp16Spec):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # logits stay fp32 (perplexity and sampling read them); KV follows the spec.
    keep = True if spec.kv_cache == "float32" else ["logits"]
    return convert_float_to_float16(model, keep_io_types=keep)
