"""Head analysis on tiny models: importance equals the measured effect of zeroing a head (or a KV group) on the
residual stream, attention figures equal those computed from eager attention probabilities, one pass leaves the
model's attention kernel as it was, and pruned models are analysed in their own shapes."""

import numpy as np
import pytest
import torch

from conftest import tiny_model
from pipeline.artifacts import HeadScores
from pipeline.model.heads import score_heads
from pipeline.model.prune import drop_sublayers
from pipeline.model.prune_heads import prune_heads
from test_prune_heads import zeroed

WINDOWS = np.random.default_rng(0).integers(3, 256, (3, 20))


@pytest.fixture(scope="module")
def model_and_scores():
    model = tiny_model("qwen3")
    return model, score_heads(model, WINDOWS, batch_size=2, name="tiny")


def residual_after_attention(model, layer: int) -> np.ndarray:
    """X + Attn(Norm(X)) of one layer over WINDOWS, float64 [tokens, hidden]."""
    seen = {}
    lay = model.model.layers[layer]
    h1 = lay.register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0] if a else k["hidden_states"]),
                                       with_kwargs=True)
    h2 = lay.self_attn.register_forward_hook(lambda m, a, out: seen.update(o=out[0]))
    with torch.no_grad():
        model(input_ids=torch.from_numpy(WINDOWS), use_cache=False)
    h1.remove(), h2.remove()
    return (seen["x"].double() + seen["o"].double()).reshape(-1, seen["x"].shape[-1]).numpy()


def one_minus_cos(a, b):
    return float(np.mean(1 - (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)))


@pytest.mark.parametrize("layer, head", [(0, 0), (2, 3), (3, 1)])
def test_importance_is_the_effect_of_zeroing_the_head(model_and_scores, layer, head):
    model, scores = model_and_scores
    want = one_minus_cos(residual_after_attention(model, layer),
                         residual_after_attention(zeroed(model, {layer: [head]}), layer))
    assert scores.importance[layer][head] == pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("layer, group", [(1, 0), (3, 1)])
def test_group_importance_zeroes_every_query_head_of_the_group(model_and_scores, layer, group):
    model, scores = model_and_scores
    want = one_minus_cos(residual_after_attention(model, layer),
                         residual_after_attention(zeroed(model, {layer: [2 * group, 2 * group + 1]}), layer))
    assert scores.group_importance[layer][group] == pytest.approx(want, rel=1e-3)


def test_attention_figures_match_eager_probabilities(model_and_scores):
    model, scores = model_and_scores
    eager = tiny_model("qwen3", attn_implementation="eager")
    with torch.no_grad():
        probs = eager(input_ids=torch.from_numpy(WINDOWS), output_attentions=True).attentions
    t = WINDOWS.shape[1]
    back = np.clip(np.arange(t)[:, None] - np.arange(t)[None, :], 0, None)
    for layer, p in enumerate(probs):
        p = p.double().numpy()  # [batch, heads, query, key]
        off_sink = p[..., 1:]  # the first token's share is `sink`; distance is over the rest
        np.testing.assert_allclose(scores.distance[layer], (off_sink * back[:, 1:]).sum((0, 2, 3)) / off_sink.sum(
            (0, 2, 3)), rtol=1e-4)
        entropy = -(p * np.log(np.where(p > 0, p, 1))).sum(-1).mean((0, 2))
        np.testing.assert_allclose(scores.entropy[layer], entropy, rtol=1e-4)
        np.testing.assert_allclose(scores.sink[layer], p[..., 0].mean((0, 2)), rtol=1e-4)
    assert scores.tokens == WINDOWS.size and scores.seq_len == t


def test_similarity_is_a_cosine_matrix_and_kernel_is_restored(model_and_scores):
    model, scores = model_and_scores
    for layer in scores.similarity:
        m = np.array(layer)
        np.testing.assert_allclose(np.diag(m), 1, rtol=1e-5)
        np.testing.assert_allclose(m, m.T, atol=1e-6)
        assert (np.abs(m) <= 1 + 1e-6).all()
    assert scores.redundancy[0][0] == max(scores.similarity[0][0][1:])
    assert model.config._attn_implementation == "sdpa"


def test_pruned_models_are_analysed_in_their_own_shapes():
    model = prune_heads(drop_sublayers(tiny_model("llama"), attention=[2], mlp=[]), {1: [0]})
    scores = score_heads(model, WINDOWS, batch_size=3)
    assert [len(h) for h in scores.importance] == [4, 2, 0, 4]
    assert [len(g) for g in scores.group_importance] == [2, 1, 0, 2]
    assert scores.similarity[2] == ()


def test_head_scores_round_trip(tmp_path, model_and_scores):
    _, scores = model_and_scores
    scores.write(tmp_path)
    assert HeadScores.read(tmp_path) == scores
