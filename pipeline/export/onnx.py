"""Export a (possibly pruned) causal LM to one ONNX file that optimum's ORTModelForCausalLM loads.

Owns the optimum call that gives KV inputs/outputs only to kept attention layers, the rewrite that stores
a tied embedding once, and the logits check against PyTorch; returns an `OnnxExport` record. config.json is the
model's own (true layer count, `slimformer_drop`); ORT consumers count KV slots from the graph's inputs.
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..artifacts import OnnxExport
from ..errors import ExportError
from ..model.prune import kept_attention_layers, kv_config as kv_config_of
from ..model.prune_heads import kv_heads_per_layer

TASK = "text-generation-with-past"
ONNX_NAME = "model.onnx"
MIN_OPSET = 15
# fp32 ONNX vs PyTorch on a short prompt differ by ~1e-5 relative; a wrong mask or KV slot by ~1e-1.
LOGITS_RTOL = 1e-3


def expected_names(kv_layers: int, position_ids: bool = True) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The input and output names ORTModelForCausalLM expects for `kv_layers` KV slots. optimum gives some
    families (Gemma) no position_ids input: positions then count from the first (padding) column, a constant
    shift per row that rotary attention does not see."""
    slots = [f"{i}.{kind}" for i in range(kv_layers) for kind in ("key", "value")]
    positions = ("position_ids",) if position_ids else ()
    return (("input_ids", "attention_mask", *positions, *(f"past_key_values.{s}" for s in slots)),
            ("logits", *(f"present.{s}" for s in slots)))


def export_onnx(model, out_dir: Path, opset: int = 18) -> OnnxExport:
    """Write `model.onnx`, config.json and generation_config.json into `out_dir`; `model` is not modified."""
    out_dir = Path(out_dir)
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: the tied lm_head rewrite needs Shape(start, end) from "
                          f"opset {MIN_OPSET}; export with opset >= {MIN_OPSET} (18 is the default).")
    kv_layers = len(kept_attention_layers(model))
    if kv_layers == 0:
        raise ExportError("every attention layer is dropped, so the model has no KV cache to export; "
                          "keep at least one attention layer in the drop plan.")
    position_ids = _run_optimum(model, out_dir, opset)
    path = out_dir / ONNX_NAME
    inputs, outputs = _graph_names(path)
    want_in, want_out = expected_names(kv_layers, position_ids)
    if (inputs, outputs) != (want_in, want_out):
        raise ExportError(f"exported graph has inputs {inputs} and outputs {outputs}; expected {want_in} and "
                          f"{want_out} for {kv_layers} kept attention layers. Check the optimum/transformers versions.")
    if getattr(model.config, "tie_word_embeddings", False):
        _tie_lm_head(path, tuple(model.get_input_embeddings().weight.shape))
    _check_logits(model, path)
    return OnnxExport(path, kv_layers, inputs, outputs)


def _run_optimum(model, out_dir: Path, opset: int) -> bool:
    """Export with optimum; whether its config for this family gives the graph a position_ids input."""
    from optimum.exporters.onnx import onnx_export_from_model
    from optimum.exporters.tasks import TasksManager

    # optimum edits the model it exports (return_dict, use_cache, generation fields): give it a copy.
    work = copy.deepcopy(model)
    # The OnnxConfig sizes its KV inputs/outputs and dummy cache from the normalized num_layers, which
    # reads config.num_hidden_layers; only this copy, seen by the OnnxConfig alone, holds the kept count.
    kv_config = kv_config_of(work)
    try:
        constructor = TasksManager.get_exporter_config_constructor(
            "onnx", model=work, task=TASK, library_name="transformers")
        onnx_config = constructor(kv_config, use_past_in_inputs=True)
        _per_slot_kv_heads(onnx_config, [h for h in kv_heads_per_layer(model) if h])
        # optimum exports with torch.onnx.export(dynamo=False) and patches transformers' vmap mask itself.
        onnx_export_from_model(work, out_dir, opset=opset, task=TASK, do_validation=False,
                               custom_onnx_configs={"model": onnx_config})
    except Exception as e:
        raise ExportError(f"optimum could not export this {model.config.model_type} model to ONNX "
                          f"(opset {opset}): {e}. Try another opset, or check the installed versions.") from e
    return "position_ids" in onnx_config.inputs


def _per_slot_kv_heads(onnx_config, kv_heads: list[int]) -> None:
    """Make the config's dummy cache give slot i `kv_heads[i]` heads (head-pruned layers have fewer).

    optimum sizes every slot's dummy KV from one num_key_value_heads, and the traced graph takes each past input's
    head count from its dummy; so each slot's dummy is cut to its layer's count (slot i's layer computes with
    exactly that many KV heads, so the trace is the model's own)."""
    generate = onnx_config.generate_dummy_inputs

    def per_slot(framework: str = "pt", **kwargs):
        dummy = generate(framework, **kwargs)
        if "past_key_values" in dummy:
            dummy["past_key_values"] = [(k[:, :h], v[:, :h]) for (k, v), h in zip(dummy["past_key_values"], kv_heads)]
        return dummy

    onnx_config.generate_dummy_inputs = per_slot


def _graph_names(path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return tuple(i.name for i in graph.input), tuple(o.name for o in graph.output)


def _tie_lm_head(path: Path, table_shape: tuple[int, int]) -> None:
    """Make the logits projection read the embedding table itself, as Gemm(transB=1) over 2-D input.

    optimum leaves either a transposed copy of the table or MatMul(Transpose(E)), which onnxruntime
    constant-folds into a second table at load. Gemm transB reads E as stored.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    found = _find_tied_head(graph)
    if found is None:
        copies = [t.name for t in graph.initializer if sorted(t.dims) == sorted(table_shape)]
        if len(copies) > 1:
            raise ExportError(f"the tied embedding is stored {len(copies)} times ({copies}) and the logits node is "
                              "not MatMul over its transpose; extend _find_tied_head for this graph pattern.")
        return
    head, embed, dead = found
    x = head.input[0]
    vocab, hidden = embed.dims
    for item in dead:
        (graph.node if isinstance(item, onnx.NodeProto) else graph.initializer).remove(item)
    at = list(graph.node).index(head)
    graph.node.remove(head)
    graph.initializer.extend([numpy_helper.from_array(np.array([-1, hidden], np.int64), "lm_head_2d_shape"),
                              numpy_helper.from_array(np.array([vocab], np.int64), "lm_head_vocab")])
    new = [
        helper.make_node("Reshape", [x, "lm_head_2d_shape"], ["lm_head_x2d"], name="lm_head_reshape_in"),
        helper.make_node("Gemm", ["lm_head_x2d", embed.name], ["lm_head_y2d"], name="lm_head_gemm", transB=1),
        helper.make_node("Shape", [x], ["lm_head_lead"], name="lm_head_shape", start=0, end=-1),
        helper.make_node("Concat", ["lm_head_lead", "lm_head_vocab"], ["lm_head_out_shape"], name="lm_head_concat", axis=0),
        helper.make_node("Reshape", ["lm_head_y2d", "lm_head_out_shape"], ["logits"], name="lm_head_reshape_out"),
    ]
    for offset, node in enumerate(new):
        graph.node.insert(at + offset, node)
    save_onnx(model, path)


def _find_tied_head(graph):
    """(logits MatMul, embedding initializer, what becomes unused) if the MatMul's weight is the table's
    transpose, either as Transpose(E) or as an equal initializer; else None."""
    import numpy as np
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    head = producers.get("logits")
    if head is None or head.op_type != "MatMul":
        return None
    weight = head.input[1]
    if sum(weight in n.input for n in graph.node) != 1:
        return None  # something else reads the weight too; leave the graph alone
    tables = [inits[n.input[0]] for n in graph.node if n.op_type == "Gather" and n.input[0] in inits]
    src = producers.get(weight)
    if src is not None and src.op_type == "Transpose" and src.input[0] in {t.name for t in tables}:
        return head, inits[src.input[0]], [src]
    if weight in inits:
        w = numpy_helper.to_array(inits[weight])
        for table in tables:
            if tuple(table.dims) == w.shape[::-1] and np.array_equal(numpy_helper.to_array(table), w.T):
                return head, table, [inits[weight]]
    return None


def save_onnx(model, path: Path) -> None:
    """Save one ONNX model, with external data beside it only when protobuf's 2 GB limit demands it."""
    import onnx

    # One file below protobuf's 2 GB limit; above it, one external data file beside it (as optimum does).
    big = model.ByteSize() > 2**31 - 2**24
    data = path.with_name(path.name + "_data")
    data.unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True, location=data.name)


def _check_logits(model, path: Path) -> None:
    """Prefill a small left-padded batch in ONNX Runtime and PyTorch; compare logits at real tokens."""
    import numpy as np
    import onnxruntime as ort
    import torch

    ids = torch.tensor([[0, 0, 0, 5, 9, 13, 17], [7, 11, 15, 19, 23, 29, 31]]) % model.config.vocab_size
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
    feed = {k: v for k, v in feed.items() if k in {i.name for i in session.get_inputs()}}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feed[i.name] = np.zeros((len(ids), i.shape[1], 0, i.shape[3]), np.float32)
    got = session.run(["logits"], feed)[0]
    real = mask.numpy().astype(bool)
    diff = float(np.abs(got[real] - want[real]).max())
    if not diff <= LOGITS_RTOL * max(1.0, float(np.abs(want[real]).max())):
        raise ExportError(f"ONNX logits differ from PyTorch by up to {diff:.3g} on a left-padded prompt "
                          f"(allowed {LOGITS_RTOL:g} of the logit range); the exported graph is wrong, do not ship it.")
