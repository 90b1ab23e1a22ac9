"""Peer comparison on a tiny model: optimum-cli + onnxruntime quantisation vs slimformer, measured alike."""

import json

import pytest
import yaml

from pipeline.bench.peers import markdown_table
from pipeline.config.loading import load_recipe


def test_peer_and_slimformer_paths_measured_side_by_side(tiny_project, tmp_path):
    from pipeline.bench.peers import compare

    data = yaml.safe_load(tiny_project.read_text())
    data["validate"]["latency"]["rounds"] = 1
    tiny_project.write_text(yaml.safe_dump(data))
    out = tmp_path / "peers.json"
    rows = compare(load_recipe(tiny_project), out=str(out))
    by = {(r["path"], r["bits"]): r for r in rows}
    assert set(by) == {(p, b) for p in ("optimum+onnxruntime", "slimformer") for b in ("fp32", "int8", "int4")}
    peer, slim = by[("optimum+onnxruntime", "fp32")], by[("slimformer", "fp32")]
    # the recipe drops 1 of 4 attention layers: a quarter less KV cache, at every bit width
    for bits in ("fp32", "int8", "int4"):
        assert by[("slimformer", bits)]["kv_kb_per_token"] == pytest.approx(
            by[("optimum+onnxruntime", bits)]["kv_kb_per_token"] * 3 / 4)
    assert slim["file_mb"] < peer["file_mb"]
    assert by[("optimum+onnxruntime", "int4")]["file_mb"] < peer["file_mb"]
    assert all(r["perplexity"] > 1 and 0 <= r["mc_accuracy"] <= 1 and r["decode_p50_ms"] > 0 for r in rows)
    assert json.loads(out.read_text())["rows"] == rows
    table = markdown_table(rows)
    assert "| int4 | slimformer |" in table and "0.750x" in table  # KV ratio column


def test_quant_sweep_measures_every_quantiser_on_both_weight_sets(tiny_project, tmp_path):
    from pipeline.bench.quant_sweep import markdown_table, quant_sweep

    rows = quant_sweep(load_recipe(tiny_project), out=str(tmp_path / "q.json"),
                       rows=["rtn symmetric", "hqq", "gptq symmetric"])
    assert [(r["weights"].split()[0], r["quantiser"]) for r in rows] == [
        (w, q) for w in ("packaged", "off-grid") for q in ("fp32", "rtn symmetric", "hqq", "gptq symmetric")]
    assert all(r["file_mb"] < rows[0]["file_mb"] for r in rows if r["quantiser"] != "fp32")
    assert "| off-grid (seeded noise) | hqq |" in markdown_table(rows)
    assert json.loads((tmp_path / "q.json").read_text())["rows"] == rows


def test_off_grid_weights_move_within_half_a_block_step():
    import numpy as np

    from conftest import tiny_model
    from pipeline.bench.quant_sweep import off_grid

    model = tiny_model("llama")
    moved = off_grid(model)
    w, v = model.model.layers[0].mlp.up_proj.weight.detach().numpy(), moved.model.layers[0].mlp.up_proj.weight.detach().numpy()
    blocks = w.reshape(w.shape[0], -1, 32)
    step = (blocks.max(-1) - blocks.min(-1)) / 15
    shift = np.abs(v - w).reshape(blocks.shape).max(-1)
    assert (shift <= step / 2 + 1e-6).all() and (shift > 0).all()
    assert np.array_equal(off_grid(model).model.layers[0].mlp.up_proj.weight.detach().numpy(), v)  # seeded
