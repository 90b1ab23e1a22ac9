"""The PyTorch side of ONNX parity: the same greedy trace as `ort_runner.greedy_trace`, and its comparison.

Both traces use one procedure (left-padded prefill with position_ids = cumsum(mask) - 1, then greedy steps
that feed back the argmax and extend the mask), so any difference is the exported graph's, not the driver's.
Error statistics follow ExecuTorch's terms: max abs, mean abs, SQNR, plus top-1 agreement.
"""

from __future__ import annotations

import math

import numpy as np

from ..artifacts import Parity


def torch_greedy_trace(model, input_ids, attention_mask, steps: int):
    """([batch, vocab] float32 last-position logits of the prefill and each step, tokens [batch, steps + 1])."""
    import torch
    from transformers import DynamicCache

    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # A config-less cache grows one slot per kept attention layer (pruned models renumber to 0..K-1);
    # a config-built one would size itself to every decoder layer.
    cache = DynamicCache()
    trace = []
    with torch.no_grad():
        for _ in range(steps + 1):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                        past_key_values=cache, use_cache=True)
            trace.append(out.logits[:, -1].float().numpy())
            cache = out.past_key_values
            ids = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            positions = mask.sum(-1, keepdim=True) - 1
    return trace, np.stack([t.argmax(-1) for t in trace], axis=1)


def compare_traces(reference: list[np.ndarray], candidate: list[np.ndarray]) -> Parity:
    """Error of candidate logits against reference logits over every (step, row) of two traces.

    `steps` counts the trace entries compared (the prefill is one); sqnr_db is inf for identical traces.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"traces differ in length: reference {len(reference)} steps, candidate {len(candidate)}")
    ref = np.stack(reference).astype(np.float64)
    cand = np.stack(candidate).astype(np.float64)
    if ref.shape != cand.shape:
        raise ValueError(f"trace shapes differ: reference {ref.shape}, candidate {cand.shape}")
    err = cand - ref
    noise = float(np.sum(err**2))
    sqnr = math.inf if noise == 0 else 10 * math.log10(float(np.sum(ref**2)) / noise)
    return Parity(max_abs_error=float(np.abs(err).max()), mean_abs_error=float(np.abs(err).mean()),
                  top1_agreement=float(np.mean(ref.argmax(-1) == cand.argmax(-1))), sqnr_db=sqnr,
                  steps=len(reference), batch=ref.shape[1], decode_steps=len(reference) - 1)
