"""Head pruning on tiny models: removing heads equals zeroing their output, KV shapes shrink, cached decode on a
left-padded batch matches recompute (eager and sdpa), and a saved folder reloads to identical logits."""

import pytest
import torch

from conftest import left_padded_batch, tiny_model
from pipeline.model.adapters import ADAPTERS
from pipeline.model.prune import drop_sublayers, restore_structure_inplace
from pipeline.config.checks import kept_after
from pipeline.model.prune_heads import kept_heads, kv_heads_per_layer, prune_heads, query_heads_per_layer
from test_prune import greedy_without_cache

# tiny models: 4 query heads, 2 KV heads of 16 -> groups {0: heads 0-1, 1: heads 2-3}
HEAD_DIM = 16


def zeroed(model, heads: dict[int, list[int]]):
    """A copy of `model` whose listed query heads contribute nothing (their o_proj columns are zero)."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for layer, hs in heads.items():
            o = out.model.layers[layer].self_attn.o_proj.weight
            for h in hs:
                o[:, h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0
    return out


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_pruning_equals_zeroing_the_removed_heads(arch):
    base = tiny_model(arch)
    ids, mask = left_padded_batch()
    # group 1 of layer 0 (query heads 2, 3), query head 0 of layer 2 together with head 2 (one per group)
    pruned = prune_heads(base, {0: [1]}, {2: [0, 2]})
    want = logits(zeroed(base, {0: [2, 3], 2: [0, 2]}), ids, mask)
    torch.testing.assert_close(logits(pruned, ids, mask), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits(prune_heads(base, {}), ids, mask), logits(base, ids, mask))


def test_projections_and_kv_cache_shrink():
    base = tiny_model("llama")
    pruned = prune_heads(base, {1: [0], 3: [1]}, {2: [1, 3]})
    attn = pruned.model.layers[1].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (32, 16, 16)
    assert attn.o_proj.in_features == 32 and attn.num_key_value_groups == 2
    assert kv_heads_per_layer(pruned) == [2, 1, 2, 1] and query_heads_per_layer(pruned) == [4, 2, 2, 2]
    assert pruned.model.layers[2].self_attn.num_key_value_groups == 1
    assert kept_heads(pruned) == {1: {"query": [2, 3], "kv": [1]}, 2: {"query": [0, 2], "kv": [0, 1]},
                                  3: {"query": [0, 1], "kv": [0]}}
    ids, mask = left_padded_batch()
    with torch.no_grad():
        cache = pruned(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    assert [layer.keys.shape[1] for layer in cache.layers] == [2, 1, 2, 1]
    assert [layer.values.shape[1] for layer in cache.layers] == [2, 1, 2, 1]
    n_removed = sum(p.numel() for p in base.parameters()) - sum(p.numel() for p in pruned.parameters())
    # per removed query head: a q_proj and an o_proj slice; per removed KV head: a k_proj and a v_proj slice
    assert n_removed == (2 + 2 + 2) * 2 * 64 * HEAD_DIM + 2 * 2 * 64 * HEAD_DIM
    assert base.model.layers[1].self_attn.q_proj.out_features == 64  # the input model is untouched


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_cached_decode_matches_recompute_on_left_padded_batch(arch, impl):
    model = tiny_model(arch, attn_implementation=impl)
    model = prune_heads(drop_sublayers(model, attention=[1], mlp=[]), {0: [0], 3: [1]}, {2: [0, 3]})
    ids, mask = left_padded_batch()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy_without_cache(model, ids, mask, 8))


def test_pruning_twice_composes_in_original_numbering():
    base = tiny_model("llama")
    once = prune_heads(prune_heads(base, {1: [0]}), {1: [], 2: [1]}, {1: [0]})
    assert kept_heads(once) == {1: {"query": [3], "kv": [1]}, 2: {"query": [0, 1], "kv": [0]}}
    ids, mask = left_padded_batch()
    torch.testing.assert_close(logits(once, ids, mask), logits(zeroed(base, {1: [0, 1, 2], 2: [2, 3]}), ids, mask),
                               rtol=1e-5, atol=1e-5)


def test_saved_head_pruned_folder_reloads_to_identical_logits(tmp_path):
    from pipeline.model.loading import load_hf_folder

    from conftest import byte_level_bpe, synthetic_text

    model = prune_heads(drop_sublayers(tiny_model("qwen3"), attention=[3], mlp=[1]), {0: [1]}, {2: [1, 2]})
    model.save_pretrained(tmp_path)
    byte_level_bpe([synthetic_text(0)]).save_pretrained(tmp_path)
    reloaded, _ = load_hf_folder(tmp_path)
    assert kept_heads(reloaded) == kept_heads(model) and kv_heads_per_layer(reloaded) == [1, 2, 2, 0]
    restore_structure_inplace(reloaded)  # idempotent: an already restored model stays as it is
    ids, mask = left_padded_batch()
    assert torch.equal(logits(model, ids, mask), logits(reloaded, ids, mask))


@pytest.mark.parametrize("groups, query, problem", [
    ([0, 1], [], "removes the attention sublayer"),
    ([], [0], "same number"),
    ([], [0, 1], "same number"),
    ([2], [], "out of range"),
    ([], [4], "out of range"),
])
def test_uneven_or_empty_groups_are_refused(groups, query, problem):
    with pytest.raises(ValueError, match=problem):
        kept_after(4, 2, groups, query)
    with pytest.raises(ValueError, match=f"layer 1: .*{problem}"):
        prune_heads(tiny_model("llama"), {1: groups}, {1: query})


def test_heads_of_a_dropped_attention_sublayer_are_refused():
    with pytest.raises(ValueError, match="layer 2 has no attention sublayer"):
        prune_heads(drop_sublayers(tiny_model("llama"), attention=[2], mlp=[]), {2: [0]})
