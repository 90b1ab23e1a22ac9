"""A PyTorch model behind the same `forward`/`empty_past` interface as `ort_runner.OnnxLM`.

So perplexity, multiple choice and greedy traces have one implementation (in ort_runner) that measures a
PyTorch model and an ONNX file the same way; healing and the benches use `torch_accuracy` to skip exports.
"""

from __future__ import annotations

import numpy as np

from ..artifacts import Accuracy
from ..model.prune import kept_attention_layers


class TorchLM:
    takes_positions = True  # transformers models accept position_ids, so padded batches run as they are

    def __init__(self, model):
        self.model = model.eval()
        self.kv_layers = len(kept_attention_layers(model))
        self.vocab_size = model.config.vocab_size
        self.past_names = [f"past_key_values.{i}.{kind}" for i in range(self.kv_layers) for kind in ("key", "value")]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {}

    def forward(self, input_ids, attention_mask, position_ids, past):
        import torch
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.kv_layers if past else 0):
            cache.update(torch.from_numpy(np.ascontiguousarray(past[f"past_key_values.{i}.key"])),
                         torch.from_numpy(np.ascontiguousarray(past[f"past_key_values.{i}.value"])), i)
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor(np.asarray(input_ids), dtype=torch.long),
                             attention_mask=torch.tensor(np.asarray(attention_mask), dtype=torch.long),
                             position_ids=torch.tensor(np.asarray(position_ids), dtype=torch.long),
                             past_key_values=cache, use_cache=True)
        present = {}
        for i, layer in enumerate(out.past_key_values.layers[: self.kv_layers]):
            present[f"past_key_values.{i}.key"] = layer.keys.numpy()
            present[f"past_key_values.{i}.value"] = layer.values.numpy()
        return out.logits.float().numpy(), present


def torch_accuracy(model, data) -> Accuracy:
    """Held-out perplexity and multiple-choice accuracy of a PyTorch model on `data` (a validate.EvalData)."""
    from .ort_runner import multiple_choice, perplexity

    lm = TorchLM(model)
    return Accuracy(perplexity=perplexity(lm, data.windows)["perplexity"],
                    mc_accuracy=multiple_choice(lm, data.mc_items)["accuracy"])
