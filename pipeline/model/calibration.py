"""What quantisation learns from calibration text: each linear group's input Hessian (for GPTQ), the model
with weights fake-quantised exactly as the ONNX file holds them, and each group's sensitivity (KL divergence
from the unquantised model when that group alone is quantised), which picks the groups that stay at 8 bits.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from .adapters import adapter_for, get_path
from .groups import linear_groups
from .int8_inputs import Int8Inputs


def input_hessians(model, windows: np.ndarray, batch_size: int = 4) -> dict[str, np.ndarray]:
    """Group -> X^T X of the group's input over every calibration token (float64 [K, K]); fused groups share
    their input, so it is read at the first member."""
    import torch

    groups = linear_groups(model)
    sums = {name: None for name in groups}
    handles = []
    for name, members in groups.items():
        module = members[0][1]
        if isinstance(module, torch.nn.Embedding):  # a lookup has no input; a tied table's is the final hidden
            if "lm_head" in groups:
                continue
            module = get_path(model, adapter_for(model.config).lm_head)

        def hook(mod, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = x.T @ x if sums[name] is None else sums[name] + x.T @ x
        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for start in range(0, len(windows), batch_size):
                model(input_ids=torch.from_numpy(windows[start:start + batch_size]).long(), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: s.numpy() for name, s in sums.items() if s is not None}


@contextmanager
def fake_quantized(model, quantizer, names=None, int8_inputs: bool = False):
    """`model` with the weights of the groups in `names` (all by default) replaced, for the duration, by what
    the quantised ONNX file computes with (`quantizer(...).dequantize()`), and with `int8_inputs` their inputs
    rounded as MatMulNBits does at accuracy level 4; restored afterwards."""
    import torch

    saved, inputs = [], Int8Inputs(model) if int8_inputs else None
    try:
        with torch.no_grad():
            for name, members in linear_groups(model).items():
                if names is not None and name not in names:
                    continue
                weights = [m.weight.detach().float().numpy() for _, m in members]
                q = quantizer(name, weights, [p for p, _ in members])
                if q is None:
                    continue
                if inputs is not None:
                    inputs.set(name, q)
                rows = np.cumsum([0, *(w.shape[0] for w in weights)])
                full = q.dequantize()
                for (_, module), a, b in zip(members, rows[:-1], rows[1:]):
                    saved.append((module, module.weight.detach().clone()))
                    module.weight.copy_(torch.from_numpy(full[a:b]).to(module.weight.dtype))
        yield model
    finally:
        if inputs is not None:
            inputs.close()
        with torch.no_grad():
            for module, weight in reversed(saved):
                module.weight.copy_(weight)


def mean_kl(model, reference_logprobs, windows: np.ndarray, batch_size: int = 4) -> float:
    """Mean over tokens of KL(reference || model) for next-token distributions on `windows`."""
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(windows), batch_size):
            ids = torch.from_numpy(windows[start:start + batch_size]).long()
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
            ref = reference_logprobs[start:start + batch_size]
            total += float((ref.exp() * (ref - logp)).sum())
            count += ids.numel()
    return total / count


def reference_logprobs(model, windows: np.ndarray, batch_size: int = 4):
    import torch

    with torch.inference_mode():
        return torch.cat([torch.log_softmax(model(input_ids=torch.from_numpy(windows[s:s + batch_size]).long(),
                                                  use_cache=False).logits.float(), -1)
                          for s in range(0, len(windows), batch_size)])


def group_sensitivity(model, quantizer, windows: np.ndarray, names=None, progress=None) -> dict[str, float]:
    """Group -> KL from the unquantised model when only that group is quantised by `quantizer`."""
    reference = reference_logprobs(model, windows)
    names = list(names if names is not None else linear_groups(model))
    result = {}
    for name in (progress(names, desc="sensitivity") if progress else names):
        with fake_quantized(model, quantizer, {name}):
            result[name] = mean_kl(model, reference, windows)
    return result
