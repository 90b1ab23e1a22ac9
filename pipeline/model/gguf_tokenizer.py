"""Tokenizers for GGUF files whose vocabulary is SentencePiece BPE, built the way llama.cpp runs them.

Such a file (`tokenizer.ggml.model` "llama", no stored merges) holds pieces and scores; encoding merges, again and
again, the adjacent pair whose joined piece scores highest. transformers 4.57 reads Gemma's as a Unigram model
over those scores instead, which splits words into pieces the model never saw ("▁exact" -> "▁ex", "act"): Gemma 3
270M's perplexity on English prose came out four times too high. `spm_bpe_encode` states the rule plainly and
checks the fast tokenizer built here.
"""

from __future__ import annotations

from ..errors import ModelError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp token types
SPACE = "\u2581"
PROBE = "The exact date of his birth is not known; caf\u00e9 prices rose 3.5% in 1911."


def read_vocab(fields) -> dict | None:
    """The SentencePiece-BPE vocabulary of a GGUF file's fields, or None when it holds another kind."""
    def get(key, default=None):
        field = fields.get(key)
        return field.contents() if field is not None else default

    if get("tokenizer.ggml.model") != "llama" or "tokenizer.ggml.merges" in fields:
        return None
    tokens = get("tokenizer.ggml.tokens")
    return {"tokens": tokens, "scores": get("tokenizer.ggml.scores"),
            "types": get("tokenizer.ggml.token_type", [NORMAL] * len(tokens)),
            "bos": get("tokenizer.ggml.bos_token_id"), "eos": get("tokenizer.ggml.eos_token_id"),
            "unk": get("tokenizer.ggml.unknown_token_id"), "pad": get("tokenizer.ggml.padding_token_id"),
            "add_bos": bool(get("tokenizer.ggml.add_bos_token", True)),
            "add_eos": bool(get("tokenizer.ggml.add_eos_token", False)),
            "space_prefix": bool(get("tokenizer.ggml.add_space_prefix", True))}


def merges_by_score(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every (left, right) pair of pieces that joins into a normal piece, highest-scoring result first."""
    ids = {piece: i for i, piece in enumerate(tokens)}
    ranked = []
    for i, piece in enumerate(tokens):
        if types[i] != NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def spm_bpe_tokenizer(vocab: dict):
    """A PreTrainedTokenizerFast that encodes as llama.cpp does, checked against `spm_bpe_encode` on a probe."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens, types = vocab["tokens"], vocab["types"]
    name = {k: tokens[vocab[k]] if vocab[k] is not None else None for k in ("bos", "eos", "unk", "pad")}
    merges = merges_by_score(tokens, vocab["scores"], types)
    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, unk_token=name["unk"], fuse_unk=True,
                                   byte_fallback=True))
    steps = [normalizers.Prepend(SPACE)] if vocab["space_prefix"] else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                         *([decoders.Strip(" ", 1, 0)] if vocab["space_prefix"] else [])])
    # llama.cpp cuts user-defined pieces (newline runs, space runs, HTML tags) out of the raw text before merging.
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, k in zip(tokens, types) if k == CONTROL])
    backend.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    edges = [t for t, wanted in ((name["bos"], vocab["add_bos"]), (name["eos"], vocab["add_eos"])) if wanted and t]
    if edges:
        first = [name["bos"]] if vocab["add_bos"] else []
        last = [name["eos"]] if vocab["add_eos"] else []
        backend.post_processor = processors.TemplateProcessing(
            single=" ".join([*first, "$A", *last]), pair=" ".join([*first, "$A", *last, *first, "$B", *last]),
            special_tokens=[(t, tokens.index(t)) for t in dict.fromkeys(edges)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **{f"{k}_token": v for k, v in name.items() if v})
    got = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    want = spm_bpe_encode(PROBE, tokens, vocab["scores"], types)
    if got != want:
        raise ModelError(f"the BPE tokenizer built from this GGUF vocabulary encodes a probe as {got[:12]}, but "
                         f"SentencePiece-BPE merging gives {want[:12]}; this tokenizers version builds BPE "
                         "differently.")
    return tokenizer


def spm_bpe_encode(text: str, tokens: list[str], scores: list[float], types: list[int],
                   space_prefix: bool = False) -> list[int]:
    """Reference encoding of a text free of user-defined pieces: start from characters, join the adjacent pair
    whose joined normal piece scores highest (the leftmost on ties) until none joins; unknown characters
    become their UTF-8 byte pieces. Quadratic: for checks on short texts."""
    normal = {t: (i, scores[i]) for i, t in enumerate(tokens) if types[i] == NORMAL}
    byte = {t: i for i, t in enumerate(tokens) if types[i] == BYTE}
    symbols = list((SPACE if space_prefix else "") + text.replace(" ", SPACE))
    while True:
        joins = [(normal[a + b][1], -i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])) if a + b in normal]
        if not joins:
            break
        i = -max(joins)[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    ids = []
    for s in symbols:
        ids += [normal[s][0]] if s in normal else [byte[f"<0x{b:02X}>"] for b in s.encode()]
    return ids
