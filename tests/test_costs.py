"""The budget's cost model: predicted file bytes against the files the fused exporter writes (every architecture,
tied and untied tables, every grid, drops, fp16 KV, the source GGUF's blocks), KV bytes against the runner's
count, and the runtime models a calibration fits."""

from __future__ import annotations

import random

import numpy as np
import pytest

from conftest import fused_architectures, tiny_model
from pipeline.artifacts import FootprintCalibration, FootprintPoint
from pipeline.export.fused import export_fused
from pipeline.export.policy import format_quantizer
from pipeline.measure import ort_runner
from pipeline.measure.footprint import FLOORS, fit
from pipeline.measure.ort_runner import OnnxLM
from pipeline.model import costs, structure
from pipeline.model.loading import info_from_config
from pipeline.model.prune import drop_sublayers


def _random_structure(rng: random.Random, info, grid: str) -> structure.Structure:
    n = info.num_layers
    attention = [True] + [rng.random() > 0.3 for _ in range(n - 1)]
    mlp = [rng.random() > 0.3 for _ in range(n)]
    s = structure.Structure(tuple(attention), tuple(mlp))
    blocks = [16, 32] if grid == "offset" else [16, 32, 64]  # offsets need blocks that divide the input width
    formats = {g: structure.quant_format(rng.choice([4, 8]), rng.choice(blocks), grid) for g in s.groups(info)}
    if rng.random() < 0.3:
        formats[rng.choice(list(formats))] = None  # an fp32 group
    return structure.Structure(s.attention, s.mlp, formats, rng.choice(["fp32", "fp16"]))


@pytest.mark.parametrize("arch", fused_architectures())
@pytest.mark.parametrize("tied", [True, False])
def test_predicted_file_size_is_within_one_percent_of_the_written_file(arch, tied, tmp_path):
    rng = random.Random(f"{arch}{tied}")
    for trial, grid in enumerate(("symmetric", "asymmetric", "offset")):
        model = tiny_model(arch, tie_word_embeddings=tied, vocab_size=rng.choice([256, 1000]), intermediate_size=96)
        info = info_from_config(model.config)
        s = _random_structure(rng, info, grid)
        pruned = drop_sublayers(model, [i for i, k in enumerate(s.attention) if not k],
                                [i for i, k in enumerate(s.mlp) if not k])
        path = export_fused(pruned, tmp_path / str(trial), format_quantizer(s.formats, "rtn"),
                            kv_dtype=s.kv_dtype).path
        predicted, written = costs.file_bytes(info, s), path.stat().st_size
        assert abs(predicted / written - 1) < 0.01, (grid, s, predicted, written)
        assert costs.kv_bytes_per_token(info, s) == ort_runner.kv_bytes_per_token(OnnxLM(path))


def test_rotary_caches_are_priced_at_the_export_max_length(tmp_path):
    """Tiny Gemma 3 keeping a full and a sliding layer: two cache pairs, each of max_length rows."""
    model = drop_sublayers(tiny_model("gemma3_text"), [0, 2], [])
    info = info_from_config(model.config)
    s = structure.Structure((False, True, False, True), (True,) * 4)
    written = export_fused(model, tmp_path, max_length=32).path.stat().st_size
    assert costs.file_bytes(info.with_max_length(32), s) == pytest.approx(written, rel=0.002)
    saved = costs.file_bytes(info, s) - costs.file_bytes(info.with_max_length(32), s)
    assert saved == 4 * ((256 - 32) * 8 * 4 + 1)  # cos and sin of both bases: 8 fp32 a row, a byte of dims


def test_source_blocks_are_priced_as_the_gguf_stores_them(tmp_path):
    from test_fused import _gguf_copy

    from pipeline.export.gguf_blocks import GgufBlocks
    from pipeline.model.space import source_formats

    model = tiny_model("llama", vocab_size=512)
    gguf = GgufBlocks(_gguf_copy(model, tmp_path / "m.gguf"))  # Q4_1 linears, Q8_0 table
    info = info_from_config(model.config)
    types = {p: gguf.type_of(p) for g in structure.all_groups(info) for p in structure.group_params(info, g)}
    formats = source_formats(info, types)
    assert formats["layers.0.qkv"] == structure.GGUF_FORMATS["Q4_1"] and formats["embedding"] == structure.GGUF_FORMATS["Q8_0"]
    s = structure.Structure((True,) * 4, (True,) * 4, formats)
    path = export_fused(model, tmp_path / "src", format_quantizer(formats, gguf=gguf)).path
    assert abs(costs.file_bytes(info, s) / path.stat().st_size - 1) < 0.01
    model.model.layers[0].mlp.down_proj.weight.data.mul_(1.01)
    with pytest.raises(ValueError, match="cannot be reused"):  # changed weights: the blocks are refused loudly
        export_fused(model, tmp_path / "changed", format_quantizer(formats, gguf=gguf))


def test_merged_source_needs_reusable_types_of_one_width():
    assert structure.merged_source(["Q4_0", "Q4_1"]) == structure.Format(4, 32, True, True, source=True)
    assert structure.merged_source(["Q4_1", "Q8_0"]) is None and structure.merged_source(["Q4_K"]) is None


def test_block_padding_is_paid_for():
    """576 inputs in blocks of 128 pad to 640 codes a row: more bytes than blocks of 64, scales included."""
    n, k = 100, 576
    assert structure.Format(4, 128).payload(n, k) == n * (640 // 2 + 2 * 5)
    assert structure.Format(4, 64).payload(n, k) == n * (576 // 2 + 2 * 9) < structure.Format(4, 128).payload(n, k)


def test_calibration_fit_recovers_linear_costs_per_kv_precision():
    """Points made from known coefficients, different for each KV precision, are fitted back; a slope that noise
    makes negative is held at 0, and a filled KV cache costs at least its own bytes."""
    rng = np.random.default_rng(0)
    truth = {kv: ({k: rng.uniform(0.5, 3) + FLOORS.get(k, 0.0) for k in costs.MEMORY_FEATURES},
                  {k: rng.uniform(0.5, 3) for k in costs.DECODE_FEATURES}) for kv in ("fp32", "fp16")}
    points = []
    for i in range(18):
        kv = ("fp32", "fp16")[i % 2]
        memory, decode = truth[kv]
        f = {k: rng.uniform(1, 100) for k in {*costs.MEMORY_FEATURES, *costs.DECODE_FEATURES}}
        f["base"] = 1.0
        points.append(FootprintPoint(label=str(i), kv_dtype=kv, file_bytes=0, features=f,
                                     peak_rss_mb=sum(c * f[k] for k, c in memory.items()),
                                     decode_ms=sum(c * f[k] for k, c in decode.items())))
    got = fit(points, "host", 64, 2, "x", 0.0)
    for kv, (memory, decode) in truth.items():
        assert got.memory[kv] == pytest.approx(memory) and got.decode[kv] == pytest.approx(decode)
    f = points[0].features
    assert got.memory_mb(f, "fp16") != pytest.approx(got.memory_mb(f, "fp32"))
    assert FootprintCalibration.from_json(got.to_json()) == got
    flat = [FootprintPoint(label=p.label, kv_dtype=p.kv_dtype, file_bytes=0, features=p.features,
                           peak_rss_mb=100 - p.features["kv_mib"] - p.features["blocks_m"], decode_ms=1.0)
            for p in points]
    held = fit(flat, "host", 64, 2, "x", 0.0).memory["fp16"]
    assert held["kv_mib"] == 1.0 and held["blocks_m"] == 0.0


def test_protocol_constants_agree():
    from pipeline.config.checks import MEMORY_DECODE_STEPS

    assert ort_runner.MEMORY_CHUNK == costs.PREFILL_CHUNK and ort_runner.MEMORY_DECODE_STEPS == MEMORY_DECODE_STEPS
