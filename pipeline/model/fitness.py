"""The budget search's only torch part: a prunable copy of the model that takes any `structure.Structure` (sublayers
set to None or restored, each group's weights replaced by exactly what the quantised ONNX file computes with,
its inputs rounded to int8 as MatMulNBits does at accuracy level 4 when asked, keys and values rounded to fp16
for an fp16 cache) and scores it by the KL divergence of its next-token distributions from the original model's
on calibration windows, or by perplexity on held-out windows.

Quantised weights are made once per (group, format) and kept (bounded); a change of structure rewrites only the
groups whose format changed. `sensitivities` measures, once, the KL of every single change the search can make.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Callable

import numpy as np

from .adapters import adapter_for, decoder_layers
from .structure import Format, Structure
from .groups import linear_groups
from .int8_inputs import Int8Inputs
from .prune import drop_sublayers_inplace

CACHE_BYTES = 1_500_000_000  # quantised weights kept for reuse (codes are one byte per weight)


class Evaluator:
    """`quantize(group, parts, params, fmt)` returns the group's BlockQuant in `fmt`; `windows` [n, seq] are the
    calibration windows the KL is measured on (the first `n` of them for a step of n windows)."""

    def __init__(self, model, windows: np.ndarray, quantize: Callable, batch_size: int = 2,
                 int8_inputs: bool = False):
        self.source, self.windows, self.quantize, self.batch = model, np.asarray(windows), quantize, batch_size
        self.model = drop_sublayers_inplace(copy.deepcopy(model), [], [])
        self.ad = adapter_for(model.config)
        self.layers = decoder_layers(self.model)
        self.parts = [{p: getattr(layer, p) for p in (*self.ad.attention_parts, *self.ad.mlp_parts)}
                      for layer in self.layers]
        self.groups, self.original = linear_groups(self.model), linear_groups(model)
        self.state: dict[str, Format | None] = {g: None for g in self.groups}
        self.cache: OrderedDict = OrderedDict()
        self.half_kv, self._reference = False, None
        self._hooks = self._kv_hooks()
        self.inputs = Int8Inputs(self.model) if int8_inputs else None  # MatMulNBits at accuracy level 4

    def _kv_hooks(self) -> list:
        hooks = []
        for parts in self.parts:
            attention = parts[self.ad.attention]
            for name in (self.ad.k_proj, self.ad.v_proj):
                hooks.append(getattr(attention, name).register_forward_hook(self._round_kv))
        return hooks

    def _round_kv(self, module, args, output):
        return output.half().float() if self.half_kv else output

    # ---------------------------------------------------------------- structures

    def quantized(self, group: str, fmt: Format):
        key = (group, fmt)
        if key not in self.cache:
            members = self.original[group]
            parts = [m.weight.detach().float().numpy() for _, m in members]
            self.cache[key] = self.quantize(group, parts, [p for p, _ in members], fmt)
            while sum(q.codes.nbytes for q in self.cache.values()) > CACHE_BYTES and len(self.cache) > 1:
                self.cache.popitem(last=False)
        self.cache.move_to_end(key)
        return self.cache[key]

    def apply(self, s: Structure) -> None:
        """Make the model compute as the structure's file would (weights exactly; fp16 KV approximately)."""
        import torch

        for i, layer in enumerate(self.layers):
            for names, keep in ((self.ad.attention_parts, s.attention[i]), (self.ad.mlp_parts, s.mlp[i])):
                for name in names:
                    setattr(layer, name, self.parts[i][name] if keep else None)
        with torch.no_grad():
            for group, members in self.groups.items():
                fmt = s.formats.get(group) if s.keeps(group) else self.state[group]
                if fmt == self.state[group]:
                    continue
                q = None if fmt is None else self.quantized(group, fmt)
                full = None if q is None else torch.from_numpy(q.dequantize())
                start = 0
                for (_, module), (_, original) in zip(members, self.original[group]):
                    rows = module.weight.shape[0]
                    module.weight.copy_(original.weight if full is None else full[start:start + rows])
                    start += rows
                self.state[group] = fmt
                if self.inputs is not None:
                    self.inputs.set(group, q)
        self.half_kv = s.kv_dtype == "fp16"

    # ---------------------------------------------------------------- scores

    def _logprobs(self, model, ids: np.ndarray):
        import torch

        with torch.inference_mode():
            return torch.log_softmax(model(input_ids=torch.from_numpy(ids).long(), use_cache=False).logits.float(), -1)

    def reference(self):
        """The original model's next-token log-probabilities on every calibration window (fp16 when large)."""
        import torch

        if self._reference is None:
            big = self.windows.size * self.source.config.vocab_size * 4 > 512 * 2**20
            self._reference = torch.cat([self._logprobs(self.source, self.windows[s:s + self.batch]).to(
                torch.float16 if big else torch.float32) for s in range(0, len(self.windows), self.batch)])
        return self._reference

    def kl(self, s: Structure, windows: int) -> float:
        """Mean over tokens of KL(original || structure) on the first `windows` calibration windows."""
        self.apply(s)
        reference, total, count = self.reference(), 0.0, 0
        for start in range(0, windows, self.batch):
            ids = self.windows[start:min(start + self.batch, windows)]
            ref = reference[start:start + len(ids)].float()
            total += float((ref.exp() * (ref - self._logprobs(self.model, ids))).sum())
            count += ids.size
        return total / count

    def perplexity(self, s: Structure, windows: np.ndarray) -> float:
        """Held-out perplexity (mean next-token NLL over the windows, each scored alone), as ort_runner does."""
        import torch

        self.apply(s)
        total, count = 0.0, 0
        for start in range(0, len(windows), self.batch):
            ids = np.asarray(windows[start:start + self.batch])
            logp = self._logprobs(self.model, ids)[:, :-1]
            total -= float(logp.gather(-1, torch.from_numpy(ids[:, 1:]).long()[..., None]).sum())
            count += ids[:, 1:].size
        return float(np.exp(total / count))

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        if self.inputs is not None:
            self.inputs.close()


def input_second_moments(model, windows: np.ndarray, batch_size: int = 2) -> dict[str, np.ndarray]:
    """Group -> mean over calibration tokens of each input feature squared (the diagonal of the input Hessian);
    a tied table's input is the logits projection's."""
    import torch

    groups = linear_groups(model)
    sums, handles, count = {}, [], [0]
    for name, members in groups.items():
        module = members[0][1]
        if isinstance(module, torch.nn.Embedding):
            if "lm_head" in groups:
                continue
            module = model.get_output_embeddings()

        def hook(mod, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for start in range(0, len(windows), batch_size):
                ids = torch.from_numpy(windows[start:start + batch_size]).long()
                model(input_ids=ids, use_cache=False)
                count[0] += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return {name: (s / count[0]).numpy() for name, s in sums.items()}


def proxy_error(weight: np.ndarray, moments: np.ndarray, fmt: Format) -> float:
    """Expected squared output error per token of rounding `weight` [N, K] to `fmt`'s grid: per block, the
    uniform rounding noise step^2 / 12 times the summed input second moments of the block (0 for the source's own
    blocks, which are the weights exactly)."""
    if fmt.source:
        return 0.0
    n, k = weight.shape
    pad = -k % fmt.block_size
    w = np.pad(weight.astype(np.float64), ((0, 0), (0, pad))).reshape(n, -1, fmt.block_size)
    m = np.pad(moments.astype(np.float64), (0, pad)).reshape(-1, fmt.block_size).sum(-1)
    if fmt.grid == "symmetric":
        step = np.abs(w).max(-1) / 2 ** (fmt.bits - 1)
    else:
        step = (w.max(-1) - np.minimum(w.min(-1), 0 if fmt.grid == "asymmetric" else w.min(-1))) / (2 ** fmt.bits - 1)
    return float((step ** 2 / 12 * m).sum())
