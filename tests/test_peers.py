"""`make bench-peers` without the peers: genai timing on a tiny folder, llama.cpp output parsers on captured
output, the RoPE-base check, interleaving, the table. With the peers built (make bench-peers), the slow tests run
the real tools on SmolLM2-135M."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import save_tiny_folder, synthetic_text
from pipeline.bench import peer_timing
from pipeline.bench.peer_envs import _extract_vendored
from pipeline.bench.peer_models import check_rope_base, rope_theta
from pipeline.bench.peer_timing import TimingSpec, parse_llama_bench, parse_llama_perplexity
from pipeline.bench.peers import BUILDER, LLAMA, OPTIMUM, SLIM, markdown_table, ratios
from pipeline.errors import SlimformerError

DATA = Path(__file__).with_name("data")


@pytest.fixture(scope="module")
def genai_folder(tmp_path_factory):
    """A tiny llama exported by slimformer and written as an onnxruntime-genai folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.export.mobile import write_genai_folder
    from pipeline.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("peers")
    folder = save_tiny_folder(root / "hf", texts=[synthetic_text(0)])
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    return write_genai_folder(export_onnx(model, root / "onnx").path, model.config, tokenizer, root / "genai")


def test_genai_timing_decodes_every_token_it_is_asked_for(genai_folder, tmp_path):
    """A random tiny model emits end-of-text early; the timing suppresses it, so every repeat decodes the full
    prompt + first token + new tokens, and both figures come back per repeat's median."""
    spec = TimingSpec(threads=1, prompt_tokens=12, new_tokens=6, repeats=2, rounds=1)
    result = peer_timing.time_genai(genai_folder, spec, tmp_path / "t.json")
    assert result["sequence_tokens"] == [12 + 1 + 6] * 2
    assert result["prefill_ms"] > 0 and result["decode_ms_per_token"] > 0
    assert (result["prompt_tokens"], result["new_tokens"], result["threads"]) == (12, 6, 1)


def test_llama_bench_json_is_parsed_to_milliseconds():
    """A captured `llama-bench -o json` decode run (SmolLM2-135M Q4_1, 2 threads on a loaded 2-core machine,
    where llama.cpp's spinning threads collapse): 64 tokens at depth 256, 3 repetitions."""
    records = parse_llama_bench((DATA / "llama-bench-decode.json").read_text())
    (gen,) = [r for r in records if r["n_gen"] == 64]
    assert gen["n_depth"] == 256 and gen["n_prompt"] == 0
    ms = peer_timing.llama_bench_ms(gen)
    assert ms == pytest.approx(float(np.median(gen["samples_ns"])) / 1e6)
    # the median repetition's tokens/s, as llama-bench itself computed it, is the per-token figure inverted
    assert 1e3 / (ms / 64) == pytest.approx(float(np.median(gen["samples_ts"])), rel=1e-4)


def test_llama_bench_without_json_names_the_problem():
    with pytest.raises(SlimformerError, match="llama-bench printed no JSON array"):
        parse_llama_bench("error: failed to load model\n")
    with pytest.raises(SlimformerError, match="no JSON array"):
        parse_llama_bench('[{"n_gen": 64}]')  # an array, but not of results


def test_llama_perplexity_final_estimate_is_parsed():
    """Captured output of `llama-perplexity -c 128 --chunks 4` on the shipped Q4_1 GGUF."""
    text = (DATA / "llama-perplexity.txt").read_text()
    assert parse_llama_perplexity(text) == {"perplexity": 17.3288, "stderr": 2.83207, "chunks": 4}
    with pytest.raises(SlimformerError, match="no 'Final estimate' line"):
        parse_llama_perplexity(text.replace("Final estimate", "estimate"))


def _cos_cache_model(path: Path, theta: float, positions: int = 64, head_dim: int = 16) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    half = head_dim // 2
    cache = np.cos(np.arange(positions)[:, None] * theta ** (-np.arange(half) / half)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [positions, half])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [positions, half])
    graph = helper.make_graph([helper.make_node("Add", ["x", "cos_cache"], ["y"])], "g", [x], [y],
                              [numpy_helper.from_array(cache, "cos_cache")])
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, size_threshold=0)
    return path


def test_rope_base_check_reads_the_graph_cache(tmp_path):
    model = _cos_cache_model(tmp_path / "model.onnx", theta=100000.0)
    check_rope_base(model, 100000.0)
    with pytest.raises(SlimformerError, match="does not match rope_theta=10000"):
        check_rope_base(model, 10000.0)  # the silent failure toolchain.md warns about


def test_rope_theta_from_either_config_style():
    assert rope_theta({"rope_theta": 100000.0}) == 100000.0
    assert rope_theta({"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}) == 5e5
    with pytest.raises(SlimformerError, match="neither rope_theta"):
        rope_theta({"hidden_size": 64})


def test_only_vendored_llama_cpp_is_extracted(tmp_path):
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        for name in ("pkg-1.0/setup.py", "pkg-1.0/vendor/llama.cpp/CMakeLists.txt", "pkg-1.0/vendor/other/x.c"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tf.addfile(info, io.BytesIO(b"x\n"))
    source = _extract_vendored(sdist, tmp_path / "src")
    assert source == tmp_path / "src" / "pkg-1.0" / "vendor" / "llama.cpp"
    assert [p.name for p in (tmp_path / "src").rglob("*") if p.is_file()] == ["CMakeLists.txt"]


def test_paths_are_interleaved_in_rounds_and_reported_as_medians(monkeypatch, tmp_path):
    calls = []
    figures = {"a": [30.0, 10.0, 20.0], "b": [5.0, 7.0, 6.0]}

    def fake(kind):
        def timed(*args):
            label = "a" if kind == "genai" else "b"
            calls.append(label)
            value = figures[label][sum(c == label for c in calls) - 1]
            return {"prefill_ms": 10 * value, "decode_ms_per_token": value}
        return timed

    monkeypatch.setattr(peer_timing, "time_genai", fake("genai"))
    monkeypatch.setattr(peer_timing, "time_gguf", fake("gguf"))
    spec = TimingSpec(rounds=3)
    result = peer_timing.interleaved({"a": ("genai", tmp_path), "b": ("gguf", tmp_path)}, spec, tmp_path, tmp_path)
    assert calls == ["a", "b"] * 3
    assert result == {"a": {"prefill_ms": 200.0, "decode_ms_per_token": 20.0},
                      "b": {"prefill_ms": 60.0, "decode_ms_per_token": 6.0}}


def _rows():
    decode = {OPTIMUM: 40.0, SLIM["fp32"]: 30.0, SLIM["int8"]: 20.0, SLIM["int4"]: 9.0, BUILDER["int4"]: 12.0,
              BUILDER["fp32"]: 41.0, LLAMA["Q4_1"]: 10.0, LLAMA["Q8_0"]: 12.0, LLAMA["Q4_K_M"]: 11.0,
              LLAMA["F32"]: 25.0}
    return [{"path": p, "file_mb": 100.0, "decode_ms_per_token": d, "prefill_ms": 300.0, "perplexity": 20.0,
             "vs_fp32": 1.0, "scorer": "llama-perplexity" if p.startswith("llama") else "ort_runner",
             "reference": OPTIMUM, "made": "made"} for p, d in decode.items()]


def test_ratios_are_slimformer_decode_over_each_peer():
    got = {(q["numerator"], q["denominator"]): q["ratio"] for q in ratios(_rows())}
    assert got == {(SLIM["int4"], LLAMA["Q4_1"]): pytest.approx(0.9), (SLIM["int4"], BUILDER["int4"]):
                   pytest.approx(0.75), (SLIM["fp32"], LLAMA["F32"]): pytest.approx(1.2)}


def test_table_has_every_row_and_each_verdict():
    rows = _rows()
    result = {"rows": rows, "ratios": ratios(rows),
              "settings": {"threads": 2, "prompt_tokens": 256, "new_tokens": 64, "rounds": 3, "repeats": 3}}
    table = markdown_table(result)
    assert table.startswith("| path | file MB | decode ms/token | prefill ms (256 tokens) | held-out perplexity | "
                            "vs its fp32 |")
    assert all(f"| {r['path']} |" in table for r in rows)
    assert f"| {LLAMA['F32']} | 100.0 | 25.00 | 300.0 | 20.000 * | 1.000x |" in table
    assert f"| {SLIM['int4']} / {LLAMA['Q4_1']} | 0.900x | <= 0.9x | met |" in table
    assert f"| {SLIM['fp32']} / {LLAMA['F32']} | 1.200x | <= 1.0x | missed |" in table


def test_peers_refuse_a_model_source_without_a_gguf(tiny_project):
    from pipeline.bench.peers import compare
    from pipeline.config.loading import load_recipe

    with pytest.raises(SlimformerError, match="needs the model both as GGUF"):
        compare(load_recipe(tiny_project))


# ---------------------------------------------------------------- make bench-quant

def test_quant_sweep_measures_every_quantiser_on_both_weight_sets(tiny_project, tmp_path):
    from pipeline.bench.quant_sweep import markdown_table, quant_sweep
    from pipeline.config.loading import load_recipe

    rows = quant_sweep(load_recipe(tiny_project), out=str(tmp_path / "q.json"),
                       rows=["rtn symmetric", "hqq", "gptq symmetric"])
    assert [(r["weights"].split()[0], r["quantiser"]) for r in rows] == [
        (w, q) for w in ("packaged", "off-grid") for q in ("fp32", "rtn symmetric", "hqq", "gptq symmetric")]
    assert all(r["file_mb"] < rows[0]["file_mb"] for r in rows if r["quantiser"] != "fp32")
    assert "| off-grid (seeded noise) | hqq |" in markdown_table(rows)
    assert json.loads((tmp_path / "q.json").read_text())["rows"] == rows


def test_quant_sweep_searches_per_group_formats_within_a_file_budget(tiny_project):
    """The searched row: the undropped model's off-grid weights, every sublayer kept, the written file within the
    budget, scored beside that model's own fp32 file."""
    from pipeline.bench.quant_sweep import markdown_table, quant_sweep
    from pipeline.config.loading import load_recipe

    rows = quant_sweep(load_recipe(tiny_project), rows=[], search_mb=0.15)
    weights = "off-grid (seeded noise), undropped"
    assert [(r["weights"], r["quantiser"]) for r in rows[-2:]] == [
        (weights, "fp32"), (weights, "budget search <= 0.15 MB (gptq)")]
    fp32, searched = rows[-2:]
    assert searched["file_mb"] <= 0.15 < fp32["file_mb"]
    assert searched["vs_fp32_pct"] == pytest.approx(100 * (searched["perplexity"] / fp32["perplexity"] - 1))
    assert searched["structure"].startswith("0 of 4 attention and 0 of 4 MLP sublayers dropped")
    assert f"- budget search <= 0.15 MB (gptq): {searched['structure']}" in markdown_table(rows)


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


# ---------------------------------------------------------------- with the peers built (make bench-peers)

def _built_llama():
    from pipeline.bench.peer_envs import llama_cpp_dir

    if not (llama_cpp_dir() / "build.json").is_file():
        pytest.skip("llama.cpp is not built yet (make bench-peers builds it)")
    return llama_cpp_dir() / "bin"


@pytest.mark.slow
def test_llama_bench_times_the_shipped_gguf():
    from pipeline.model.assets import ensure_smollm2_gguf

    tools = _built_llama()
    spec = TimingSpec(prompt_tokens=32, new_tokens=8, repeats=1)
    result = peer_timing.time_gguf(tools / "llama-bench", ensure_smollm2_gguf(), spec)
    assert result["prefill_ms"] > 0 and result["decode_ms_per_token"] > 0


@pytest.mark.slow
def test_builder_int4_reads_rope_theta_and_loads_in_the_runner(tmp_path):
    from pipeline.bench.peer_envs import builder_env_dir
    from pipeline.bench.peer_models import build_with_builder
    from pipeline.measure.ort_runner import OnnxLM, perplexity
    from pipeline.model.loading import load_model

    if not (builder_env_dir() / "pins.txt").is_file():
        pytest.skip("the genai builder's venv is not made yet (make bench-peers makes it)")
    loaded = load_model("packaged")
    folder = build_with_builder(builder_env_dir() / "bin" / "python", loaded.folder, tmp_path / "int4", "int4",
                                tmp_path / "builder.log")  # checks the RoPE base itself
    ids = loaded.tokenizer("The king of England rode to the castle.", return_tensors="np")["input_ids"]
    assert 1 < perplexity(OnnxLM(folder / "model.onnx"), ids)["perplexity"] < 1000
    assert json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == 30


def test_quant_sweep_refuses_a_row_it_does_not_have(tiny_project):
    from pipeline.bench.quant_sweep import quant_sweep
    from pipeline.config.loading import load_recipe

    with pytest.raises(SlimformerError, match=r"rows \['gptq 3-bit'\] are unknown; choose from source GGUF blocks"):
        quant_sweep(load_recipe(tiny_project), rows=["gptq 3-bit"])
