"""The reference ladder picker: the most capable rung that fits, fallbacks after a failed load, memory moved to
the app's context, its command line, and that it travels alone (standard library only)."""

from __future__ import annotations

import json

import pytest

from pipeline import picker

LADDER = {"context": 2048, "rungs": [
    {"name": "large", "files": {"onnx": "rungs/large/onnx-large/model.onnx"}, "memory_mb": 560.0,
     "kv_kb_per_token": 45.0, "kv_factor": 3.0},
    {"name": "medium", "files": {"onnx": "rungs/medium/onnx-medium/model.onnx"}, "memory_mb": 450.0,
     "kv_kb_per_token": 22.5, "kv_factor": 2.0},
    {"name": "small", "files": {"onnx": "rungs/small/onnx-small/model.onnx"}, "memory_mb": 300.0,
     "kv_kb_per_token": 21.0}]}


def test_the_most_capable_rung_that_fits_is_picked_and_failed_ones_are_skipped():
    assert picker.pick(LADDER, 600)["name"] == "large"
    assert picker.pick(LADDER, 500)["name"] == "medium"
    assert picker.pick(LADDER, 600, failed=("large",))["name"] == "medium"
    assert picker.pick(LADDER, 600, margin_mb=100)["name"] == "medium"
    assert picker.pick(LADDER, 299) is None
    assert [r["name"] for r in picker.fitting(LADDER, 460)] == ["medium", "small"]


def test_a_dominated_rung_is_never_picked():
    ladder = {**LADDER, "rungs": [*LADDER["rungs"][:2], {**LADDER["rungs"][2], "memory_mb": 470.0,
                                                          "dominated_by": "medium"}]}
    assert picker.pick(ladder, 600, failed=("large", "medium")) is None
    assert [r["name"] for r in picker.fitting(ladder, 1000)] == ["large", "medium"]


def _rung(name, file_mb, memory_mb, kv_kb, factor, decode_ms, perplexity, bits=None, model="a"):
    """A rung; its bits per byte follow its perplexity (one tokenizer, 4 bytes per token) unless given."""
    import math

    from pipeline.artifacts import LadderRung

    return LadderRung(name=name, files={}, file_mb=file_mb, memory_mb=memory_mb, predicted_memory_mb=None,
                      kv_kb_per_token=kv_kb, kv_factor=factor, decode_ms=decode_ms, perplexity=perplexity,
                      perplexity_increase_pct=0.0, mc_accuracy=0.9, limits={}, passed=True, model=model,
                      bits_per_byte=bits if bits is not None else math.log2(perplexity) / 4)


def test_a_rung_dominates_only_when_no_worse_in_anything_at_any_context():
    from pipeline.ladder import dominates

    # the measured case: fp16 KV, same weights, a little more accurate; the fp32-KV rung is never worth it
    medium = _rung("medium", 99.5, 436, 22.5, 2.7, 33.0, 46.83)
    large = _rung("large", 100.5, 535, 45.0, 2.2, 40.2, 46.93)
    assert dominates(medium, large, 2048) and not dominates(large, medium, 2048) and not dominates(medium, medium, 2048)
    assert not dominates(medium, _rung("x", 100.5, 535, 45.0, 2.2, 40.2, 46.80), 2048)  # more accurate: kept
    assert not dominates(medium, _rung("x", 100.5, 535, 45.0, 2.2, 32.0, 46.93), 2048)  # faster: kept
    # lighter at 2048 tokens but heavier with a short context (its weights cost more, its cache less): kept
    assert not dominates(_rung("a", 99, 430, 10.0, 3.0, 33, 46.0), _rung("b", 100, 440, 45.0, 3.0, 33, 47.0), 2048)


def test_rungs_of_different_source_models_are_compared_per_byte_not_per_token():
    from pipeline.ladder import dominates

    # a model whose tokens are longer has the higher perplexity and still the better text prediction
    long_tokens = _rung("long", 99, 430, 45.0, 3.0, 33, 60.0, bits=1.10, model="b")
    short_tokens = _rung("short", 100, 440, 45.0, 3.0, 33, 47.0, bits=1.25, model="a")
    assert dominates(long_tokens, short_tokens, 2048) and not dominates(short_tokens, long_tokens, 2048)


def test_memory_moves_with_the_context_by_the_kv_cache():
    """By each rung's own cost of a KV MiB (its KV precision's), 3 where a rung has none."""
    large, medium, small = LADDER["rungs"]
    assert picker.memory_at(large, LADDER, 4096) == pytest.approx(560 + 2048 * 45 / 1024 * 3)
    assert picker.memory_at(large, LADDER, 1024) == pytest.approx(560 - 1024 * 45 / 1024 * 3)
    assert picker.memory_at(medium, LADDER, 4096) == pytest.approx(450 + 2048 * 22.5 / 1024 * 2)
    assert picker.memory_at(small, LADDER, 4096) == pytest.approx(300 + 2048 * 21 / 1024 * 3)
    assert picker.pick(LADDER, 600, context=4096)["name"] == "medium"  # 560 MiB at 2048 is 830 at 4096


def test_command_line(tmp_path, capsys):
    path = tmp_path / "ladder.json"
    path.write_text(json.dumps(LADDER))
    assert picker.main([str(path), "--free-mb", "500"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "medium"
    assert picker.main([str(path), "--free-mb", "100"]) == 1
    assert "the smallest needs 300 MiB" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a ladder.json"):
        picker.load_ladder(tmp_path / "bad.json")


def test_the_picker_imports_nothing_from_the_package():
    from test_layout import import_graph

    assert import_graph()["pipeline.picker"] == set()
