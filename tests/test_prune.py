import pytest
import torch

from conftest import left_padded_batch, tiny_model
from pipeline.model.adapters import ADAPTERS
from pipeline.model.prune import (drop_lists, drop_sublayers, kept_attention_layers, kv_cache,
                                  restore_structure_inplace, slot_kinds)


def greedy_without_cache(model, ids, mask, steps):
    """Reference decode: recompute the whole sequence every step (no KV cache to get wrong)."""
    with torch.no_grad():
        for _ in range(steps):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_pruned_cached_decode_matches_recompute_on_left_padded_batch(arch):
    model = drop_sublayers(tiny_model(arch), attention=[0, 2], mlp=[3])
    ids, mask = left_padded_batch()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy_without_cache(model, ids, mask, 8))


def test_mixed_window_model_keeps_one_slot_per_kept_layer_and_decodes_like_recompute():
    # tiny Gemma 3: layers sliding, full, sliding, sliding (window 4); dropping attention 0 and 2 leaves
    # slots [full, sliding] where the config's first two kinds are [sliding, full]
    model = drop_sublayers(tiny_model("gemma3_text"), attention=[0, 2], mlp=[3])
    assert slot_kinds(model) == ["full_attention", "sliding_attention"]
    assert [model.model.layers[i].self_attn.layer_idx for i in kept_attention_layers(model)] == [0, 1]
    ids, mask = left_padded_batch()  # 9 tokens and 8 decode steps: well past the window
    want = greedy_without_cache(model, ids, mask, 8)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True)
    with torch.no_grad():
        default = model.generate(**kwargs)  # the cache transformers builds for this model
        windowed = model.generate(**kwargs, past_key_values=kv_cache(model), cache_implementation=None)
    for out in (default, windowed):
        assert torch.equal(out.sequences, want)
        assert len(out.past_key_values.layers) == 2  # no slot for a dropped layer
    assert windowed.past_key_values.layers[1].keys.shape[-2] == 3  # the sliding slot keeps window - 1
    assert windowed.past_key_values.layers[0].keys.shape[-2] == 16  # 9 prompt + 7 fed back


def test_dropped_sublayers_are_gone_and_kv_slots_renumbered():
    base = tiny_model("llama")
    model = drop_sublayers(base, attention=[1, 2], mlp=[0])
    keys = model.state_dict().keys()
    assert not any(k.startswith(("model.layers.1.self_attn", "model.layers.2.self_attn",
                                 "model.layers.1.input_layernorm", "model.layers.0.mlp",
                                 "model.layers.0.post_attention_layernorm")) for k in keys)
    assert [model.model.layers[i].self_attn.layer_idx for i in kept_attention_layers(model)] == [0, 1]
    assert kept_attention_layers(model) == [0, 3]
    assert drop_lists(model) == {"attention": [1, 2], "mlp": [0]}
    assert base.model.layers[1].self_attn is not None  # the input model is untouched
    n_base = sum(p.numel() for p in base.parameters())
    n_pruned = sum(p.numel() for p in model.parameters())
    attn = sum(p.numel() for p in base.model.layers[1].self_attn.parameters()) + 64
    mlp = sum(p.numel() for p in base.model.layers[0].mlp.parameters()) + 64
    assert n_base - n_pruned == 2 * attn + mlp


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_saved_pruned_folder_reloads_to_identical_logits(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model = drop_sublayers(tiny_model(arch), attention=[3], mlp=[1])
    model.save_pretrained(tmp_path)
    reloaded = restore_structure_inplace(AutoModelForCausalLM.from_pretrained(tmp_path)).eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           reloaded(input_ids=ids, attention_mask=mask).logits)


def test_pruning_after_hidden_state_capture_still_skips_sublayers():
    # transformers leaves a patched forward on layers after output_hidden_states=True
    base = tiny_model("llama")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        base(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        model = drop_sublayers(base, attention=[1], mlp=[])
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == 5


def test_pruning_is_incremental():
    model = drop_sublayers(drop_sublayers(tiny_model(), attention=[1], mlp=[]), attention=[2], mlp=[0])
    assert drop_lists(model) == {"attention": [1, 2], "mlp": [0]}
    assert [model.model.layers[i].self_attn.layer_idx for i in (0, 3)] == [0, 1]
