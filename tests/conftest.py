"""Shared fixtures: tiny random models (2-4 layers, 64 wide) for every supported architecture."""

from __future__ import annotations

import pytest
import torch

TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    pad_token_id=0, bos_token_id=1, eos_token_id=None, tie_word_embeddings=True,
)


def tiny_config(model_type: str = "llama", **overrides):
    from transformers import AutoConfig

    kwargs = {**TINY, **overrides}
    if model_type in ("qwen3",):
        kwargs.setdefault("head_dim", 16)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    # Random init has near-identical layers; scale weights up so sublayers matter unequally.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(1.0 + torch.rand(()) * 4)
    return model.eval()


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


def left_padded_batch(vocab: int = 256, lengths=(9, 5, 7), pad_id: int = 0, seed: int = 0):
    """(input_ids, attention_mask) int64 tensors, left-padded to the longest length."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask
