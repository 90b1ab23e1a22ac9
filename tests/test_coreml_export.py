"""Core ML export of pruned and unpruned tiny models: one KV state pair per kept attention layer, compression
shrinks weights, refusals say what to change, and the traced wrapper matches PyTorch for every architecture.
Prediction needs macOS, so the packages are checked by structure (describe_package) on Linux."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import tiny_model
from pipeline.model.adapters import ADAPTERS
from pipeline.artifacts import CoreMLNumerics, CoreMLPackage
from pipeline.config.coreml import CoreMLSpec
from pipeline.export.coreml import causal_mask, describe_package, export_coreml, predict_parity
from pipeline.errors import ExportError
from pipeline.model.prune import drop_sublayers

CTX = 32
COMPRESSIONS = [{"kind": "linear-int8"}, {"kind": "linear-int4", "block_size": 32}, {"kind": "palettize", "nbits": 4}]


@pytest.fixture(scope="module")
def pruned_packages(tmp_path_factory):
    model = drop_sublayers(tiny_model("llama"), attention=[1, 2], mlp=[])
    out = tmp_path_factory.mktemp("coreml_pruned")
    packages = export_coreml(model, out, CoreMLSpec(context_length=CTX, compression=COMPRESSIONS))
    return model, {p.variant: p for p in packages}


@pytest.fixture(scope="module")
def unpruned_packages(tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml_full")
    return export_coreml(tiny_model("llama"), out, CoreMLSpec(context_length=CTX))


def test_spec_parses_every_compression_and_rejects_bad_blocks():
    spec = CoreMLSpec.model_validate({"context_length": 256, "compression": [*COMPRESSIONS,
                                      {"kind": "palettize", "nbits": 2, "mode": "kmeans"}]})
    assert [c.suffix for c in spec.compression] == ["int8", "int4-b32", "pal4-uniform", "pal2-kmeans"]
    assert CoreMLSpec.model_validate(json.loads(spec.model_dump_json())) == spec
    schema = CoreMLSpec.model_json_schema()
    for block in [schema, *schema["$defs"].values()]:
        assert block["additionalProperties"] is False
        assert all("description" in prop for prop in block["properties"].values()), block["title"]
    for bad in ({"colour": "red"}, {"compression": [{"kind": "palettize", "nbits": 5}]},
                {"compression": [{"kind": "linear-int2"}]}, {"stateful": False, "stateless": False},
                {"compression": [{"kind": "linear-int8"}, {"kind": "linear-int8"}]}, {"context_length": 0}):
        with pytest.raises(ValueError):
            CoreMLSpec.model_validate(bad)


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_traced_wrapper_matches_model_for_every_architecture(arch):
    from pipeline.export.coreml import _traced_wrapper

    model = drop_sublayers(tiny_model(arch), attention=[1, 2], mlp=[3])
    # raises ExportError when prefill + token-by-token decode through the trace differs from the model;
    # every export runs the same check (stateless: one full-sequence pass) before converting
    traced, names = _traced_wrapper(model, CTX, stateful=True)
    kv_heads, head_dim = model.config.num_key_value_heads, model.model.layers[0].self_attn.head_dim
    assert names == ["key_cache_0", "value_cache_0", "key_cache_1", "value_cache_1"]
    assert all(tuple(getattr(traced, n).shape) == (1, kv_heads, CTX, head_dim) for n in names)


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_head_pruned_states_have_each_layers_kv_heads(arch, tmp_path):
    from pipeline.export.coreml import _traced_wrapper
    from pipeline.model.prune_heads import prune_heads

    model = prune_heads(drop_sublayers(tiny_model(arch), attention=[2], mlp=[]), {0: [1]}, {3: [1, 3]})
    traced, names = _traced_wrapper(model, CTX, stateful=True)  # checked against the model (prefill + decode)
    head_dim = model.model.layers[0].self_attn.head_dim
    assert [tuple(getattr(traced, n).shape) for n in names[::2]] == [(1, h, CTX, head_dim) for h in (1, 2, 2)]
    if arch == "llama":  # one conversion is enough to see the states in the package
        package = export_coreml(model, tmp_path, CoreMLSpec(context_length=CTX, stateless=False))[0]
        assert package.states["key_cache_0"] == [1, 1, CTX, head_dim] and package.kv_states == 6
        assert json.loads(describe_package(package.path)["metadata"]["slimformer.kept_heads"]) == {
            "0": {"query": [0, 1], "kv": [0]}, "3": {"query": [0, 2], "kv": [0, 1]}}


def test_pruned_stateful_package_has_state_only_for_kept_attention(pruned_packages):
    _, packages = pruned_packages
    base = packages["stateful-fp16"]
    assert base.path.name == "model-stateful-fp16.mlpackage" and base.path.is_dir()
    assert base.stateful and base.kv_states == 4 and base.kv_layers == 2
    assert base.states == {f"{kind}_cache_{slot}": [1, 2, CTX, 16] for slot in (0, 1) for kind in ("key", "value")}
    assert base.inputs == {"input_ids": [1, f"1..{CTX}"], "causal_mask": [1, 1, f"1..{CTX}", f"1..{CTX}"]}
    assert list(base.outputs) == ["logits"]
    assert base.op_counts["write_state"] == 4 and base.op_counts["softmax"] == 2


def test_describe_package_reads_structure_back_from_disk(pruned_packages):
    _, packages = pruned_packages
    found = describe_package(packages["stateful-fp16"].path)
    assert set(found["states"]) == set(packages["stateful-fp16"].states)
    assert found["dtypes"]["input_ids"] == "int32" and found["dtypes"]["key_cache_0"] == "float16"
    assert json.loads(found["metadata"]["slimformer.kept_attention_layers"]) == [0, 3]
    assert found["metadata"]["slimformer.context_length"] == str(CTX)
    for package in packages.values():
        assert CoreMLPackage.from_json(json.loads(json.dumps(package.to_json()))) == package


def test_base_is_fp16_and_every_compression_is_smaller(pruned_packages):
    model, packages = pruned_packages
    assert set(packages) == {"stateful-fp16", "stateful-int8", "stateful-int4-b32", "stateful-pal4-uniform"}
    base = packages["stateful-fp16"]
    params = sum(p.numel() for p in model.parameters())  # the tied embedding counts (and is stored) once
    assert 2 * params <= base.weight_bytes < 2.1 * params
    assert not any(op.startswith("constexpr") for op in base.op_counts)
    expected_op = {"stateful-int8": "constexpr_blockwise_shift_scale", "stateful-int4-b32": "constexpr_blockwise_shift_scale",
                   "stateful-pal4-uniform": "constexpr_lut_to_dense"}
    for variant, op in expected_op.items():
        assert packages[variant].weight_bytes < 0.7 * base.weight_bytes, variant
        assert packages[variant].op_counts.get(op, 0) > 0 and packages[variant].kv_states == 4
    assert packages["stateful-int4-b32"].weight_bytes < packages["stateful-int8"].weight_bytes


def test_unpruned_has_four_kv_layers(unpruned_packages):
    assert [p.variant for p in unpruned_packages] == ["stateful-fp16"]
    assert unpruned_packages[0].kv_states == 8
    assert unpruned_packages[0].states["value_cache_3"] == [1, 2, CTX, 16]


def test_sliding_window_model_converts_with_state_only_for_kept_slots(tmp_path):
    # tiny Gemma 3 (window 4): the traced wrapper applies each sliding layer's window itself (checked against the
    # model on 6 tokens before converting); kept layers 1 (full) and 3 (sliding) get one state pair each
    model = drop_sublayers(tiny_model("gemma3_text"), attention=[0, 2], mlp=[3])
    [package] = export_coreml(model, tmp_path, CoreMLSpec(context_length=CTX))
    assert package.states == {f"{kind}_cache_{slot}": [1, 2, CTX, 16] for slot in (0, 1) for kind in ("key", "value")}
    assert package.op_counts["softmax"] == 2 and package.op_counts["write_state"] == 4


def test_every_attention_dropped_refuses_stateful_but_exports_stateless(tmp_path):
    model = drop_sublayers(tiny_model("llama"), attention=[0, 1, 2, 3], mlp=[])
    with pytest.raises(ExportError, match="stateful: false") as info:
        export_coreml(model, tmp_path / "refused", CoreMLSpec())
    assert "[0, 1, 2, 3]" in str(info.value) and "keep at least one attention layer" in str(info.value)
    assert not (tmp_path / "refused").exists()
    # the stateless variant has no cache to keep, so it exports (an MLP-only model converts quickly)
    [stateless] = export_coreml(model, tmp_path / "out", CoreMLSpec(stateful=False, stateless=True, context_length=CTX))
    assert stateless.path.name == "model-stateless-fp16.mlpackage" and stateless.variant == "stateless-fp16"
    assert not stateless.stateful and stateless.states == {} and "read_state" not in stateless.op_counts
    assert stateless.inputs == {"input_ids": [1, f"1..{CTX}"], "causal_mask": [1, 1, f"1..{CTX}", f"1..{CTX}"]}
    assert list(stateless.outputs) == ["logits"] and "softmax" not in stateless.op_counts


def test_bad_parameters_refused_before_any_work_all_listed(tmp_path, monkeypatch):
    import pipeline.config.checks

    monkeypatch.setattr(pipeline.config.checks, "have_sklearn", lambda: False)
    model = tiny_model("llama")
    bad_block = CoreMLSpec(context_length=1024, compression=[{"kind": "linear-int4", "block_size": 48},
                                                             {"kind": "palettize", "mode": "kmeans"}])
    with pytest.raises(ExportError) as info:
        export_coreml(model, tmp_path / "out", bad_block)
    message = str(info.value)
    for expected in ("max_position_embeddings 256", "block_size 48", "[64, 128]", "pip install scikit-learn"):
        assert expected in message
    for unchecked in (CoreMLSpec.model_construct(context_length=0), {"compression": [{"kind": "palettize", "nbits": 5}]}):
        with pytest.raises(ExportError, match="context_length|nbits"):
            export_coreml(model, tmp_path / "out", unchecked)
    assert not (tmp_path / "out").exists()


def test_causal_mask_lets_each_token_see_the_cache_and_itself():
    mask = causal_mask(past=2, seq=3)
    assert mask.shape == (1, 1, 3, 5) and mask.dtype == np.float16
    assert (np.isfinite(mask[0, 0]) == np.tril(np.ones((3, 5), bool), k=2)).all()
    assert (mask[np.isfinite(mask)] == 0).all()


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS predict_parity really runs the package")
def test_predict_parity_says_numerics_are_unchecked_on_linux(pruned_packages):
    model, packages = pruned_packages
    result = predict_parity(packages["stateful-fp16"], model, torch.arange(3, 9))
    assert result == CoreMLNumerics(checked=False, reason="coremltools cannot run predictions on Linux; numerics "
                                    "not checked on this host")


def test_importing_the_module_stays_light():
    code = ("import sys, pipeline.export.coreml; "
            "print([m for m in ('torch', 'transformers', 'coremltools') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
