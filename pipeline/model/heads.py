"""Head analysis: one pass over calibration windows measures every attention head's importance, where it looks
(first-token share, mean query-key distance of the rest, entropy) and how alike heads' outputs are (redundancy).

Importance is the paper's cosine form applied to a head: S_h = mean over tokens of 1 - cos(Y, Y_-h), where
Y = X + Attn(Norm(X)) is the residual stream after the sublayer and Y_-h is Y with head h's output zeroed (for a
KV group, every query head of the group zeroed). Zeroing all heads gives Y = X, the sublayer score, so head,
group and sublayer scores share one scale and rank together. Chosen over the loss change when a head is zeroed
because that needs a pass per unit (90 KV groups in SmolLM2-135M: 90 passes) or gradients through the whole
model (a backward pass, memory for activations); the cosine form needs one forward pass without labels and
measures exactly what pruning does to the sublayer's output. Attention probabilities come from eager attention
(switched on for the pass), whose kernel returns them; nothing is stored beyond running sums.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from ..artifacts import HeadScores
from .adapters import adapter_for, decoder_layers

METRIC = "cosine: 1 - cos(Y, Y with the head zeroed), Y = X + Attn(Norm(X))"


def _one_minus_cos(a, b):
    """1 - cos along the last axis as |a/|a| - b/|b||^2 / 2: no cancellation when a and b nearly agree, so
    float32 vectors give scores of 1e-6 to a few significant digits."""
    import torch

    diff = torch.nn.functional.normalize(a, dim=-1) - torch.nn.functional.normalize(b, dim=-1)
    return 0.5 * diff.pow(2).sum(-1)


class _LayerSums:
    """Running float64 sums for one attention layer with `heads` query heads in `groups` KV groups."""

    def __init__(self, heads: int, groups: int):
        import torch

        zeros = {"dtype": torch.float64}
        self.heads, self.groups = heads, groups
        self.importance = torch.zeros(heads, **zeros)
        self.group_importance = torch.zeros(groups, **zeros)
        # distance is summed over attention that skips the first token, weighted by that mass (`off_sink`)
        self.distance, self.off_sink, self.entropy, self.sink = (torch.zeros(heads, **zeros) for _ in range(4))
        self.gram = torch.zeros(heads, heads, **zeros)

    def add(self, x, out, contrib, probs, post, mask) -> None:
        """x, out: [n, d] sublayer input and output over n tokens; contrib: [h, n, d] each head's part of `out`;
        probs: [b, h, t, t]; post: the norm after the sublayer (or identity); mask: [b, t] float64."""
        h, n, d = contrib.shape
        weights = mask.reshape(n)
        y = x + post(out)
        self.importance += (_one_minus_cos(y, x + post(out - contrib)).double() * weights).sum(-1)
        per_group = contrib.reshape(self.groups, h // self.groups, n, d).sum(1)
        self.group_importance += (_one_minus_cos(y, x + post(out - per_group)).double() * weights).sum(-1)
        flat = (contrib * weights.to(contrib.dtype)[:, None]).reshape(h, n * d)  # mask is 0/1: one factor will do
        self.gram += (flat @ contrib.reshape(h, n * d).T).double()
        self._add_attention(probs, mask)

    def _add_attention(self, probs, mask) -> None:
        import torch

        t = probs.shape[-1]
        pos = torch.arange(t, dtype=probs.dtype)
        back = (pos[:, None] - pos[None, :]).clamp(min=0)  # query i looks j tokens back; causal: j <= i
        first = mask.argmax(-1)  # each row's first real token (left padding)
        weights = mask.unsqueeze(1)  # [b, 1, t]: queries that are real tokens
        sink = probs.gather(-1, first[:, None, None, None].expand(*probs.shape[:-1], 1))[..., 0]  # [b, h, t]
        to_first = (pos[None, :] - first[:, None].to(pos.dtype)).clamp(min=0)[:, None, :]  # [b, 1, t]
        # A sink is a no-op parked on the first token; its distance would only measure the query's position.
        self.distance += (((probs * back).sum(-1) - sink * to_first).double() * weights).sum((0, 2))
        self.off_sink += ((1 - sink).double() * weights).sum((0, 2))
        self.entropy += (-torch.special.xlogy(probs, probs).sum(-1).double() * weights).sum((0, 2))
        self.sink += (sink.double() * weights).sum((0, 2))

    def mean_distance(self):
        return self.distance / self.off_sink.clamp(min=1e-300)

    def similarity(self):
        norm = self.gram.diagonal().clamp(min=1e-300).sqrt()
        return self.gram / norm[:, None] / norm[None, :]


class _Recorder:
    """Hooks that feed `_LayerSums`: each decoder layer's input X, each o_proj's input (the heads' outputs
    side by side) and each attention module's output and probabilities."""

    def __init__(self, model):
        ad = adapter_for(model.config)
        self.mask, self.handles, self.sums, self._x, self._z = None, [], {}, {}, {}
        for i, layer in enumerate(decoder_layers(model)):
            attn = getattr(layer, ad.attention)
            if attn is None:
                continue
            o_proj = getattr(attn, ad.o_proj)
            self.sums[i] = _LayerSums(o_proj.in_features // attn.head_dim,
                                      getattr(attn, ad.k_proj).out_features // attn.head_dim)
            post = getattr(layer, ad.attention_post_norm) if ad.attention_post_norm else None
            self.handles += [layer.register_forward_pre_hook(self._keep(self._x, i), with_kwargs=True),
                             o_proj.register_forward_pre_hook(self._keep(self._z, i), with_kwargs=True),
                             attn.register_forward_hook(self._measure(i, o_proj, post))]

    @staticmethod
    def _keep(store, i):
        def hook(module, args, kwargs):
            store[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _measure(self, i, o_proj, post_norm):
        def hook(module, args, output):
            import torch

            out, probs = output[0], output[1]
            if probs is None:
                raise RuntimeError("the attention kernel returned no probabilities; head analysis needs eager "
                                   "attention")
            sums, z = self.sums[i], self._z.pop(i).float()
            d, hd = o_proj.out_features, z.shape[-1] // sums.heads
            # head h's part of the output: its slice of o_proj's input times its columns of o_proj's weight
            z = z.reshape(-1, sums.heads, hd).transpose(0, 1)  # [h, n, hd]
            w = o_proj.weight.float().reshape(d, sums.heads, hd).permute(1, 2, 0)  # [h, hd, d]
            contrib = torch.bmm(z, w)  # [h, n, d]
            post = (lambda t: t) if post_norm is None else (lambda t: post_norm(t).float())
            sums.add(self._x.pop(i).float().reshape(-1, d), out.float().reshape(-1, d), contrib, probs.float(), post,
                     self.mask)
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


@contextmanager
def _eager(model):
    """Eager attention for the duration (its kernel returns the probabilities); the previous kernel after."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def score_heads(model, windows: np.ndarray, batch_size: int = 4, attention_mask: np.ndarray | None = None,
                name: str = "") -> HeadScores:
    """Every head's figures over token windows [n, seq] in one pass (no gradients); padding (mask 0) is
    excluded as a query. Layers whose attention is dropped get empty lists."""
    import torch

    mask_all = np.ones_like(windows) if attention_mask is None else attention_mask
    rec, tokens = _Recorder(model), 0
    try:
        with torch.inference_mode(), _eager(model):
            for start in range(0, len(windows), batch_size):
                ids = torch.from_numpy(windows[start:start + batch_size]).long()
                mask = torch.from_numpy(mask_all[start:start + batch_size]).long()
                rec.mask = mask.double()
                tokens += int(mask.sum())
                model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        rec.close()
    return _scores(rec.sums, len(decoder_layers(model)), max(tokens, 1), windows.shape[1], name)


def _sig(value: float) -> float:
    return float(f"{value:.6g}")  # six significant digits: head scores span 1e-7 to 1e-1


def _scores(sums: dict, n_layers: int, tokens: int, seq_len: int, name: str) -> HeadScores:
    def per_layer(figure):
        return tuple(tuple(_sig(float(v)) for v in figure(sums[i])) if i in sums else () for i in range(n_layers))

    return HeadScores(model=name, metric=METRIC, tokens=tokens, seq_len=seq_len,
                      importance=per_layer(lambda s: s.importance / tokens),
                      group_importance=per_layer(lambda s: s.group_importance / tokens),
                      distance=per_layer(_LayerSums.mean_distance), entropy=per_layer(lambda s: s.entropy / tokens),
                      sink=per_layer(lambda s: s.sink / tokens),
                      similarity=tuple(tuple(tuple(_sig(float(v)) for v in row) for row in sums[i].similarity())
                                       if i in sums else () for i in range(n_layers)))
