"""SentencePiece-BPE vocabularies from GGUF metadata: the fast tokenizer merges as llama.cpp does (highest-scoring
joined piece first), keeps user-defined pieces whole, adds the start token, and decodes back to the text."""

import random

import pytest

from pipeline.errors import ModelError
from pipeline.model.gguf_tokenizer import (BYTE, CONTROL, NORMAL, USER_DEFINED, merges_by_score, read_vocab,
                                           spm_bpe_encode, spm_bpe_tokenizer)

S = "\u2581"


def tiny_vocab():
    """Control tokens, bytes, a user-defined newline run, characters and merged pieces with BPE-style scores
    (higher = merged earlier). Unigram over these scores would split '▁exact' into '▁ex' + 'act'."""
    tokens, scores, types = ["<pad>", "<eos>", "<bos>", "<unk>"], [-1000.0] * 4, [CONTROL] * 4
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    scores += [0.0] * 256
    types += [BYTE] * 256
    tokens += ["\n\n"]
    scores += [-1000.0]
    types += [USER_DEFINED]
    chars = [S, *"abcdefghijklmnopqrstuvwxyzT.,"]
    merged = [S + "e", "ex", S + "ex", "ac", "act", S + "exact", "at", "th", S + "th", "he", S + "the", "ct", "xa"]
    for rank, piece in enumerate(merged + chars):
        tokens.append(piece)
        scores.append(-float(rank))
        types.append(NORMAL)
    return {"tokens": tokens, "scores": scores, "types": types, "bos": 2, "eos": 1, "unk": 3, "pad": 0,
            "add_bos": True, "add_eos": False, "space_prefix": False}


@pytest.fixture(scope="module")
def built():
    return tiny_vocab(), spm_bpe_tokenizer(tiny_vocab())


def test_merges_follow_the_joined_pieces_score():
    v = tiny_vocab()
    merges = merges_by_score(v["tokens"], v["scores"], v["types"])
    assert merges[:3] == [(S, "e"), ("e", "x"), (S + "e", "x")]  # '▁e' scores highest, then 'ex', then '▁ex'
    assert (S, "exact") not in merges and (S + "ex", "act") in merges


def test_fast_tokenizer_equals_the_merge_rule_on_random_text(built):
    v, tok = built
    rng = random.Random(0)
    alphabet = list("abcdextha ") + ["ct", "exact", "the", "\u00e9", "Z"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20)))
        assert tok(text, add_special_tokens=False)["input_ids"] == spm_bpe_encode(
            text, v["tokens"], v["scores"], v["types"]), text


def test_words_stay_whole_and_the_start_token_leads(built):
    v, tok = built
    ids = tok("the exact\n\nth\u00e9")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "th", "e", S + "exact", "\n\n", "th", "<0xC3>", "<0xA9>"]
    assert tok.decode(ids, skip_special_tokens=True) == "the exact\n\nth\u00e9"


def test_a_tokenizer_that_does_not_follow_the_rule_is_refused(monkeypatch):
    import pipeline.model.gguf_tokenizer as module

    monkeypatch.setattr(module, "merges_by_score", lambda *a: merges_by_score(*a)[::-1])  # lowest score first
    with pytest.raises(ModelError, match="SentencePiece-BPE merging gives"):
        spm_bpe_tokenizer(tiny_vocab())


def test_other_vocabulary_kinds_are_left_to_transformers():
    class Field:
        def __init__(self, value):
            self.value = value

        def contents(self):
            return self.value

    assert read_vocab({"tokenizer.ggml.model": Field("gpt2")}) is None
    assert read_vocab({"tokenizer.ggml.model": Field("llama"), "tokenizer.ggml.merges": Field([])}) is None
    found = read_vocab({"tokenizer.ggml.model": Field("llama"), "tokenizer.ggml.tokens": Field(["a"]),
                        "tokenizer.ggml.scores": Field([0.0]), "tokenizer.ggml.add_space_prefix": Field(False)})
    assert found["types"] == [NORMAL] and found["add_bos"] and not found["space_prefix"]
