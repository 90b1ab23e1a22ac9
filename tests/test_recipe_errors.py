"""Bad recipes end in one RecipeError that names each problem, never in a traceback: hand-picked cases, and
the shipped recipes mutated a few thousand times (seeded, so every run tries the same mutations)."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import yaml

from pipeline.artifacts import ModelInfo
from pipeline.config.checks import model_problems, recipe_problems
from pipeline.config.loading import load_recipe, parse_recipe
from pipeline.errors import RecipeError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SMOLLM2 = ModelInfo(model_type="llama", num_layers=30, hidden_size=576, intermediate_size=1536, num_heads=9,
                    num_kv_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                    max_position_embeddings=8192, source="test")


def problems_of(data, base=RECIPES) -> list[str]:
    try:
        recipe = parse_recipe(data, "fuzzed", base=base)
    except RecipeError as e:
        return e.problems
    return recipe_problems(recipe) + model_problems(recipe, SMOLLM2)


@pytest.mark.parametrize("where, data, hint", [
    ("heal.epochs", {"heal": {"epochs": 3}, "drop": {"attention": 1}}, "steps, learning_rate"),
    ("quantize.0.onnx-int4.bitz", {"quantize": [{"kind": "onnx-int4", "bitz": 4}]}, "block_size, accuracy_level, algorithm"),
    ("export.coreml.colour", {"export": {"coreml": {"colour": 1}}}, "stateful, stateless, context_length"),
    ("export.coreml.compression.0.linear-int4.bits", {"export": {"coreml": {"compression": [
        {"kind": "linear-int4", "bits": 4}]}}}, "kind, block_size"),
    ("validate.targets.0.ssh.hots", {"validate": {"targets": [{"kind": "ssh", "hots": "x"}]}}, "host, port, user"),
    ("validate.variant_gates.int4.max_ppl", {"quantize": [{"kind": "onnx-int4"}],
                                             "validate": {"variant_gates": {"int4": {"max_ppl": 1}}}},
     "max_perplexity_increase_pct"),
])
def test_unknown_keys_list_what_is_allowed_in_optional_list_and_map_blocks(where, data, hint):
    with pytest.raises(RecipeError) as e:
        parse_recipe({"name": "x", **data})
    [problem] = e.value.problems
    assert problem.startswith(f"{where}: unknown key") and hint in problem


def test_output_dir_is_relative_to_the_recipe(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "r.yaml"
    path.write_text("name: r\noutput: {dir: ../out}\n")
    assert load_recipe(path).output.dir == tmp_path / "out"


@pytest.mark.parametrize("bad, expected", [
    ("data/a\x00b.txt", "contains a NUL byte"),
    ("x" * 300 + ".txt", "over this system's limit of 255"),
    ("/".join(["d"] * 2100), "over this system's limit of 4096"),
])
def test_paths_a_system_cannot_hold_are_refused_by_name(bad, expected):
    with pytest.raises(RecipeError) as e:
        parse_recipe({"name": "x", "calibration": {"files": [bad]}}, base=Path("/tmp"))
    assert e.value.problems[0].startswith("calibration.files.0: ") and expected in e.value.problems[0]


def test_recipe_file_paths_that_cannot_exist_are_recipe_errors(tmp_path):
    for path, expected in ((tmp_path / "a\x00.yaml", "cannot be read"), (tmp_path / ("y" * 300), "cannot be read"),
                           (tmp_path / "missing.yaml", "file not found")):
        with pytest.raises(RecipeError, match=expected):
            load_recipe(path)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


VALUES = [None, -1, 0, 1, 10**9, 2.5, -0.5, True, "", "x", "a\x00b", "n" * 300, "/".join(["d"] * 2100), [], {},
          {"bogus": 1}, ["x"], "packaged:nope.txt", "onnx-int4", "cortex-a53", "../../etc/passwd", 1e308,
          {"kind": "onnx-int4"}, {"kind": "arm64-emulated", "cpu": "max"}, {"kind": "ssh"}, {"kind": "palettize"}]


def _mutate(data, rng: random.Random):
    data = copy.deepcopy(data)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice([p for p in _paths(data) if p])
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        action = rng.random()
        if action < 0.15 and isinstance(parent, dict):
            del parent[path[-1]]
        elif action < 0.25 and isinstance(parent, dict):
            parent[f"unknown_{rng.randint(0, 9)}"] = rng.choice(VALUES)
        else:
            parent[path[-1]] = copy.deepcopy(rng.choice(VALUES))
    return data


def test_thousands_of_mutated_shipped_recipes_end_in_recipe_errors_or_parse():
    shipped = [yaml.safe_load(p.read_text()) for p in sorted(RECIPES.glob("smollm2-135m*.yaml"))]
    rng = random.Random(0)
    outcomes = {"parsed": 0, "refused": 0}
    for _ in range(3000):
        problems = problems_of(_mutate(rng.choice(shipped), rng))  # anything but a RecipeError fails the test
        outcomes["refused" if problems else "parsed"] += 1
        assert all(isinstance(p, str) and p for p in problems)
    assert outcomes["refused"] > 1500 and outcomes["parsed"] > 100, outcomes
