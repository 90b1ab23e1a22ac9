"""Healing a pruned tiny Llama: the loss falls, the student moves towards the teacher, LoRA merges back into
the original structure (and exports), runs repeat bit for bit, and each `train` choice touches only its part."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from conftest import save_tiny_folder, synthetic_text, tiny_model
from pipeline.errors import DataError, SlimformerError
from pipeline.artifacts import HealCurve
from pipeline.config.recipe import HealSpec
from pipeline.model.heal import (CURVE_PNG, LoRALinear, add_lora, heal, heal_windows, merge_lora, mlps_near_dropped,
                                 write_curve)
from pipeline.model.prune import drop_sublayers

SEQ = 32


def _teacher():
    """A tiny Llama whose logits are sharp enough for KL to matter (random init gives near-uniform ones)."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight.mul_(10)
    return model


def _markov_windows(n: int, seed: int, seq_len: int = SEQ) -> np.ndarray:
    """[n, seq_len] token ids from one fixed chain where each token has two possible successors: a text
    with structure the student can learn in a few dozen steps, and fresh samples of it for held-out checks."""
    successors = np.random.default_rng(123).integers(3, 256, size=(256, 2))
    rng = np.random.default_rng(seed)
    out = np.empty((n, seq_len), np.int64)
    for row in out:
        token = rng.integers(3, 256)
        for j in range(seq_len):
            row[j], token = token, successors[token, rng.integers(2)]
    return out


def _logits(model, windows: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(windows), use_cache=False).logits


def _kl(teacher, student, windows: np.ndarray) -> float:
    want, got = (torch.log_softmax(_logits(m, windows), -1) for m in (teacher, student))
    return float((want.exp() * (want - got)).sum(-1).mean())


def _changed(before, after) -> set[str]:
    b, a = before.state_dict(), after.state_dict()
    return {k for k in b if not torch.equal(b[k], a[k])}


def _norm_names(model) -> set[str]:
    return {k for k in model.state_dict() if "norm" in k}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train fastest on one thread, and do not fight other processes for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def healed(one_thread):
    """(teacher, student, student snapshot, result) of a 40-step LoRA distillation on 32 repeated windows."""
    teacher = _teacher()
    student = drop_sublayers(teacher, attention=[1], mlp=[])
    snapshot = {k: v.clone() for k, v in student.state_dict().items()}
    spec = HealSpec(steps=40, learning_rate=1e-3, warmup_steps=2, batch_size=4, seq_len=SEQ)
    return teacher, student, snapshot, heal(student, teacher, _markov_windows(32, seed=0), spec, progress=False)


def test_distill_loss_falls_and_curve_is_complete(healed):
    _, student, _, result = healed
    losses = [row["loss"] for row in result.curve]
    assert np.mean(losses[-5:]) < 0.5 * losses[0]
    assert [row["step"] for row in result.curve] == list(range(1, 41))
    assert all(set(row) == {"step", "loss", "seconds", "lr", "kl"} for row in result.curve)
    assert all(row["loss"] == row["kl"] for row in result.curve)
    assert np.all(np.diff([row["seconds"] for row in result.curve]) >= 0)
    assert (result.steps, result.stopped_by, result.device) == (40, "steps", "cpu")
    # rank 16 on every projection: 4 MLPs (64->128, 64->128, 128->64) and 3 attentions (64->64, 64->32 x2, 64->64)
    assert result.trainable_params == 16 * (4 * 3 * 192 + 3 * (128 + 96 + 96 + 128))


def test_distillation_brings_student_closer_on_held_out_text(healed):
    teacher, student, _, result = healed
    held_out = _markov_windows(8, seed=1)
    before, after = _kl(teacher, student, held_out), _kl(teacher, result.model, held_out)
    assert after < 0.9 * before, (before, after)


def test_merged_model_has_original_structure_and_new_weights(healed):
    teacher, student, snapshot, result = healed
    model = result.model
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied
    assert list(model.state_dict()) == list(student.state_dict())
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in snapshot.items()}
    assert not model.training and all(p.dtype == torch.float32 and p.device.type == "cpu"
                                      for p in model.parameters())
    windows = _markov_windows(2, seed=2)
    assert (_logits(model, windows) - _logits(student, windows)).abs().max() > 1e-3
    changed = _changed(student, model)
    assert changed and all(k.rsplit(".", 2)[-2] in HealSpec().lora_modules for k in changed)
    # the caller's student and teacher are untouched
    assert all(torch.equal(v, snapshot[k]) for k, v in student.state_dict().items())
    assert not student.training and not teacher.training


def test_healed_model_exports_and_onnx_matches_pytorch(healed, tmp_path):
    from pipeline.export.onnx import export_onnx
    from pipeline.measure.ort_runner import OnnxLM

    model = healed[3].model
    export = export_onnx(model, tmp_path)
    lm = OnnxLM(export.path)
    ids = _markov_windows(2, seed=3, seq_len=12)
    mask = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    got, _ = lm.forward(ids, mask, pos, lm.empty_past(len(ids)))
    want = _logits(model, ids).numpy()
    assert np.abs(got - want).max() < 1e-4


def test_merge_lora_gives_the_adapted_output_in_plain_linears():
    model = drop_sublayers(tiny_model("llama"), attention=[2], mlp=[])
    keys = list(model.state_dict())
    wrapped = add_lora(model, ["q_proj", "down_proj"], rank=4, alpha=8, seed=0)
    assert wrapped == [f"model.layers.{i}.{name}" for i in range(4)
                       for name in (("self_attn.q_proj",) if i != 2 else ()) + ("mlp.down_proj",)]
    windows = _markov_windows(2, seed=4)
    plain = _logits(model, windows)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.05)
    adapted = _logits(model, windows)
    merge_lora(model)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n in wrapped)
    assert list(model.state_dict()) == keys
    assert (adapted - plain).abs().max() > 1e-2
    torch.testing.assert_close(_logits(model, windows), adapted, atol=1e-4, rtol=1e-4)


def test_unknown_lora_module_names_what_exists():
    with pytest.raises(SlimformerError, match="gate_proj"):
        add_lora(tiny_model("llama"), ["qkv"], rank=4, alpha=8)


def test_same_seed_same_weights_other_seed_differs():
    teacher = _teacher()
    student = drop_sublayers(teacher, attention=[1], mlp=[])
    windows = _markov_windows(16, seed=0)
    spec = dict(steps=6, learning_rate=1e-3, warmup_steps=1, batch_size=2, seq_len=SEQ)
    runs = [heal(student, teacher, windows, HealSpec(seed=seed, **spec), progress=False).model
            for seed in (0, 0, 1)]
    same, other = (r.state_dict() for r in runs[1:])
    assert all(torch.equal(v, same[k]) for k, v in runs[0].state_dict().items())
    assert any(not torch.equal(v, other[k]) for k, v in runs[0].state_dict().items())


def test_norms_trains_only_norm_weights():
    teacher = _teacher()
    student = drop_sublayers(teacher, attention=[1], mlp=[])
    spec = HealSpec(train="norms", steps=3, learning_rate=1e-2, warmup_steps=0, batch_size=2, seq_len=SEQ)
    result = heal(student, teacher, _markov_windows(8, seed=0), spec, progress=False)
    assert _changed(student, result.model) == _norm_names(student)
    assert result.trainable_params == 64 * len(_norm_names(student))


def test_mlp_near_dropped_trains_only_those_mlps_and_norms():
    teacher = _teacher()
    student = drop_sublayers(teacher, attention=[1], mlp=[])
    assert mlps_near_dropped(student) == [1, 2]
    spec = HealSpec(train="mlp-near-dropped", steps=3, learning_rate=1e-2, warmup_steps=0, batch_size=2,
                    seq_len=SEQ)
    result = heal(student, teacher, _markov_windows(8, seed=0), spec, progress=False)
    mlps = {k for k in student.state_dict() if k.startswith(("model.layers.1.mlp.", "model.layers.2.mlp."))}
    assert len(mlps) == 6
    assert _changed(student, result.model) == mlps | _norm_names(student)


def test_mlp_near_dropped_skips_dropped_mlps_and_needs_dropped_attention():
    teacher = _teacher()
    assert mlps_near_dropped(drop_sublayers(teacher, attention=[1, 3], mlp=[2])) == [1, 3]
    student = drop_sublayers(teacher, attention=[], mlp=[1])
    spec = HealSpec(train="mlp-near-dropped", steps=1, seq_len=SEQ)
    with pytest.raises(SlimformerError, match="train: lora"):
        heal(student, teacher, _markov_windows(2, seed=0), spec, progress=False)


def test_max_seconds_stops_after_the_step_that_crosses_it():
    teacher = _teacher()
    student = drop_sublayers(teacher, attention=[1], mlp=[])
    spec = HealSpec(steps=50, max_seconds=1e-6, seq_len=SEQ)
    result = heal(student, teacher, _markov_windows(4, seed=0), spec, progress=False)
    assert (result.stopped_by, result.steps, len(result.curve)) == ("time", 1, 1)
    assert not any(isinstance(m, LoRALinear) for m in result.model.modules())


def test_combined_objective_logs_each_term():
    teacher = _teacher()
    student = drop_sublayers(teacher, attention=[1], mlp=[])
    windows = _markov_windows(4, seed=0)
    spec = HealSpec(objective="distill+next-token", hidden_mse_weight=0.1, temperature=2.0, steps=2, seq_len=SEQ)
    for row in heal(student, teacher, windows, spec, progress=False).curve:
        assert row["kl"] > 0 and row["ce"] > 0 and row["mse"] > 0
        assert row["loss"] == pytest.approx(row["kl"] + row["ce"] + 0.1 * row["mse"], rel=1e-5)
    row = heal(student, teacher, windows, HealSpec(objective="next-token", steps=1, seq_len=SEQ),
               progress=False).curve[0]
    assert set(row) == {"step", "loss", "seconds", "lr", "ce"} and row["loss"] == row["ce"]
    assert row["ce"] == pytest.approx(float(np.log(256)), rel=0.5)


def test_non_finite_loss_says_to_lower_learning_rate():
    teacher = _teacher()
    student = drop_sublayers(teacher, attention=[1], mlp=[])
    with torch.no_grad():
        teacher.model.norm.weight.fill_(float("nan"))
    with pytest.raises(SlimformerError, match="learning_rate"):
        heal(student, teacher, _markov_windows(2, seed=0), HealSpec(steps=2, seq_len=SEQ), progress=False)


def test_windows_outside_the_vocabulary_are_refused():
    teacher = _teacher()
    with pytest.raises(DataError, match="vocabulary"):
        heal(teacher, teacher, np.full((2, 8), 300), HealSpec(steps=1, seq_len=8), progress=False)


def test_spec_validation():
    with pytest.raises(ValidationError, match="hidden_mse_weight applies only to objective: distill"):
        HealSpec(objective="next-token", hidden_mse_weight=0.5)
    with pytest.raises(ValidationError, match="lora_rank applies only to train: lora"):
        HealSpec(train="norms", lora_rank=8)
    with pytest.raises(ValidationError, match="extra_forbidden|Extra inputs"):
        HealSpec(epochs=3)
    with pytest.raises(ValidationError, match="temperature"):
        HealSpec(temperature=0)
    # a fully written-out spec loads again, whatever the objective and train choice
    for spec in (HealSpec(), HealSpec(objective="next-token", train="all")):
        assert HealSpec.model_validate(spec.model_dump(mode="json")) == spec
    with pytest.raises(ValidationError):
        HealSpec().steps = 5


def test_heal_windows_takes_all_text_up_to_steps_times_batch(tmp_path):
    from transformers import AutoTokenizer

    text = synthetic_text(0)
    save_tiny_folder(tmp_path / "model", texts=[text])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    (tmp_path / "mine.txt").write_text(text)
    (tmp_path / "other.txt").write_text(synthetic_text(1, paragraphs=10))
    tokens = len(tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"])

    capped = heal_windows(tokenizer, HealSpec(steps=5, batch_size=4, seq_len=64), [tmp_path / "mine.txt"])
    assert capped.shape == (20, 64) and capped.dtype == np.int64
    every = heal_windows(tokenizer, HealSpec(steps=10_000, seq_len=64), [tmp_path / "mine.txt"])
    assert every.shape == (tokens // 64, 64)
    assert len({w.tobytes() for w in every}) == len(every)
    own = heal_windows(tokenizer, HealSpec(steps=10_000, seq_len=64, files=[tmp_path / "other.txt"]),
                       [tmp_path / "mine.txt"])
    assert len(own) < len(every)
    (tmp_path / "short.txt").write_text(synthetic_text(2, paragraphs=5))
    with pytest.raises(DataError, match="seq_len"):
        heal_windows(tokenizer, HealSpec(seq_len=8192), [tmp_path / "short.txt"])


def test_write_curve(healed, tmp_path):
    result = healed[3]
    data, png = write_curve(result, tmp_path / "heal")
    assert (data.name, png.name) == (HealCurve.filename, CURVE_PNG)
    assert HealCurve.read(data.parent) == result.record()
    assert len(json.loads(data.read_text())["curve"]) == 40
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
