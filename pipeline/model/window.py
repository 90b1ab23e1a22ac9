"""Sliding-window attention for chosen layers: a converted layer attends to its last W tokens (itself included),
so its KV cache stops growing at W, plus a learned per-head sink.

Why the sink: in a small model many heads park attention on the first token of the text (SmolLM2-135M, keys at
least 512 back: 30-62 % of a deep layer's attention, nearly all of it on token 0). A window cuts that token off
and the head's output changes. A sink logit per head (gpt-oss style, GroupQueryAttention's `head_sink` input)
adds exp(sink) to the softmax denominator with no value, which scales the head's output by sigmoid(lse - sink):
what parking on a near-empty value vector did. `measure_windows` fits each head's sink on calibration text (the
scale that best matches the full-attention output, by grid search) and reports, per layer, the relative error
that remains; the plan converts the layers where it is smallest.

In PyTorch a converted layer gets a mask-narrowing pre-hook and its own attention function (registered with
transformers' AttentionInterface); the conversion is recorded in config.json so a saved folder reloads converted.
"""

from __future__ import annotations

import copy

import numpy as np

from .adapters import adapter_for, decoder_layers

CONFIG_KEY = "slimformer_window"  # {"layers": [...], "size": W, "sinks": {layer: [logit per head]}}
ATTENTION = "slimformer_window"
KL_WINDOWS = 2  # of the calibration windows, those that rank the layers (one forward pass per layer each)
SINK_GRID = np.linspace(-10.0, 30.0, 161)  # candidate sink logits; -10 is no sink for any score above -5


def window_of(attention) -> int | None:
    """The window an attention module was converted to (or natively has), if any."""
    return getattr(attention, "_slimformer_window", None) or getattr(attention, "sliding_window", None)


def sink_of(attention):
    """The per-head sink logits of a converted attention module (a float32 array), or None."""
    sink = getattr(attention, "_slimformer_sink", None)
    return None if sink is None else sink.detach().float().numpy()


def _narrow(module, args, kwargs):
    """Pre-hook: intersect the attention mask with the window (keys at most W - 1 positions back)."""
    import torch

    size, mask, positions = module._slimformer_window, kwargs.get("attention_mask"), kwargs.get("cache_position")
    if positions is None:
        raise ValueError("a windowed attention layer needs cache_position to place its window")
    keys = mask.shape[-1] if mask is not None else int(positions[-1]) + 1
    k = torch.arange(keys, device=positions.device)[None, :]
    q = positions[:, None]
    allowed = (k <= q) & (k > q - size)  # [q, keys]
    if mask is None:
        mask = allowed[None, None]
    elif mask.dtype == torch.bool:
        mask = mask & allowed
    else:
        mask = mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)
    return args, {**kwargs, "attention_mask": mask}


def _eager(query, key, value, attention_mask, scaling, sink=None):
    """(output [batch, q, heads, d], probabilities): attention over a boolean or additive mask (causal when
    None), with grouped KV heads, and a per-head sink logit counted in the softmax when given."""
    import torch

    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is None:
        q, k = scores.shape[-2:]
        attention_mask = torch.ones(q, k, dtype=torch.bool).tril(k - q)
    mask = attention_mask[..., :key.shape[-2]]
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if sink is not None:
        column = sink.to(scores.dtype)[None, :, None, None].expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, column], -1).float(), -1)[..., :-1].to(query.dtype)
    else:
        probs = torch.softmax(scores.float(), -1).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _windowed_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The attention function of converted layers: eager, with the layer's sink (the mask already has the window)."""
    return _eager(query, key, value, attention_mask, scaling, module._slimformer_sink)


def _register_attention():
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, _windowed_attention)


def set_windows_inplace(model, layers: list[int], size: int, sinks: dict[int, list[float]] | None = None):
    """Convert the attention of `layers` (original layer indices, attention kept) to a window of `size` tokens,
    with the given per-head sink logits (none: no sink, the plain window)."""
    import torch

    _register_attention()
    ad = adapter_for(model.config)
    all_layers = decoder_layers(model)
    sinks = {int(k): v for k, v in (sinks or {}).items()}
    for i in layers:
        attn = getattr(all_layers[i], ad.attention)
        if attn is None:
            raise ValueError(f"layer {i} has no attention (dropped): it cannot be given a window")
        if getattr(attn, "_slimformer_window", None) is None:
            attn.register_forward_pre_hook(_narrow, with_kwargs=True)
        attn._slimformer_window = int(size)
        if i in sinks:
            attn._slimformer_sink = torch.tensor(sinks[i], dtype=torch.float32)
            attn.config = copy.copy(attn.config)  # this layer alone computes attention with its sink
            attn.config._attn_implementation = ATTENTION
    setattr(model.config, CONFIG_KEY, {"layers": sorted(int(i) for i in layers), "size": int(size),
                                       "sinks": {str(i): list(map(float, sinks[i])) for i in sorted(sinks)}})
    return model


def restore_windows_inplace(model):
    """After loading a converted folder, convert the recorded layers again (hooks are not saved)."""
    recorded = getattr(model.config, CONFIG_KEY, None)
    if recorded and recorded.get("layers"):
        set_windows_inplace(model, recorded["layers"], recorded["size"], recorded.get("sinks"))
    return model


def measure_windows(model, windows: np.ndarray, size: int) -> tuple[list[float], dict[int, list[float]]]:
    """(per layer: KL divergence of the model's next-token distribution from the original's when that layer
    alone is windowed with its fitted sinks, inf where attention was dropped; per layer: the sinks). What the
    plan ranks by: a layer's own output error says little about how much the rest of the model leans on it."""
    _, sinks = fit_sinks(model, windows, size)
    return window_kl(model, windows[:KL_WINDOWS], size, sinks), sinks


def window_kl(model, windows: np.ndarray, size: int, sinks: dict[int, list[float]]) -> list[float]:
    """Per layer: mean KL(original || windowed) over the windows' positions, that layer alone converted."""
    import torch

    from ..console import progress

    ids = torch.from_numpy(np.asarray(windows)).long()

    def log_probs(m):
        with torch.inference_mode():
            return torch.log_softmax(m(input_ids=ids, use_cache=False).logits.float(), -1)

    reference = log_probs(model)
    probs = reference.exp()
    ad = adapter_for(model.config)
    kl = []
    for i, layer in enumerate(progress(decoder_layers(model), desc="window KL per layer")):
        if getattr(layer, ad.attention) is None:
            kl.append(float("inf"))
            continue
        converted = set_windows_inplace(copy.deepcopy(model), [i], size, {i: sinks[i]})
        kl.append(float((probs * (reference - log_probs(converted))).sum(-1).mean()))
    return kl


def fit_sinks(model, windows: np.ndarray, size: int) -> tuple[list[float], dict[int, list[float]]]:
    """(per layer: relative error |a o_w - o_f|^2 / |o_f|^2 of its attention output when windowed with the
    fitted sinks, 0 for dropped attention; per layer: the fitted sink logit of each head). One eager pass over
    `windows` (each longer than `size`). A sink scales the windowed output o_w by a = sigmoid(lse_w - sink); the
    full softmax gives the window's keys the mass m = exp(lse_w - lse_full). Each head's sink is the one whose
    a best matches m over every query (the first W queries too: they lose nothing to the window, but the sink
    scales them all the same). Matching the mass, not the output by least squares, which shrinks a wherever
    o_w and o_f point apart and so over-fits sinks that cost accuracy at longer contexts."""
    import torch

    ad = adapter_for(model.config)
    layers = decoder_layers(model)
    stats = {}  # layer -> [heads, grid] mass errors, [heads, grid] output errors, the full outputs' energy

    def record(i):
        def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
            out, probs = _eager(query, key, value, attention_mask, scaling)
            _accumulate(stats, i, query, key, value, scaling, size, out)
            return out, probs
        return attention

    attentions = [(i, getattr(layer, ad.attention)) for i, layer in enumerate(layers)
                  if getattr(layer, ad.attention) is not None]
    saved = [(attn, attn.config) for _, attn in attentions]
    from transformers import AttentionInterface

    try:
        for i, attn in attentions:
            AttentionInterface.register(f"{ATTENTION}_measure_{i}", record(i))
            attn.config = copy.copy(attn.config)
            attn.config._attn_implementation = f"{ATTENTION}_measure_{i}"
        with torch.inference_mode():
            for window in windows:
                model(input_ids=torch.from_numpy(window[None]).long(), use_cache=False)
    finally:
        for attn, config in saved:
            attn.config = config
    errors, sinks = [0.0] * len(layers), {}
    for i, (mass, err, energy) in stats.items():
        best = mass.argmin(-1)  # per head
        sinks[i] = SINK_GRID[best].tolist()
        errors[i] = float(err[np.arange(len(best)), best].sum() / energy)
    return errors, sinks


def _accumulate(stats, i, query, key, value, scaling, size, full_out):
    """Add one window's squared errors for every head and candidate sink to stats[i]."""
    import torch

    groups = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(groups, 1).float(), value.repeat_interleave(groups, 1).float()
    scores = torch.matmul(query.float(), k.transpose(2, 3)) * scaling  # [1, heads, q, k]
    seq = scores.shape[-1]
    q_idx, k_idx = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    inside = (k_idx <= q_idx) & (k_idx > q_idx - size)
    lse_full = torch.logsumexp(scores.masked_fill(k_idx > q_idx, float("-inf")), -1)  # [1, heads, q]
    scores = scores.masked_fill(~inside, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    windowed = torch.matmul(torch.softmax(scores, -1), v)[0]  # [heads, q, d]
    full = full_out.float().transpose(1, 2)[0]  # [heads, q, d]
    ww, wf, ff = (windowed * windowed).sum(-1), (windowed * full).sum(-1), (full * full).sum(-1)
    a = torch.sigmoid(lse[0][..., None] - torch.from_numpy(SINK_GRID).float())  # [heads, q, grid]
    err = (a * a * ww[..., None] - 2 * a * wf[..., None] + ff[..., None]).sum(1).double().numpy()
    mass = ((a - torch.exp(lse - lse_full)[0][..., None]) ** 2).sum(1).double().numpy()
    before = stats.get(i, (0.0, 0.0, 0.0))
    stats[i] = (before[0] + mass, before[1] + err, before[2] + float(ff.sum()))
