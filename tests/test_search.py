"""The budget search in pure numbers (no torch): the space and its limits, mutation that always fits, the greedy
plan, the evolutionary loop's reproducibility and selection, the frontier, and the infeasibility message."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipeline.artifacts import ModelInfo
from pipeline.budget import budget_problems, frontier, search_starts
from pipeline.config.loading import parse_recipe
from pipeline.model.structure import GGUF_FORMATS, TABLE, Format, quant_format
from pipeline.model.evopress import evolve
from pipeline.model.space import Space, build_space

INFO = ModelInfo(model_type="llama", num_layers=6, hidden_size=128, intermediate_size=256, num_heads=4,
                 num_kv_heads=2, head_dim=32, vocab_size=2048, tie_word_embeddings=True, max_position_embeddings=512,
                 source="test")


def _space(source: bool = True, **search):
    recipe = parse_recipe({"name": "t", "budget": {"context": 128, "search": search}})
    src = {g: Format(4, 32, True, True, source=True) for g in ("layers.0.qkv", "layers.1.down")} if source else {}
    return build_space(INFO, recipe.budget.search, src, 128)


def _toy_error(space):
    """A made-up accuracy cost: attention drops dear (deeper cheaper), 4 bits dearer than 8, small blocks cheaper,
    the source's blocks free, a 4-bit table dear, fp16 KV nearly free."""
    def error(c):
        s = space.structure(c)
        total = sum(1.0 / (1 + i) for i, k in enumerate(c.attention) if not k) + (1e-3 if s.kv_dtype == "fp16" else 0)
        for g, f in s.formats.items():
            total += 0 if f.source else (0.3 if g == TABLE else 0.01) * (2 ** (8 - f.bits)) * f.block_size / 32 / 16
        return total
    return error


def test_levels_run_from_largest_to_smallest_and_include_reusable_source_blocks():
    space = _space()
    assert [f.name for f in space.levels["layers.0.qkv"]][0] == "q8b32"
    assert "source" in [f.name for f in space.levels["layers.0.qkv"]]
    assert "source" not in [f.name for f in space.levels["layers.2.qkv"]]
    sizes = [space.footprint(space.most_accurate()).file_mb]
    c = space.most_accurate()
    while moves := [m for m in space.moves(c, 1) if m[0] == "format"]:
        c = space.apply(c, moves[0])
        sizes.append(space.footprint(c).file_mb)
    assert sizes == sorted(sizes, reverse=True)  # every format step compresses


def test_several_grids_give_each_group_every_grids_formats_with_distinct_names():
    """form: [offset, symmetric] lets a group take Q4_1-like blocks (offset only where the block divides the input
    width) or symmetric ones; names tell the grids apart; hqq keeps to its offset grid."""
    levels = _space(source=False, form=["offset", "symmetric"], bits=[4], block_sizes=[32, 256]).levels["layers.2.qkv"]
    assert [f.name for f in levels] == ["q4b256", "q4b32-min", "q4b32"]  # k = 128: no offset blocks of 256
    assert {f.grid for f in levels} == {"offset", "symmetric"}
    hqq = _space(source=False, form=["offset", "symmetric"], algorithm="hqq", bits=[4], block_sizes=[32])
    assert [f.name for f in hqq.levels["layers.2.qkv"]] == ["q4b32-min"]
    with pytest.raises(Exception, match="form"):
        parse_recipe({"name": "t", "budget": {"context": 128, "search": {"form": []}}})
    from pipeline.config.checks import budget_recipe_problems

    def problems(form):
        return budget_recipe_problems(parse_recipe(
            {"name": "t", "budget": {"context": 128, "search": {"algorithm": "hqq", "form": form}}}))
    assert problems(["offset"]) == [] and problems("offset") == []
    assert any("set form: offset" in p for p in problems(["offset", "symmetric"]))


def test_mutation_always_fits_and_keeps_an_attention_sublayer():
    space = _space()
    limits = {"max_file_mb": space.footprint(space.most_accurate()).file_mb * 0.6}
    rng = np.random.default_rng(0)
    c = space.greedy(space.most_accurate(), limits, _toy_error(space))
    assert space.fits(c, limits)
    for _ in range(200):
        c = space.mutate(c, rng, limits)
        assert space.fits(c, limits) and sum(c.attention) >= 1


def test_greedy_plan_compresses_formats_before_dropping_dear_sublayers():
    space = _space()
    full = space.footprint(space.most_accurate()).file_mb
    mild = space.greedy(space.most_accurate(), {"max_file_mb": full * 0.7}, _toy_error(space))
    assert all(mild.attention) and space.fits(mild, {"max_file_mb": full * 0.7})
    smallest_formats = space.footprint(space.apply(space.smallest(), ("kv", 0, -1))).file_mb
    assert space.footprint(space.smallest()).file_mb <= smallest_formats


def _uniform(space, bits: int, table_bits: int, block: int = 32):
    """Every group at one format, nothing dropped: the shape of a uniform baseline."""
    from pipeline.model.structure import Structure

    formats = {g: next(f for f in levels if not f.source and f.block_size == block and f.bits == (
        table_bits if g in (TABLE, "lm_head") else bits)) for g, levels in space.levels.items()}
    n = space.info.num_layers
    return space.candidate(Structure((True,) * n, (True,) * n, formats))


def test_search_starts_descend_from_every_uniform_baseline_and_all_fit():
    space = _space()
    error = _toy_error(space)
    four_bit, smallest = _uniform(space, 4, 8), space.smallest()
    limits = {"max_file_mb": space.footprint(four_bit).file_mb * 0.99}  # just below the uniform 4-bit choice
    starts = search_starts(space, limits, error, [four_bit, smallest])
    keys = [space.key(c) for c in starts]
    assert all(space.fits(c, limits) for c in starts) and len(keys) == len(set(keys))
    assert space.key(smallest) in keys  # a uniform choice that fits is a start as it is
    # a few steps down from the uniform choice beat the descent from the most accurate structure here
    from_uniform, from_top = space.greedy(four_bit, limits, error), space.greedy(space.most_accurate(), limits, error)
    assert space.key(from_uniform) in keys and error(from_uniform) < error(from_top)
    assert min(error(c) for c in starts) == error(from_uniform)


def test_greedy_steps_through_a_level_that_saves_nothing_and_the_smallest_is_always_a_start():
    """A table whose second level costs what its first does (a source format next to its own kind): the descent
    goes on to the 4-bit level behind it rather than stopping over the limit."""
    levels = (quant_format(8, 32, "offset"), GGUF_FORMATS["Q8_0"], quant_format(8, 128, "offset"),
              quant_format(4, 32, "offset"))
    space = Space(INFO, {TABLE: levels}, ("fp32",), False, False, 128)
    top, error = space.most_accurate(), (lambda c: float(sum(c.levels)))
    source, after = (space.footprint(replace(top, levels=(i,))).file_mb for i in (1, 2))
    assert after >= source  # the step after the source's blocks saves nothing
    limits = {"max_file_mb": space.footprint(space.smallest()).file_mb}
    assert space.greedy(top, limits, error) == space.smallest()
    assert search_starts(space, limits, error, []) == [space.smallest()]


def test_evolution_is_reproducible_with_a_seed_and_never_worse_than_its_start():
    space = _space()
    limits = {"max_file_mb": space.footprint(space.most_accurate()).file_mb * 0.55}
    error = _toy_error(space)

    def fitness(cands, windows):  # "noisier" on fewer windows, as real KL on few tokens is
        return [error(c) * (1 + 0.05 * np.sin(hash(space.key(c)) % 97) / windows) for c in cands]

    def run(seed):
        start = space.greedy(space.most_accurate(), limits, error)
        best, log = evolve(start, lambda c, r: space.mutate(c, r, limits), fitness, space.key, [(1, 3), (4, 1)],
                           generations=25, offspring=6, rng=np.random.default_rng(seed))
        return start, best, log
    start, best, log = run(7)
    again = run(7)[1:]
    assert again[0] == best and again[1].scores == log.scores and again[1].parents == log.parents
    assert fitness([best], 4)[0] <= fitness([start], 4)[0] and space.fits(best, limits)
    assert len(log.scores) > 25  # children were scored, most on the first step's windows only
    assert sum(1 for v in log.scores.values() if 4 in v) < sum(1 for v in log.scores.values() if 1 in v)


def test_evolution_stops_once_the_parent_is_good_enough():
    """A rung whose start is already the original model (KL 0, e.g. every group in the source's blocks) is not
    searched for its whole time; without `enough` the loop runs every generation."""
    space = _space()
    limits = {"max_file_mb": space.footprint(space.most_accurate()).file_mb}
    start = space.most_accurate()

    def fitness(cands, windows):
        return [0.0 if space.key(c) == space.key(start) else 1.0 for c in cands]

    def run(enough):
        return evolve(start, lambda c, r: space.mutate(c, r, limits), fitness, space.key, [(1, 1)], 5, 2,
                      np.random.default_rng(0), enough=enough)
    best, log = run(1e-5)
    assert space.key(best) == space.key(start) and log.generations == 0 and len(log.scores) == 1
    assert run(None)[1].generations == 5


def test_evolution_finds_the_optimum_of_a_small_space():
    """Two layers, formats only (two levels per group), one limit: brute force over all 2^8 knows the answer."""
    import dataclasses
    import itertools

    info = dataclasses.replace(INFO, num_layers=2)
    recipe = parse_recipe({"name": "t", "budget": {"context": 128, "search": {
        "drop_attention": False, "bits": [4, 8], "block_sizes": [32], "table_bits": [8], "kv_precisions": ["fp32"]}}})
    space = build_space(info, recipe.budget.search, {}, 128)
    limits = {"max_file_mb": space.footprint(space.most_accurate()).file_mb * 0.85}
    weights = np.random.default_rng(3).uniform(0.5, 2, len(space.genes))

    def fitness(cands, windows):
        return [float(sum(w * lv for w, lv in zip(weights, c.levels))) for c in cands]
    everything = [dataclasses.replace(space.most_accurate(), levels=levels)
                  for levels in itertools.product(*(range(len(space.levels[g])) for g in space.genes))]
    optimum = min(fitness([c for c in everything if space.fits(c, limits)], 1))
    start = space.greedy(space.most_accurate(), limits, lambda c: 10 * sum(c.levels))  # a poor start
    best, _ = evolve(start, lambda c, r: space.mutate(c, r, limits), fitness, space.key, [(1, 2), (1, 1)], 200, 8,
                     np.random.default_rng(0))
    assert fitness([best], 1)[0] == pytest.approx(optimum) and space.fits(best, limits)


def test_frontier_keeps_points_nothing_beats():
    pts = [(10, 5.0), (12, 4.0), (11, 6.0), (15, 4.0), (20, 1.0), (9, 9.0)]
    assert frontier(pts) == [5, 0, 1, 4]


def test_an_impossible_budget_names_the_smallest_reachable_file_and_the_field(tmp_path):
    recipe = parse_recipe({"name": "t", "model": {"source": "hf", "path": str(tmp_path)},
                           "budget": {"max_file_mb": 0.05, "context": 128}})
    problems = budget_problems(recipe, {recipe.model.key: INFO})
    assert len(problems) == 1
    msg = problems[0]
    assert msg.startswith("budget.max_file_mb: 0.05 MB is below the smallest file this search can reach")
    assert "(5 of 6 attention and 0 of 6 MLP sublayers dropped; groups 14 q4b128; table q4b128; KV fp16)" in msg
    assert "raise budget.max_file_mb to at least" in msg and "budget.search.drop_mlp: true" in msg
    ok = parse_recipe({"name": "t", "model": {"source": "hf", "path": str(tmp_path)},
                       "budget": {"max_file_mb": 10, "context": 128}})
    assert budget_problems(ok, {ok.model.key: INFO}) == []


def test_ladder_rungs_override_the_budget_field_by_field():
    recipe = parse_recipe({"name": "t", "budget": {"max_file_mb": 90, "max_memory_mb": 300, "ladder": [
        {"name": "big", "max_file_mb": 120}, {"name": "small", "max_memory_mb": None}]}})
    rungs = dict(recipe.budget.rungs())
    assert rungs["big"].limits() == {"max_file_mb": 120, "max_memory_mb": 300}
    assert rungs["small"].limits() == {"max_file_mb": 90}
    with pytest.raises(Exception, match="keep must not grow"):
        parse_recipe({"name": "t", "budget": {"search": {"selection": [{"windows": 2, "keep": 1},
                                                                      {"windows": 1, "keep": 1}]}}})
