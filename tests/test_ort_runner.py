"""ort_runner against PyTorch: greedy parity under left padding, batched multiple choice, perplexity,
latency, the CLI as a subprocess (how peak RSS is measured), and the runner's self-containment."""

from __future__ import annotations

import ast
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import left_padded_batch, tiny_model
from pipeline.measure import ort_runner
from pipeline.measure.ort_runner import (OnnxLM, choice_scores, greedy_trace, kv_bytes_per_token, latency,
                                 load_mc_items, multiple_choice, perplexity, save_inputs)
from pipeline.measure.reference import compare_traces, torch_greedy_trace

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, OnnxLM) for an unpruned tiny llama exported by optimum, shared by the module for speed."""
    from optimum.exporters.onnx import onnx_export_from_model

    model = tiny_model("llama")
    out = tmp_path_factory.mktemp("onnx")
    onnx_export_from_model(model, output=out, task="text-generation-with-past", do_validation=False)
    return model, OnnxLM(out / "model.onnx", threads=1)


def _assert_parity(model, lm):
    ids, mask = left_padded_batch(lengths=(9, 5, 7))
    ref, ref_tokens = torch_greedy_trace(model, ids, mask, steps=8)
    got, tokens = greedy_trace(lm, ids.numpy(), mask.numpy(), steps=8)
    stats = compare_traces(ref, got)
    assert stats.steps == 9
    assert stats.max_abs_error < 1e-4, stats
    assert stats.top1_agreement == 1.0, stats
    np.testing.assert_array_equal(tokens, ref_tokens)


def test_kv_layout(exported):
    _, lm = exported
    assert (lm.kv_layers, lm.kv_dtype, lm.takes_positions) == (4, np.float32, True)
    assert set(lm.past_shapes.values()) == {(2, 16)} and len(lm.past_shapes) == 8
    assert kv_bytes_per_token(lm) == 2 * 4 * 2 * 16 * 4
    assert lm.empty_past(3)["past_key_values.0.key"].shape == (3, 2, 0, 16)


def test_greedy_trace_matches_torch_unpruned(exported):
    _assert_parity(*exported)


def test_greedy_trace_matches_torch_pruned(tmp_path):
    export_onnx = pytest.importorskip("pipeline.export.onnx").export_onnx
    from pipeline.model.prune import drop_sublayers

    model = drop_sublayers(tiny_model("llama"), attention=[1, 2], mlp=[])
    lm = OnnxLM(export_onnx(model, tmp_path).path, threads=1)
    assert lm.kv_layers == 2
    _assert_parity(model, lm)


def test_head_pruned_graph_has_per_layer_kv_and_matches_torch(tmp_path):
    """KV bytes per token sum each layer's own KV heads; the cached decode under left padding is exact."""
    from pipeline.export.onnx import export_onnx
    from pipeline.model.prune import drop_sublayers
    from pipeline.model.prune_heads import prune_heads

    model = prune_heads(drop_sublayers(tiny_model("llama"), attention=[1], mlp=[]), {0: [0], 3: [1]}, {2: [0, 3]})
    lm = OnnxLM(export_onnx(model, tmp_path).path, threads=1)
    assert [lm.past_shapes[f"past_key_values.{i}.key"] for i in range(3)] == [(1, 16), (2, 16), (1, 16)]
    assert kv_bytes_per_token(lm) == 2 * (1 + 2 + 1) * 16 * 4
    assert lm.empty_past(2)["past_key_values.1.value"].shape == (2, 2, 0, 16)
    _assert_parity(model, lm)


def _scratch_scores(lm, context, choices):
    """Each context+choice scored as one sequence from an empty cache: the slow, obvious way."""
    scores = []
    for choice in choices:
        seq = np.array([context + choice])
        logits, _ = lm.forward(seq, np.ones_like(seq), np.arange(seq.shape[1])[None], lm.empty_past(1))
        logp = torch.log_softmax(torch.from_numpy(logits[0]).double(), -1)
        at = range(len(context) - 1, seq.shape[1] - 1)
        scores.append(np.mean([logp[i, seq[0, i + 1]].item() for i in at]))
    return np.array(scores)


def test_multiple_choice_batched_equals_scratch(exported):
    _, lm = exported
    rng = np.random.default_rng(0)
    items = []
    for n_ctx, lengths in [(6, (1, 3, 5, 2)), (11, (4, 4)), (1, (2, 7, 1))]:
        ctx = rng.integers(3, 256, n_ctx).tolist()
        choices = [rng.integers(3, 256, n).tolist() for n in lengths]
        batched, scratch = choice_scores(lm, ctx, choices), _scratch_scores(lm, ctx, choices)
        np.testing.assert_allclose(batched, scratch, rtol=0, atol=1e-5)
        items.append((ctx, choices, int(np.argmax(scratch))))
    wrong = (items[1][2] + 1) % 2
    items[1] = (items[1][0], items[1][1], wrong)
    assert multiple_choice(lm, items) == {"accuracy": pytest.approx(2 / 3), "n": 3}


def test_perplexity_matches_torch(exported):
    model, lm = exported
    windows = np.random.default_rng(1).integers(3, 256, (3, 16))
    got = perplexity(lm, windows)
    with torch.no_grad():
        logits = model(torch.from_numpy(windows)).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), torch.from_numpy(windows[:, 1:]).reshape(-1))
    assert got["tokens"] == 3 * 15
    assert got["perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-4)
    assert got["nll"] == pytest.approx(nll.item(), rel=1e-4)


def test_latency_is_positive_and_ordered(exported):
    _, lm = exported
    got = latency(lm, prefill_tokens=8, decode_context=16, decode_steps=6, warmup=1, repeats=2)
    assert got["prefill_ms"] > 0
    assert 0 < got["decode_ms_p50"] <= got["decode_ms_p90"]


def test_compare_traces_detects_argmax_flip():
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(3, 10)).astype(np.float32) for _ in range(4)]
    same = compare_traces(ref, [r.copy() for r in ref])
    assert same.top1_agreement == 1.0 and same.max_abs_error == 0 and same.sqnr_db == math.inf
    flipped = [r.copy() for r in ref]
    flipped[2][1, ref[2][1].argmin()] = ref[2][1].max() + 1.0
    stats = compare_traces(ref, flipped)
    assert stats.top1_agreement == pytest.approx(11 / 12)
    assert stats.max_abs_error > 1.0 and stats.sqnr_db < math.inf
    with pytest.raises(ValueError, match="length"):
        compare_traces(ref, flipped[:3])


def test_mc_items_round_trip(tmp_path):
    items = [([5, 6], [[7], [8, 9, 10]], 1), ([11], [[12, 13], [14], [15]], 2)]
    save_inputs(tmp_path / "in.npz", mc_items=items)
    assert load_mc_items(np.load(tmp_path / "in.npz")) == items


def _run(args, cwd):
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_cli_as_module_reports_peak_rss(exported, tmp_path):
    _, lm = exported
    out = tmp_path / "result.json"
    _run(["-m", "pipeline.measure.ort_runner", lm.path, "--threads", "1", "--out", str(out), "--latency",
          "--prefill-tokens", "8", "--decode-context", "16", "--decode-steps", "4"], cwd=REPO)
    result = json.loads(out.read_text())
    assert result["peak_rss_mb"] > 0
    assert result["latency"]["decode_ms_p50"] > 0
    assert result["kv_bytes_per_token"] == kv_bytes_per_token(lm)


def test_cli_copied_alone_runs_every_measure(exported, tmp_path):
    """The file works outside the package, as it will on a remote board."""
    _, lm = exported
    shutil.copy(ort_runner.__file__, tmp_path / "ort_runner.py")
    ids, mask = left_padded_batch()
    windows = np.random.default_rng(2).integers(3, 256, (2, 12))
    items = [([5, 6, 7], [[8], [9, 10]], 0)]
    save_inputs(tmp_path / "in.npz", windows=windows, trace_input_ids=ids.numpy(),
                trace_attention_mask=mask.numpy(), trace_steps=3, mc_items=items)
    _run(["ort_runner.py", lm.path, "--threads", "1", "--inputs", "in.npz", "--out", "r.json",
          "--perplexity", "--mc", "--trace"], cwd=tmp_path)
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["perplexity"] == pytest.approx(perplexity(lm, windows))
    assert result["multiple_choice"] == multiple_choice(lm, items)
    saved = np.load(result["trace"]["npz"] if Path(result["trace"]["npz"]).is_absolute()
                    else tmp_path / result["trace"]["npz"])
    trace, tokens = greedy_trace(lm, ids.numpy(), mask.numpy(), steps=3)
    np.testing.assert_allclose(saved["logits"], np.stack(trace), atol=1e-6)
    np.testing.assert_array_equal(saved["tokens"], tokens)


def test_runner_imports_only_stdlib_numpy_onnxruntime():
    tree = ast.parse(Path(ort_runner.__file__).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports break the file when it is copied alone"
            found.add(node.module.split(".")[0])
    allowed = set(sys.stdlib_module_names) | {"numpy", "onnxruntime"}
    assert found and found <= allowed, found - allowed


def test_teacher_forced_trace_decodes_the_given_tokens(exported):
    model, lm = exported
    ids, mask = left_padded_batch()
    free, free_tokens = greedy_trace(lm, ids.numpy(), mask.numpy(), steps=3)
    # forcing the model's own greedy tokens changes nothing
    same, _ = greedy_trace(lm, ids.numpy(), mask.numpy(), steps=3, forced=free_tokens)
    np.testing.assert_allclose(np.stack(same), np.stack(free), atol=1e-6)
    # forcing other tokens gives the logits PyTorch gives on that context
    other = (free_tokens + 1) % 256
    forced, _ = greedy_trace(lm, ids.numpy(), mask.numpy(), steps=3, forced=other)
    import torch

    context = torch.cat([ids, torch.as_tensor(other[:, :3])], dim=1)
    full_mask = torch.cat([mask, torch.ones(len(ids), 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=context, attention_mask=full_mask,
                       position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits
    np.testing.assert_allclose(forced[3], logits[:, -1].numpy(), atol=1e-4)
    assert np.abs(forced[3] - free[3]).max() > 1e-3
