import numpy as np
import pytest

from conftest import tiny_config, tiny_model
from pipeline.model.adapters import ADAPTERS, adapter_for, decoder_layers
from pipeline.errors import ModelError
from pipeline.model.prune import drop_sublayers
from pipeline.model.scoring import score_model

TESTED = {"gemma3_text", "llama", "mistral", "qwen2", "qwen3"}


def test_every_adapter_has_a_tiny_model_test():
    assert set(ADAPTERS) == TESTED, "add the new architecture to TESTED and make the tests below pass for it"


@pytest.mark.parametrize("arch", sorted(TESTED))
def test_score_and_drop_each_architecture(arch):
    model = tiny_model(arch)
    scores = score_model(model, np.random.default_rng(0).integers(3, 256, (2, 16)))
    assert len(scores.attention) == len(decoder_layers(model)) == 4
    pruned = drop_sublayers(model, attention=[int(np.argmin(scores.attention))], mlp=[])
    assert sum(getattr(layer, adapter_for(model.config).attention) is None for layer in decoder_layers(pruned)) == 1


def test_unsupported_architecture_names_itself_and_the_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(ModelError, match=r"'gpt2' is not supported; supported: gemma3_text, llama, mistral, qwen2, qwen3"):
        adapter_for(GPT2Config())


def test_mixed_sliding_and_full_attention_refused():
    cfg = tiny_config("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2)
    with pytest.raises(ModelError, match="mixes attention kinds"):
        adapter_for(cfg)
