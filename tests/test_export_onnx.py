"""ONNX export of pruned and unpruned tiny models: graph names, weights present, ORT generate == PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import left_padded_batch, tiny_model
from pipeline.model.adapters import ADAPTERS
from pipeline.errors import ExportError
from pipeline.artifacts import OnnxExport
from pipeline.export.onnx import expected_names, export_onnx
from pipeline.model.prune import drop_sublayers


def _initializers(path):
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _generate_both(model, out_dir):
    from optimum.onnxruntime import ORTModelForCausalLM

    ids, mask = left_padded_batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ort_model = ORTModelForCausalLM.from_pretrained(out_dir, use_cache=True, use_io_binding=False)
    with torch.no_grad():
        return model.generate(**kwargs), ort_model.generate(**kwargs)


@pytest.fixture(scope="module")
def pruned_llama_export(tmp_path_factory):
    model = drop_sublayers(tiny_model("llama"), attention=[1, 2], mlp=[3])
    with torch.no_grad():  # norm weights start as equal ones, which the exporter would merge into one
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.rand_like(p))
    out = tmp_path_factory.mktemp("llama_onnx")
    return model, export_onnx(model, out), out


def test_pruned_graph_has_kv_only_for_kept_attention(pruned_llama_export):
    _, result, _ = pruned_llama_export
    kv = [f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
    assert result.input_names == ("input_ids", "attention_mask", "position_ids", *kv)
    assert result.output_names == ("logits", *[n.replace("past_key_values", "present") for n in kv])
    assert result.kv_layers == 2 and result.path.name == "model.onnx"


def test_no_dropped_weights_and_tied_embedding_once(pruned_llama_export):
    model, result, _ = pruned_llama_export
    inits = _initializers(result.path)
    dropped = ("layers.1.self_attn", "layers.2.self_attn", "layers.1.input_layernorm", "layers.3.mlp")
    assert not [n for n in inits if any(d in n for d in dropped)]
    # parameters() yields a tied tensor once; ONNX adds only a few int64 shape constants.
    float_count = sum(a.size for a in inits.values() if a.dtype == np.float32 and a.ndim >= 1)
    assert float_count == sum(p.numel() for p in model.parameters())
    tables = [n for n, a in inits.items() if a.shape in ((256, 64), (64, 256))]
    assert len(tables) == 1
    embed = model.get_input_embeddings().weight.detach().numpy()
    assert np.array_equal(inits[tables[0]], embed)


def test_config_and_record(pruned_llama_export):
    import json

    _, result, out = pruned_llama_export
    config = json.loads((out / "config.json").read_text())
    assert config["slimformer_drop"] == {"attention": [1, 2], "mlp": [3]}
    assert config["num_hidden_layers"] == 4  # the true depth: PyTorch reload still rebuilds the structure
    assert (out / "generation_config.json").is_file()
    assert OnnxExport.from_json(json.loads(json.dumps(result.to_json()))) == result


def test_pruned_llama_generates_like_pytorch(pruned_llama_export):
    model, _, out = pruned_llama_export
    want, got = _generate_both(model, out)
    assert torch.equal(want, got)


@pytest.mark.parametrize("model_type", sorted(set(ADAPTERS) - {"llama"}))
def test_every_architecture_exports_and_generates(model_type, tmp_path):
    model = drop_sublayers(tiny_model(model_type), attention=[2], mlp=[0])
    result = export_onnx(model, tmp_path)
    # optimum gives Gemma graphs no position_ids input (rotary attention is shift-invariant)
    assert (result.input_names, result.output_names) == expected_names(3, model_type != "gemma3_text")
    tables = [n for n, a in _initializers(result.path).items() if a.shape in ((256, 64), (64, 256))]
    assert len(tables) == 1  # the tied embedding is stored once
    want, got = _generate_both(model, tmp_path)
    assert torch.equal(want, got)


def test_unpruned_model_exports_kv_for_all_layers(tmp_path):
    model = tiny_model("qwen2", tie_word_embeddings=False)
    result = export_onnx(model, tmp_path)
    assert result.kv_layers == 4
    assert (result.input_names, result.output_names) == expected_names(4)
    want, got = _generate_both(model, tmp_path)
    assert torch.equal(want, got)


def test_export_leaves_model_untouched(tmp_path):
    model = drop_sublayers(tiny_model("llama"), attention=[0], mlp=[])
    before = (model.config.to_json_string(), {k: v.clone() for k, v in model.state_dict().items()})
    export_onnx(model, tmp_path)
    assert model.config.to_json_string() == before[0]
    assert all(torch.equal(v, before[1][k]) for k, v in model.state_dict().items())


def test_all_attention_dropped_is_an_export_error(tmp_path):
    model = drop_sublayers(tiny_model("llama"), attention=[0, 1, 2, 3], mlp=[])
    with pytest.raises(ExportError, match="keep at least one attention layer"):
        export_onnx(model, tmp_path)


@pytest.mark.parametrize("form", ["transpose_node", "transposed_copy"])
def test_tied_head_rewrite_keeps_logits(form, tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from pipeline.export.onnx import _tie_lm_head

    table = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    inits = [numpy_helper.from_array(table, "E")]
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"])]
    if form == "transpose_node":
        nodes.append(helper.make_node("Transpose", ["E"], ["Et"]))
    else:
        inits.append(numpy_helper.from_array(table.T.copy(), "Et"))
    nodes.append(helper.make_node("MatMul", ["h", "Et"], ["logits"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 32])], inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    ids = np.array([[1, 5, 7], [2, 3, 31]])
    run = lambda: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    before = run()
    _tie_lm_head(path, (32, 8))
    rewritten = onnx.load(str(path))
    assert [t.name for t in rewritten.graph.initializer if t.dims[:] in ([32, 8], [8, 32])] == ["E"]
    assert "Gemm" in {n.op_type for n in rewritten.graph.node}
    np.testing.assert_allclose(run(), before, rtol=1e-6, atol=1e-6)
