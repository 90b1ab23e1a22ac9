"""The search's torch side: a structure applied to the evaluator computes what its quantised ONNX file computes
(fake quantisation parity), restores exactly, scores KL and perplexity sensibly; the fp16 KV export runs close
to PyTorch; and a whole search on a tiny model is reproducible with its seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import fused_architectures, left_padded_batch, tiny_model
from pipeline.export.fused import export_fused
from pipeline.export.policy import format_quantizer
from pipeline.measure.ort_runner import OnnxLM, greedy_trace
from pipeline.measure.reference import compare_traces, torch_greedy_trace
from pipeline.model import costs, structure
from pipeline.model.fitness import Evaluator
from pipeline.model.prune import drop_sublayers

WINDOWS = np.random.default_rng(0).integers(3, 256, (4, 24))


def _evaluator(model, int8_inputs: bool = False):
    def quantize(group, parts, params, fmt):
        return format_quantizer({group: fmt}, "rtn")(group, parts, params)
    return Evaluator(model, WINDOWS, quantize, int8_inputs=int8_inputs)


def _structure(rng: np.random.Generator, grid: str = "symmetric", kv: str = "fp32") -> structure.Structure:
    s = structure.Structure((True, False, True, True), (True, True, False, True), kv_dtype=kv)
    groups = [g for g in ("embedding", *(f"layers.{i}.{k}" for i in range(4) for k in structure.KIND_ORDER)) if s.keeps(g)]
    formats = {g: structure.quant_format(int(rng.choice([4, 8])), int(rng.choice([16, 32])), grid) for g in groups}
    return structure.Structure(s.attention, s.mlp, formats, kv)


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=torch.from_numpy(ids).long(), use_cache=False).logits.float().numpy()


@pytest.mark.parametrize("arch", fused_architectures())
@pytest.mark.parametrize("grid", ["symmetric", "offset"])
def test_fake_quantised_logits_match_the_quantised_onnx_file(arch, grid, tmp_path):
    """accuracy_level 1 dequantises in the kernel: the search's PyTorch model and the file run the same weights."""
    model = tiny_model(arch)
    ev = _evaluator(model)
    s = _structure(np.random.default_rng(1), grid)
    ev.apply(s)
    pruned = drop_sublayers(model, [1], [2])
    path = export_fused(pruned, tmp_path, lambda name, parts, params: ev.quantized(name, s.formats[name]),
                        accuracy_level=1).path
    lm = OnnxLM(path)
    ids = WINDOWS[:2]
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    onnx_logits, _ = lm.forward(ids, np.ones_like(ids), positions, lm.empty_past(2))
    fake = _logits(ev.model, ids)
    unquantised = _logits(pruned, ids)
    error = np.abs(onnx_logits - fake).max()
    assert error < 1e-3 and error * 10 < np.abs(onnx_logits - unquantised).max()


def test_structures_apply_and_restore_exactly():
    model = tiny_model("llama")
    ev = _evaluator(model)
    n = 4
    full = structure.Structure((True,) * n, (True,) * n)
    reference = _logits(model, WINDOWS)
    ev.apply(_structure(np.random.default_rng(2)))
    assert np.abs(_logits(ev.model, WINDOWS) - reference).max() > 1e-2
    ev.apply(full)
    np.testing.assert_allclose(_logits(ev.model, WINDOWS), reference, atol=1e-5)
    assert ev.kl(full, 4) < 1e-6
    dropped = structure.Structure((True, False, True, True), (True,) * n)
    assert ev.kl(dropped, 4) > 1e-3 and ev.kl(dropped, 2) != ev.kl(dropped, 4)
    assert ev.perplexity(dropped, WINDOWS) > 1 and ev.perplexity(full, WINDOWS) != ev.perplexity(dropped, WINDOWS)
    ev.apply(structure.Structure((True,) * n, (True,) * n, {}, "fp16"))  # keys and values rounded to fp16
    assert 0 < np.abs(_logits(ev.model, WINDOWS) - reference).max() < 1e-2


def test_fp16_kv_export_runs_close_to_pytorch(tmp_path):
    model = drop_sublayers(tiny_model("llama"), attention=[1], mlp=[2])
    ids, mask = left_padded_batch(lengths=(9, 5, 7))
    reference, tokens = torch_greedy_trace(model, ids, mask, steps=6)
    lm = OnnxLM(export_fused(model, tmp_path, kv_dtype="fp16").path)
    got, _ = greedy_trace(lm, ids.numpy(), mask.numpy(), 6, forced=tokens)
    stats = compare_traces(reference, got)
    assert lm.kv_dtype == np.float16 and stats.top1_agreement == 1.0 and 1e-6 < stats.max_abs_error < 5e-3, stats


def test_a_search_is_reproducible_with_its_seed(tmp_path, monkeypatch):
    from conftest import byte_level_bpe, synthetic_text
    from pipeline.budget import search
    from pipeline.config.loading import parse_recipe
    from pipeline.model.loading import LoadedModel, info_from_config
    from pipeline.model.scoring import score_model

    monkeypatch.setenv("SLIMFORMER_HOME", str(tmp_path))
    monkeypatch.setattr("pipeline.budget.calibration_for", lambda *a, **k: None)  # measured in test_budget_run
    model = tiny_model("llama")
    loaded = LoadedModel(model, byte_level_bpe([synthetic_text(0)]), "tiny-sha", "tiny llama")
    info = info_from_config(model.config)
    scores = score_model(model, WINDOWS, name="tiny")
    file_mb = costs.file_bytes(info, structure.Structure((True,) * 4, (True,) * 4)) / 1e6
    recipe = parse_recipe({"name": "t", "calibration": {"samples": 4, "seq_len": 24},
                           "validate": {"perplexity_windows": 2},
                           "budget": {"max_file_mb": file_mb * 0.2, "context": 32, "search": {
                               "generations": 3, "offspring": 3, "selection": [{"windows": 1, "keep": 2},
                                                                               {"windows": 2, "keep": 1}],
                               "sensitivity_windows": 1, "heldout_windows": 2, "heldout_points": 2,
                               "baseline_drops": [0], "block_sizes": [16, 32], "table_bits": [8]}}})
    first = search(recipe, loaded, info, scores, WINDOWS, WINDOWS[:2], progress=False)
    again = search(recipe, loaded, info, scores, WINDOWS, WINDOWS[:2], progress=False)
    assert first.chosen == again.chosen and first.pareto == again.pareto
    chosen = first.pareto.points[first.pareto.chosen["budget"]]
    assert chosen.file_mb <= file_mb * 0.2 and chosen.perplexity is not None
    assert any(p.label.startswith("uniform int8") for p in first.pareto.points)
    assert first.sensitivities.attention and len(first.sensitivities.layers) == 4
    from pipeline.budget import uniform_baselines
    fitting = [st for _, st in uniform_baselines(first.space, scores, [0]) if costs.file_bytes(info, st) / 1e6
               <= file_mb * 0.2]
    assert fitting and all(first.kl["budget"] <= first.evaluator.kl(st, 2) for st in fitting)  # never below one


def test_the_table_takes_the_table_algorithm_and_the_other_groups_the_algorithm(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from pipeline.budget import _group_quantizer
    from pipeline.config.loading import parse_recipe
    from pipeline.export import weights
    from pipeline.model.calibration import input_hessians
    from pipeline.model.groups import linear_groups

    model = tiny_model("llama")
    recipe = parse_recipe({"name": "t", "budget": {"max_file_mb": 1, "search": {
        "algorithm": "hqq", "table_algorithm": "gptq", "form": "offset"}}})
    monkeypatch.setenv("SLIMFORMER_HOME", str(tmp_path))
    loaded = SimpleNamespace(model=model, gguf=None, source_sha256="tiny")
    hessians = input_hessians(model, WINDOWS)
    fmt = structure.quant_format(4, 16, "offset")
    fits = {"embedding": lambda x: weights.gptq(x, hessians["embedding"], 4, 16, "offset"),
            "layers.0.down": lambda x: weights.hqq(x, 4, 16)}
    parts = {g: [m.weight.detach().float().numpy() for _, m in linear_groups(model)[g]] for g in fits}
    expected = {g: fit(np.concatenate(parts[g])).dequantize() for g, fit in fits.items()}
    for run in ("fits", "reads back"):
        quantize = _group_quantizer(recipe, loaded, WINDOWS)
        for group in fits:
            params = [p for p, _ in linear_groups(model)[group]]
            np.testing.assert_array_equal(quantize(group, parts[group], params, fmt).dequantize(), expected[group])
        monkeypatch.setattr(weights, "gptq", None)  # the second quantizer must not fit again
        monkeypatch.setattr(weights, "hqq", None)
        monkeypatch.setattr("pipeline.model.calibration.input_hessians", None)
    assert len(list((tmp_path / "fits").rglob("*.npz"))) == 2
    assert recipe.budget.search.algorithms == "hqq (table gptq)"


@pytest.mark.parametrize("grid", ["symmetric", "offset"])
def test_int8_inputs_make_the_fake_quantised_logits_match_accuracy_level_4(grid, tmp_path):
    """At accuracy level 4 MatMulNBits rounds its inputs to int8 per block (and adds an offset term from the
    unrounded input); the evaluator asked to do the same computes the file's logits, where fp32 inputs do not.
    One group at a time: with several, an input within float rounding of a half step somewhere may round the
    other way in one of the two, and attention carries that to every later position."""
    model = tiny_model("llama")
    full = (True,) * model.config.num_hidden_layers
    ids = WINDOWS[:2]
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    for i, (group, bits, block) in enumerate([("layers.0.qkv", 4, 32), ("layers.1.down", 8, 16), ("embedding", 4, 16)]):
        s = structure.Structure(full, full, {group: structure.quant_format(bits, block, grid)})
        exact, plain = _evaluator(model, int8_inputs=True), _evaluator(model)
        exact.apply(s)
        plain.apply(s)
        path = export_fused(model, tmp_path / str(i), lambda name, parts, params: exact.quantized(name, s.formats[name])
                            if name == group else None, accuracy_level=4).path
        lm = OnnxLM(path)
        onnx_logits, _ = lm.forward(ids, np.ones_like(ids), positions, lm.empty_past(2))
        error = np.abs(onnx_logits - _logits(exact.model, ids)).max()
        assert error < 1e-5 and error * 100 < np.abs(onnx_logits - _logits(plain.model, ids)).max(), group
