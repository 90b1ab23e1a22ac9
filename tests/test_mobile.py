"""Mobile deliverables from a tiny pruned model: .ort files onnxruntime loads, with their required-operators
config; an onnxruntime-genai folder whose greedy generation equals PyTorch's (the issue's acceptance test)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import byte_level_bpe, genai_greedy, save_tiny_folder, synthetic_text
from pipeline.export.onnx import export_onnx
from pipeline.artifacts import OrtFormat
from pipeline.export.mobile import GENAI_CONFIG, genai_tokenizer_problem, to_ort_format, write_genai_folder
from pipeline.measure.ort_runner import OnnxLM, greedy_trace
from pipeline.model.prune import drop_sublayers
from pipeline.config.quantize import OnnxInt4Spec
from pipeline.export.quantize import quantize_onnx

PROMPT = "the king speaks to his brave son and"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """(model, tokenizer, fp32 onnx, int4 onnx): a tiny llama with a word-level tokenizer, attention 1 dropped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("mobile")
    folder = save_tiny_folder(root / "hf", texts=[synthetic_text(0)])
    model = drop_sublayers(AutoModelForCausalLM.from_pretrained(folder).eval(), attention=[1], mlp=[])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    fp32 = export_onnx(model, root / "fp32").path
    int4 = quantize_onnx(fp32, root / "int4", OnnxInt4Spec(kind="onnx-int4")).path
    return model, tokenizer, fp32, int4


def test_ort_format_loads_and_lists_its_operators(pruned, tmp_path):
    import onnxruntime as ort

    *_, int4 = pruned
    result = to_ort_format(int4, tmp_path)
    assert result.path == tmp_path / "model.ort" and result.required_operators_config.parent == tmp_path
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert "past_key_values.2.value" in {i.name for i in session.get_inputs()}  # 3 kept attention layers
    config = result.required_operators_config.read_text()
    ops: dict[str, set[str]] = {}  # lines are domain;opset;op,op,...
    for line in config.splitlines():
        if line and not line.startswith("#"):
            domain, _, names = line.split(";")
            ops.setdefault(domain, set()).update(names.split(","))
    assert "MatMulNBits" in ops["com.microsoft"] and "GatherBlockQuantized" in ops["com.microsoft"]
    assert {"Softmax", "Concat"} <= ops["ai.onnx"]
    assert result.usable_on_mobile.startswith("CPU EP")
    assert any("MatMulNBits" in d for d in result.details) and any("NNAPI" in d for d in result.details)
    assert OrtFormat.from_json(json.loads(json.dumps(result.to_json()))) == result


def test_ort_file_computes_what_the_onnx_file_does(pruned, tmp_path):
    """Fixed-style optimisation may reorder float maths; greedy tokens must not change on this batch."""
    from conftest import left_padded_batch

    _, _, fp32, _ = pruned
    ort_path = to_ort_format(fp32, tmp_path).path
    ids, mask = (t.numpy() for t in left_padded_batch())
    want, want_tokens = greedy_trace(OnnxLM(fp32), ids, mask, steps=4)
    got, got_tokens = greedy_trace(OnnxLM(ort_path), ids, mask, steps=4)
    np.testing.assert_array_equal(got_tokens, want_tokens)
    np.testing.assert_allclose(np.stack(got), np.stack(want), rtol=1e-3, atol=1e-4)


def test_genai_generates_like_pytorch(pruned, tmp_path):
    """The acceptance test: onnxruntime-genai runs the pruned model's folder unmodified, greedy == PyTorch."""
    model, tokenizer, fp32, _ = pruned
    folder = write_genai_folder(fp32, model.config, tokenizer, tmp_path / "genai")
    assert {"genai_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in folder.iterdir()}
    decoder = json.loads((folder / GENAI_CONFIG).read_text())["model"]["decoder"]
    assert decoder["num_hidden_layers"] == 3 and model.config.num_hidden_layers == 4  # KV slots, not depth
    assert (decoder["num_key_value_heads"], decoder["head_size"]) == (2, 16)
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)[0, len(prompt):]
    assert genai_greedy(folder, prompt, NEW_TOKENS)[0] == want.tolist()


def test_genai_runs_a_sliding_window_model_like_pytorch(tmp_path):
    """Tiny Gemma 3 (window 4, no position_ids input): genai's greedy tokens on a 20-token prompt equal PyTorch's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = save_tiny_folder(tmp_path / "hf", arch="gemma3_text", texts=[synthetic_text(0)])
    model = drop_sublayers(AutoModelForCausalLM.from_pretrained(folder).eval(), attention=[0, 2], mlp=[])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    genai = write_genai_folder(export_onnx(model, tmp_path / "fp32").path, model.config, tokenizer, tmp_path / "genai")
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert len(prompt) > 2 * model.config.sliding_window
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt):]
    assert genai_greedy(genai, prompt, NEW_TOKENS)[0] == want.tolist()


@pytest.mark.parametrize("graph", ["optimum", "fused"])
def test_genai_runs_a_head_pruned_model_with_per_layer_kv_heads(graph, pruned, tmp_path):
    """genai's config has one num_key_value_heads, but it sizes each past input from the graph: a model whose
    layers keep 1, 2 and 2 KV heads (and fewer query heads in one) generates like PyTorch, from either graph."""
    from pipeline.export.fused import export_fused
    from pipeline.model.prune_heads import kv_heads_per_layer, prune_heads

    model, tokenizer, *_ = pruned
    model = prune_heads(model, {0: [1]}, {3: [0, 2]})
    assert kv_heads_per_layer(model) == [1, 0, 2, 2]
    onnx_file = (export_fused if graph == "fused" else export_onnx)(model, tmp_path / "onnx").path
    folder = write_genai_folder(onnx_file, model.config, tokenizer, tmp_path / "g")
    assert json.loads((folder / GENAI_CONFIG).read_text())["model"]["decoder"]["num_key_value_heads"] == 2
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)[0, len(prompt):]
    assert genai_greedy(folder, prompt, NEW_TOKENS)[0] == want.tolist()


def test_genai_runs_the_int4_graph_like_onnxruntime(pruned, tmp_path):
    """Same file, same onnxruntime: genai's greedy tokens equal OnnxLM's, so genai wires KV and masks right."""
    model, tokenizer, _, int4 = pruned
    folder = write_genai_folder(int4, model.config, tokenizer, tmp_path / "genai")
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    _, tokens = greedy_trace(OnnxLM(int4), np.array([prompt]), np.ones((1, len(prompt)), np.int64), NEW_TOKENS - 1)
    assert genai_greedy(folder, prompt, NEW_TOKENS)[0] == tokens[0].tolist()


def test_genai_folder_links_the_model_and_is_rewritable(pruned, tmp_path):
    model, tokenizer, fp32, _ = pruned
    for _ in range(2):
        folder = write_genai_folder(fp32, model.config, tokenizer, tmp_path / "genai")
    assert (folder / "model.onnx").samefile(fp32) or (folder / "model.onnx").read_bytes() == fp32.read_bytes()


def test_genai_tokenizer_check(pruned, tmp_path):
    """The byte-level BPE a Hugging Face folder holds encodes alike in onnxruntime-genai; the SentencePiece-style
    decoder transformers' GGUF conversion writes makes genai encode spaces as '\u2581', the one failure this
    check exists for (pipeline/model/loading.py rewrites that decoder)."""
    model, tokenizer, fp32, _ = pruned
    text = "The king speaks to his brave son, and the queen answers: never again!"
    for case, gguf in (("bpe", False), ("gguf", True)):
        candidate = byte_level_bpe([synthetic_text(0)], gguf_decoder=gguf)
        folder = write_genai_folder(fp32, model.config, candidate, tmp_path / case)
        problem = genai_tokenizer_problem(folder, candidate, text)
        if gguf:
            assert problem.startswith("onnxruntime-genai encodes the text differently from the Hugging Face "
                                      "tokenizer from token 3 (genai [-1, -1, -1,"), problem
        else:
            assert problem is None
        shutil.rmtree(folder)


def test_genai_tokenizer_check_survives_a_crash_of_onnxruntime_genai(pruned, tmp_path, monkeypatch):
    """onnxruntime-genai can abort on tokenizer files it does not support: the check runs it in a child process,
    so a crash becomes a reported problem instead of taking the run down."""
    import pipeline.export.mobile as mobile

    model, tokenizer, fp32, _ = pruned
    folder = write_genai_folder(fp32, model.config, tokenizer, tmp_path / "genai")
    monkeypatch.setattr(mobile, "GENAI_ENCODE", "import os; os.abort()")
    problem = genai_tokenizer_problem(folder, tokenizer, "the king")
    assert problem.startswith(f"onnxruntime-genai cannot load the tokenizer files in {folder}")
    assert "SIGABRT" in problem
