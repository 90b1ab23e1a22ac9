import numpy as np
import pytest
import torch

from conftest import tiny_model
from pipeline.model.prune import drop_sublayers
from pipeline.model.scoring import score_model


def manual_scores(model, ids):
    """1 - cos for each sublayer, recomputed by calling the layer's parts directly."""
    cos = torch.nn.functional.cosine_similarity
    x = model.model.embed_tokens(ids)
    pe = model.model.rotary_emb(x, torch.arange(ids.shape[1])[None])
    out = {"attention": [], "mlp": [], "block": []}
    for layer in model.model.layers:
        a = x + layer.self_attn(hidden_states=layer.input_layernorm(x), attention_mask=None,
                                position_embeddings=pe)[0]
        y = a + layer.mlp(layer.post_attention_layernorm(a))
        for kind, (u, v) in {"attention": (x, a), "mlp": (a, y), "block": (x, y)}.items():
            out[kind].append((1 - cos(u, v, dim=-1)).mean().item())
        x = y
    return out


def test_scores_match_direct_computation():
    model = tiny_model("llama")
    windows = np.random.default_rng(0).integers(3, 256, (6, 24))
    scores = score_model(model, windows, batch_size=4)
    with torch.no_grad():
        ref = manual_scores(model, torch.from_numpy(windows))
    for kind in ("attention", "mlp", "block"):
        assert getattr(scores, kind) == pytest.approx(ref[kind], rel=1e-4, abs=1e-6)
    assert scores.tokens == 6 * 24
    assert len(set(np.round(scores.attention, 4))) == 4  # the layers are distinguishable


def test_padding_tokens_are_excluded():
    model = tiny_model("llama")
    windows = np.random.default_rng(1).integers(3, 256, (2, 16))
    mask = np.ones_like(windows)
    mask[1, 10:] = 0  # right padding: causal attention keeps real tokens unaffected
    combined = score_model(model, windows, attention_mask=mask)
    full = score_model(model, windows[:1])
    short = score_model(model, windows[1:, :10])
    assert combined.tokens == 26
    for kind in ("attention", "mlp", "block"):
        expected = (16 * np.array(getattr(full, kind)) + 10 * np.array(getattr(short, kind))) / 26
        assert np.allclose(getattr(combined, kind), expected, rtol=1e-4)


def test_absent_sublayers_score_zero():
    model = drop_sublayers(tiny_model("mistral"), attention=[1], mlp=[2])
    scores = score_model(model, np.random.default_rng(0).integers(3, 256, (2, 12)))
    assert scores.attention[1] == 0 and scores.mlp[2] == 0
    assert all(s > 0 for i, s in enumerate(scores.attention) if i != 1)
