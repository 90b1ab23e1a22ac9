import pytest

from pipeline.artifacts import DropPlan, Scores
from pipeline.model.plan import kv_bytes_per_token, plan_drop

SCORES = Scores(model="m", metric="cosine", tokens=10,
                attention=(0.9, 0.05, 0.02, 0.01), mlp=(0.5, 0.04, 0.3, 0.2), block=(0.95, 0.3, 0.35, 0.2))


def test_attention_drop_takes_lowest():
    plan = plan_drop(SCORES, attention=2)
    assert plan.attention == (2, 3) and plan.mlp == () and plan.method == "attention"
    assert plan.kept_attention == 2


def test_joint_ranks_kinds_together():
    plan = plan_drop(SCORES, joint=4)
    assert plan.attention == (1, 2, 3) and plan.mlp == (1,)
    assert [o[:2] for o in plan.order] == [("attention", 3), ("attention", 2), ("mlp", 1), ("attention", 1)]


def test_blocks_drop_both_sublayers():
    plan = plan_drop(SCORES, blocks=1)
    assert plan.attention == (3,) and plan.mlp == (3,) and plan.method == "blocks"


def test_per_kind_counts_combine():
    plan = plan_drop(SCORES, attention=1, mlp=1)
    assert plan.attention == (3,) and plan.mlp == (1,) and plan.method == "attention+mlp"


def test_ties_go_to_deeper_layer():
    tied = Scores(model="m", metric="cosine", tokens=1, attention=(0.1, 0.1, 0.1), mlp=(1, 1, 1), block=(1, 1, 1))
    assert plan_drop(tied, attention=1).attention == (2,)


def test_joint_never_drops_the_last_attention_sublayer():
    # 7 of 8 sublayers: the highest-scoring attention (layer 0, 0.9) would be among them; it stays, and the
    # highest-scoring MLP goes instead, so every joint count up to 2L-1 gives an exportable model.
    plan = plan_drop(SCORES, joint=7)
    assert plan.attention == (1, 2, 3) and plan.mlp == (0, 1, 2, 3)
    assert plan.kept_attention == 1


def test_refuses_counts_that_leave_nothing():
    from pipeline.errors import RecipeError

    for counts in ({"attention": 4}, {"mlp": 4}, {"blocks": 4}, {"joint": 8}):
        with pytest.raises(RecipeError, match="at least one of each kind must stay"):
            plan_drop(SCORES, **counts)


def test_artifacts_round_trip(tmp_path):
    plan = plan_drop(SCORES, joint=3)
    plan.write(tmp_path)
    SCORES.write(tmp_path)
    assert DropPlan.read(tmp_path) == plan
    assert Scores.read(tmp_path) == SCORES


def test_kv_bytes():
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, fp32 -> 46080 bytes per token
    assert kv_bytes_per_token(30, 3, 64) == 46080
    assert kv_bytes_per_token(26, 3, 64) == 46080 * 26 // 30


# ---------------------------------------------------------------- heads

def head_scores(groups, heads_per_group: int = 2) -> "HeadScores":
    """HeadScores whose group scores are `groups` ([layer][group]); per-head figures are placeholders."""
    from pipeline.artifacts import HeadScores

    heads = tuple(tuple(0.0 for _ in range(len(g) * heads_per_group)) for g in groups)
    return HeadScores(model="m", metric="cosine", tokens=1, seq_len=8, importance=heads,
                      group_importance=tuple(map(tuple, groups)), distance=heads, entropy=heads, sink=heads,
                      similarity=tuple(() for _ in groups))


GROUPS = [(0.5, 0.01), (0.02, 0.03), (0.04, 0.6), (0.001, 0.002)]


def test_global_head_drop_takes_lowest_groups_and_keeps_one_per_layer():
    from pipeline.model.plan import plan_heads

    plan = plan_heads(head_scores(GROUPS), heads=3)
    # layer 3's two groups are the two lowest, but one must stay: the next lowest (layer 0, group 1) goes instead
    assert plan.kv_groups == {0: (1,), 1: (0,), 3: (0,)} and plan.method == "global"
    assert [u[:2] for u in plan.order] == [(3, 0), (0, 1), (1, 0)]
    assert plan.kv_heads == (1, 1, 2, 1) and plan.removed_groups == 3


def test_head_drop_skips_layers_whose_attention_is_dropped():
    from pipeline.model.plan import plan_heads

    plan = plan_heads(head_scores(GROUPS), heads=2, dropped_attention=(3,))
    assert plan.kv_groups == {0: (1,), 1: (0,)} and plan.kv_heads == (1, 1, 2, 0)


def test_per_layer_heads_and_query_heads():
    from pipeline.model.plan import plan_heads

    plan = plan_heads(head_scores(GROUPS), heads={2: [0]}, query_heads={1: [0, 3]})
    assert plan.method == "per-layer" and plan.kv_groups == {2: (0,)} and plan.query_heads == {1: (0, 3)}
    assert plan.kv_heads == (2, 2, 1, 2) and plan.removed_query_heads == 2


def test_global_ranking_keeps_groups_even_where_query_heads_are_removed():
    from pipeline.model.plan import plan_heads

    # layer 0 also loses one query head per group; its group 0 can still go, leaving group 1 with one head
    plan = plan_heads(head_scores([(0.001, 0.9), (0.5, 0.6)]), heads=1, query_heads={0: [0, 3]})
    assert plan.kv_groups == {0: (0,)}


@pytest.mark.parametrize("heads, query, dropped, problem", [
    ({4: [0]}, {}, (), "layer 4 has no attention sublayer left"),
    ({3: [0]}, {}, (3,), "layer 3 has no attention sublayer left"),
    ({1: [0, 1]}, {}, (), "removes the attention sublayer"),
    ({}, {2: [0]}, (), "same number"),
    ({0: [2]}, {}, (), "out of range"),
    (7, {}, (), "7 KV groups requested but only 4 can go"),
])
def test_head_plan_problems_name_the_field(heads, query, dropped, problem):
    from pipeline.errors import RecipeError
    from pipeline.model.plan import plan_heads

    with pytest.raises(RecipeError, match=problem):
        plan_heads(head_scores(GROUPS), heads=heads, query_heads=query, dropped_attention=dropped)


def test_head_plan_round_trips(tmp_path):
    from pipeline.artifacts import HeadPlan
    from pipeline.model.plan import plan_heads

    plan = plan_heads(head_scores(GROUPS), heads=2, query_heads={2: [0, 2]})
    plan.write(tmp_path)
    assert HeadPlan.read(tmp_path) == plan
