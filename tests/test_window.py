"""Sliding-window conversion: PyTorch attends to the last W tokens (with per-head sinks), a cached decode matches
recompute under left padding, the fused export matches the same window and sinks, onnxruntime-genai keeps a
W + 1 KV ring for those layers, the measured error matches a direct computation, and the plan picks the layers
whose output changes least."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import yaml

from conftest import byte_level_bpe, genai_greedy, left_padded_batch, synthetic_text, tiny_model
from pipeline.artifacts import DropPlan, Scores
from pipeline.errors import RecipeError
from pipeline.export.fused import export_fused
from pipeline.measure.kv import kv_bytes_at
from pipeline.measure.ort_runner import OnnxLM, greedy_trace, perplexity
from pipeline.measure.reference import compare_traces, torch_greedy_trace
from pipeline.measure.torch_lm import TorchLM
from pipeline.model.plan import plan_window
from pipeline.model.prune import drop_sublayers
from pipeline.model.window import SINK_GRID, fit_sinks, measure_windows, set_windows_inplace

W = 8


@pytest.fixture
def windowed():
    model = drop_sublayers(tiny_model("llama"), attention=[1], mlp=[])
    full = drop_sublayers(tiny_model("llama"), attention=[1], mlp=[])
    sinks = {2: np.linspace(-1.0, 2.0, model.config.num_attention_heads).tolist()}  # layer 0: a plain window
    return set_windows_inplace(model, [0, 2], W, sinks), full


def test_window_changes_only_positions_that_reach_beyond_it(windowed):
    _, full = windowed
    model = set_windows_inplace(copy.deepcopy(full), [0, 2], W)  # no sinks: the first W positions are unchanged
    ids = torch.from_numpy(np.random.default_rng(0).integers(3, 256, (2, 3 * W)))
    with torch.no_grad():
        a, b = model(ids).logits, full(ids).logits
    assert torch.equal(a[:, :W], b[:, :W]) and (a[:, W:] - b[:, W:]).abs().max() > 1e-3


def test_cached_decode_matches_recompute_on_a_left_padded_batch(windowed):
    model, _ = windowed
    ids, mask = left_padded_batch(lengths=(20, 12, 16))
    trace, tokens = torch_greedy_trace(model, ids, mask, steps=6)
    full_ids = torch.cat([ids, torch.from_numpy(tokens[:, :6])], 1)
    full_mask = torch.cat([mask, torch.ones(3, 6, dtype=torch.long)], 1)
    with torch.no_grad():
        again = model(input_ids=full_ids, attention_mask=full_mask,
                      position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits
    for step in range(6):
        assert np.abs(trace[step + 1] - again[:, ids.shape[1] + step].numpy()).max() < 1e-4


def test_fused_export_attends_to_the_same_window(windowed, tmp_path):
    model, _ = windowed
    path = export_fused(model, tmp_path).path
    ids, mask = left_padded_batch(lengths=(20, 12, 16))
    reference, tokens = torch_greedy_trace(model, ids, mask, steps=6)
    got, _ = greedy_trace(OnnxLM(path), ids.numpy(), mask.numpy(), 6, forced=tokens)
    assert compare_traces(reference, got).max_abs_error < 1e-4
    windows = np.random.default_rng(1).integers(3, 256, (2, 5 * W))
    assert perplexity(OnnxLM(path), windows)["perplexity"] == pytest.approx(
        perplexity(TorchLM(model), windows)["perplexity"], rel=1e-5)
    held = kv_bytes_at(path, (W, 10 * W))
    per_slot = 2 * 2 * 16 * 4  # keys and values, 2 KV heads of 16, fp32
    assert held == {W: 3 * W * per_slot, 10 * W: (10 * W + 2 * (W + 1)) * per_slot}  # windowed slots: W + 1


def test_saved_folder_reloads_with_its_windows(windowed, tmp_path):
    from pipeline.model.loading import load_hf_folder

    model, _ = windowed
    model.save_pretrained(tmp_path)
    byte_level_bpe([synthetic_text(0)], vocab_size=256).save_pretrained(tmp_path)
    again, _ = load_hf_folder(tmp_path)
    ids = torch.from_numpy(np.random.default_rng(2).integers(3, 256, (1, 3 * W)))
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, model(ids).logits, atol=1e-5)


def test_genai_keeps_a_window_sized_ring_for_windowed_layers(tmp_path):
    from pipeline.export.mobile import write_genai_folder

    tokenizer = byte_level_bpe([synthetic_text(0)])
    model = drop_sublayers(tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None), [1], [])
    set_windows_inplace(model, [0, 2], 16, {0: [0.5] * model.config.num_attention_heads})
    path = export_fused(model, tmp_path / "onnx").path
    folder = write_genai_folder(path, model.config, tokenizer, tmp_path / "genai")
    prompt = tokenizer(synthetic_text(3), add_special_tokens=False)["input_ids"][:40]
    _, want = greedy_trace(OnnxLM(path), np.array([prompt]), np.ones((1, len(prompt)), np.int64), 19)
    got, generator = genai_greedy(folder, prompt, 20)
    assert got == want[0].tolist()
    assert [generator.get_output(f"present.{slot}.key").shape[2] for slot in range(3)] == [17, 17, len(prompt) + 20]


def test_plan_converts_the_layers_that_look_least_far():
    scores = Scores(model="m", metric="cosine", tokens=1, attention=(0.1,) * 4, mlp=(0.1,) * 4, block=(0.1,) * 4,
                    window_kl=(0.3, 0.05, 0.2, 0.05), window_size=8,
                    window_sinks={0: (1.0,), 2: (2.0,), 3: (3.0,)})
    drop = DropPlan(method="attention", attention=(1,), mlp=(), num_layers=4)
    chosen = plan_window(scores, drop, 2, 8)
    assert chosen.window == (2, 3) and chosen.window_sinks == {2: (2.0,), 3: (3.0,)}  # ties go deeper
    assert DropPlan.from_json(chosen.to_json()) == chosen
    assert plan_window(scores, drop, [0, 3], 8).window == (0, 3)
    with pytest.raises(RecipeError, match=r"layers \[1\] have no attention"):
        plan_window(scores, drop, [1, 2], 8)
    with pytest.raises(RecipeError, match="only 3 attention layers"):
        plan_window(scores, drop, 4, 8)


def test_fitted_error_is_the_windowed_output_against_the_full_one():
    """Layer 0 sees the same input either way, so its error is checked against its attention output directly."""
    model = tiny_model("llama")
    windows = np.random.default_rng(0).integers(3, 256, (2, 3 * W))
    errors, sinks = fit_sinks(model, windows, W)
    assert all(0 < e < 1 for e in errors) and set(sinks) == set(range(model.config.num_hidden_layers))
    assert all(SINK_GRID[0] <= s <= SINK_GRID[-1] for layer in sinks.values() for s in layer)

    def attention_outputs(m):
        seen = []
        hook = m.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda _, a: seen.append(a[0][0]))
        with torch.no_grad():
            for window in windows:
                m(torch.from_numpy(window[None]))
        hook.remove()
        return torch.cat(seen)

    full = attention_outputs(model)

    def error(sinks_of_layer):
        windowed = attention_outputs(set_windows_inplace(copy.deepcopy(model), [0], W, sinks_of_layer))
        return float(((windowed - full) ** 2).sum() / (full ** 2).sum())

    assert error({0: sinks[0]}) == pytest.approx(errors[0], rel=1e-3)
    assert any(s > SINK_GRID[0] for layer in sinks.values() for s in layer)  # some head lost mass to the window
    _, none_lost = fit_sinks(model, windows, 3 * W)  # a window as long as the text: no key is ever cut off
    assert all(s == SINK_GRID[0] for layer in none_lost.values() for s in layer)


def test_layer_cost_is_the_kl_of_the_model_with_that_layer_windowed():
    model = drop_sublayers(tiny_model("llama"), attention=[1], mlp=[])
    windows = np.random.default_rng(3).integers(3, 256, (2, 3 * W))
    kl, sinks = measure_windows(model, windows, W)
    assert kl[1] == float("inf") and 1 not in sinks and all(0 < kl[i] < 1 for i in (0, 2, 3))
    ids = torch.from_numpy(windows)
    with torch.no_grad():
        p = torch.log_softmax(model(ids).logits, -1)
        q = torch.log_softmax(set_windows_inplace(copy.deepcopy(model), [2], W, {2: sinks[2]})(ids).logits, -1)
    assert kl[2] == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean()), rel=1e-4)


def test_a_windowed_run_reports_its_bounded_kv_cache(tiny_project):
    from pipeline.artifacts import Report
    from pipeline.config.loading import load_recipe
    from pipeline.stages import run

    data = yaml.safe_load(tiny_project.read_text())
    data["drop"] = {"attention": 1, "window": {"layers": 2, "size": 16}}
    data["export"] = {"genai": True}
    tiny_project.write_text(yaml.safe_dump(data))
    final = run(load_recipe(tiny_project))
    report = Report.read(final)
    plan = report.plan
    assert len(plan.window) == 2 and not set(plan.window) & set(plan.attention) and set(plan.window_sinks) == set(plan.window)
    comp = report.validation.models["compressed"]
    assert comp.kv_bytes_at[8192] < report.validation.models["original"].kv_bytes_at[8192]
    genai = json.loads(next(final.rglob("genai_config.json")).read_text())["model"]["decoder"]["sliding_window"]
    assert genai["window_size"] == 16 and len(genai["layers"]) == 2
    md = (final / "report.md").read_text()
    assert "KV cache at context length" in md and "; 2 layers attend to a 16-token sliding window." in md


@pytest.mark.parametrize("change, problem", [
    ({"window": {"layers": 40, "size": 64}}, "drop.window.layers: 40 requested but the model has 30"),
    ({"window": {"layers": [3, 30], "size": 64}}, "drop.window.layers: layer 30 does not exist"),
    ({"window": {"layers": 2, "size": 9000}}, "drop.window.size: 9000 is not below the model's context"),
])
def test_window_recipes_the_model_cannot_take_are_refused(change, problem):
    from test_recipe_errors import problems_of

    assert any(p.startswith(problem) for p in problems_of({"name": "x", "drop": change}))


def test_window_needs_the_fused_graph_and_no_core_ml_or_head_drop():
    from test_recipe_errors import problems_of

    found = problems_of({"name": "x", "drop": {"window": {"layers": 2, "size": 64}, "heads": 2},
                         "export": {"graph": "optimum", "coreml": {}}})
    for hint in ("set export.graph: fused", "do not carry sliding windows", "remove drop.window or drop.heads"):
        assert any(hint in p for p in found), (hint, found)
