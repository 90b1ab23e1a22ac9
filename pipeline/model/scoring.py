"""Importance scoring: one forward pass over calibration windows scores every sublayer and block.

Score of a module = mean over non-padding tokens of 1 - cos(X, Y), accumulated in float64, where
attention: X = layer input, Y = X + Attn(Norm(X)); MLP: X = hidden state after attention,
Y = X + MLP(Norm(X)); block: layer input vs layer output (arXiv 2406.15786, residual included). Where a
sublayer has a norm after it (Gemma), Y = X + PostNorm(Attn(Norm(X))): what the residual stream receives.
"""

from __future__ import annotations

import numpy as np

from .adapters import adapter_for, decoder_layers
from ..artifacts import Scores


class _Accumulator:
    """Forward hooks on each decoder layer (and its attention) that add 1 - cos into running sums."""

    def __init__(self, model):
        import torch

        self.torch = torch
        ad = adapter_for(model.config)
        self.layers = decoder_layers(model)
        n = len(self.layers)
        self.sums = {k: torch.zeros(n, dtype=torch.float64) for k in ("attention", "mlp", "block")}
        self.tokens = 0
        self.mask = None
        self._x, self._attn_out = {}, {}
        self.has_mlp = [getattr(layer, ad.mlp) is not None for layer in self.layers]
        self.handles = []
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._post(i)))
            if getattr(layer, ad.attention) is not None:  # hook what is added to the residual stream
                added = getattr(layer, ad.attention_post_norm or ad.attention)
                self.handles.append(added.register_forward_hook(self._attn(i)))

    def _pre(self, i):
        def hook(module, args, kwargs):
            self._x[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _attn(self, i):
        def hook(module, args, output):
            self._attn_out[i] = output[0] if isinstance(output, tuple) else output
        return hook

    def _post(self, i):
        def hook(module, args, output):
            x = self._x.pop(i)
            y = output[0] if isinstance(output, tuple) else output
            attn_out = self._attn_out.pop(i, None)
            mid = x if attn_out is None else x + attn_out
            if attn_out is not None:
                self._add("attention", i, x, mid)
            if self.has_mlp[i]:
                self._add("mlp", i, mid, y)
            self._add("block", i, x, y)
        return hook

    def _add(self, kind, i, x, y):
        cos = self.torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
        self.sums[kind][i] += ((1.0 - cos.double()) * self.mask).sum()

    def close(self):
        for h in self.handles:
            h.remove()


def score_model(model, windows: np.ndarray, batch_size: int = 4, attention_mask: np.ndarray | None = None,
                name: str = "") -> Scores:
    """Score every sublayer of `model` on token windows [n, seq] in one pass (no gradients).

    A sublayer that is already absent scores 0 for that kind; padding tokens (mask 0) are excluded.
    """
    import torch

    mask_all = np.ones_like(windows) if attention_mask is None else attention_mask
    acc = _Accumulator(model)
    try:
        with torch.inference_mode():
            for start in range(0, len(windows), batch_size):
                ids = torch.from_numpy(windows[start:start + batch_size]).long()
                mask = torch.from_numpy(mask_all[start:start + batch_size]).long()
                acc.mask = mask.double()
                acc.tokens += int(mask.sum())
                model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        acc.close()
    mean = {k: (v / max(acc.tokens, 1)).tolist() for k, v in acc.sums.items()}
    return Scores(model=name, metric="cosine", tokens=acc.tokens, attention=tuple(mean["attention"]),
                  mlp=tuple(mean["mlp"]), block=tuple(mean["block"]))
