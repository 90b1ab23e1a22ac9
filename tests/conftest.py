"""Shared fixtures: tiny random models (2-4 layers, 64 wide) for every supported architecture."""

from __future__ import annotations

import pytest
import torch

TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    pad_token_id=0, bos_token_id=1, eos_token_id=None, tie_word_embeddings=True,
)


# Gemma 3: a window shorter than the test prompts, and kinds mixed so that dropping attention layers 0 and 2
# leaves slots whose kinds differ from the config's first ones (transformers types cache slots by the config).
TINY_GEMMA3 = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=4, rope_local_base_freq=100.0,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"])


def fused_architectures() -> list[str]:
    """The adapter rows the fused decoder export writes (the others export with the optimum graph)."""
    from pipeline.model.adapters import ADAPTERS

    return sorted(a for a, ad in ADAPTERS.items() if ad.fused_graph)


def tiny_config(model_type: str = "llama", **overrides):
    from transformers import AutoConfig

    kwargs = {**TINY, **(TINY_GEMMA3 if model_type == "gemma3_text" else {}), **overrides}
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


WORDS = ("the king queen castle river night day light dark old young brave wise fool speaks answers "
         "walks sees hears loves fears keeps leaves finds a his her their our my this that good ill "
         "sword crown letter field storm sea ship land town gate hall friend enemy father mother son "
         "daughter and but so then yet when while after before slowly quickly never always again").split()


def synthetic_text(seed: int, paragraphs: int = 60) -> str:
    """Deterministic English-like prose: paragraphs of 4-6 sentences of 6-14 words."""
    import random

    rng = random.Random(seed)
    paras = []
    for _ in range(paragraphs):
        sentences = []
        for _ in range(rng.randint(4, 6)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
            sentences.append(" ".join(words).capitalize() + ".")
        paras.append(" ".join(sentences))
    return "\n\n".join(paras) + "\n"


BPE_VOCAB = 320  # the 256 byte symbols, one special token and 63 merges


def byte_level_bpe(texts, vocab_size: int = BPE_VOCAB, gguf_decoder: bool = False):
    """A tiny byte-level BPE tokenizer (GPT-2 / SmolLM2 style), the kind onnxruntime-genai reads. With
    `gguf_decoder`, the SentencePiece-style decoder that transformers' GGUF conversion writes for SmolLM2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if gguf_decoder:
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("\u2581", " "),
                                         decoders.ByteLevel()])
    tok.train_from_iterator(list(texts), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   padding_side="left")


def save_tiny_folder(folder, arch: str = "llama", texts=(), vocab_size: int = BPE_VOCAB, **overrides):
    """A tiny model (`overrides` of its config) plus a byte-level BPE tokenizer of `vocab_size` trained on
    `texts`, as a Hugging Face folder."""
    tokenizer = byte_level_bpe(texts, vocab_size)
    tiny_model(arch, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
               eos_token_id=tokenizer.eos_token_id, **overrides).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_project(tmp_path, monkeypatch):
    """A complete offline project: tiny model folder, calibration/eval/distractor texts, a recipe."""
    monkeypatch.setenv("SLIMFORMER_HOME", str(tmp_path / "home"))
    return write_tiny_project(tmp_path)


def write_tiny_project(tmp_path):
    """The files of `tiny_project` under `tmp_path`; returns the recipe's path (SLIMFORMER_HOME is the caller's)."""
    import yaml

    texts = {name: synthetic_text(seed) for seed, name in enumerate(("calib", "eval", "distract"))}
    for name, text in texts.items():
        (tmp_path / f"{name}.txt").write_text(text)
    save_tiny_folder(tmp_path / "model", texts=list(texts.values()))
    recipe = {
        "name": "tiny",
        "model": {"source": "hf", "path": "model"},
        "calibration": {"files": ["calib.txt"], "samples": 4, "seq_len": 32},
        "drop": {"attention": 1},
        "validate": {"files": ["eval.txt"], "distractor_files": ["distract.txt"], "perplexity_windows": 2,
                     "seq_len": 32, "mc_items": 5, "parity_decode_steps": 4,
                     "latency": {"prefill_tokens": 8, "decode_context": 16, "decode_steps": 4},
                     "gates": {"min_top1_agreement": 0.99, "max_abs_logit_error": 0.01}},
        "output": {"dir": "runs"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One finished run of the tiny recipe with an int4 variant, shared by the registry tests (read only)."""
    import yaml

    from pipeline.config.loading import load_recipe
    from pipeline.stages import run

    root = tmp_path_factory.mktemp("tiny-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLIMFORMER_HOME", str(root / "home"))
        recipe = write_tiny_project(root)
        data = yaml.safe_load(recipe.read_text())
        data["quantize"] = [{"kind": "onnx-int4", "block_size": 16}]
        data["validate"]["variant_gates"] = {"int4": {"min_top1_agreement": 0.5, "max_abs_logit_error": None}}
        recipe.write_text(yaml.safe_dump(data))
        return run(load_recipe(recipe))


def genai_greedy(folder, prompt: list[int], new_tokens: int):
    """(the tokens onnxruntime-genai generates greedily after `prompt` from `folder`, the finished generator)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens, generator
