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
