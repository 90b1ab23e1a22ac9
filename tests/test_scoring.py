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


def test_gemma3_scores_take_the_post_norm_inside_the_residual():
    # Gemma 3: attention Y = X + PostNorm(Attn(PreNorm(X))), MLP likewise with its own pre and post norms
    model = tiny_model("gemma3_text")
    with torch.no_grad():  # post norms start at zero weight (scale 1); make them matter
        for layer in model.model.layers:
            for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm):
                norm.weight.uniform_(-0.9, 2.0)
    windows = np.random.default_rng(0).integers(3, 256, (2, 12))
    scores = score_model(model, windows)
    cos = torch.nn.functional.cosine_similarity
    ids = torch.from_numpy(windows)
    want = {"attention": [], "mlp": []}
    with torch.no_grad():
        x = model.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1])[None]
        ropes = {"full_attention": model.model.rotary_emb(x, pos),
                 "sliding_attention": model.model.rotary_emb_local(x, pos)}
        causal = torch.full((12, 12), float("-inf")).triu(1)
        window = torch.minimum(causal, torch.full((12, 12), float("-inf")).tril(-4))  # sees itself and 3 before
        masks = {"full_attention": causal, "sliding_attention": window}
        for layer in model.model.layers:
            mask = masks[layer.attention_type]
            attn = layer.self_attn(hidden_states=layer.input_layernorm(x), attention_mask=mask[None, None],
                                   position_embeddings=ropes[layer.attention_type])[0]
            a = x + layer.post_attention_layernorm(attn)
            y = a + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(a)))
            want["attention"].append((1 - cos(x, a, dim=-1)).mean().item())
            want["mlp"].append((1 - cos(a, y, dim=-1)).mean().item())
            x = y
    assert scores.attention == pytest.approx(want["attention"], rel=1e-4, abs=1e-6)
    assert scores.mlp == pytest.approx(want["mlp"], rel=1e-4, abs=1e-6)
