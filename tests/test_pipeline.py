"""End to end on a tiny model: recipe -> scores -> plan -> pruned model -> ONNX -> validation -> run folder."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.cli import main
from pipeline.errors import GateError
from pipeline.recipe import load_recipe
from pipeline.run import run
from pipeline.rundir import sha256_file


def test_run_writes_a_complete_verified_folder(tiny_project):
    final = run(load_recipe(tiny_project))
    names = {p.name for p in final.iterdir()}
    assert {"recipe.yaml", "scores.json", "plan.json", "hf", "onnx", "report.json", "report.md",
            "importance.png", "manifest.json"} <= names
    assert not list(final.parent.glob(".*partial*"))
    report = json.loads((final / "report.json").read_text())
    orig, comp = report["models"]["original"], report["models"]["compressed"]
    assert comp["kv_layers"] == orig["kv_layers"] - 1 == 3
    assert comp["kv_kb_per_token"] == pytest.approx(orig["kv_kb_per_token"] * 3 / 4)
    assert comp["params_m"] < orig["params_m"] and comp["file_mb"] < orig["file_mb"]
    for figures in (orig, comp):
        assert np.isfinite(figures["perplexity"]) and 0 <= figures["mc_accuracy"] <= 1
        assert 0 < figures["decode_p50_ms"] <= figures["decode_p90_ms"] and figures["peak_rss_mb"] > 0
    assert report["parity"]["compressed"]["top1_agreement"] == 1.0 and report["passed"]
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["files"]["onnx/model.onnx"]["sha256"] == sha256_file(final / "onnx" / "model.onnx")
    assert yaml.safe_load((final / "recipe.yaml").read_text())["drop"]["attention"] == 1
    assert "| KV cache per token (KB) |" in (final / "report.md").read_text()


def test_saved_pruned_folder_reloads_identically(tiny_project):
    import torch

    from pipeline.models import load_model
    from pipeline.prune import drop_lists

    final = run(load_recipe(tiny_project))
    plan = json.loads((final / "plan.json").read_text())
    reloaded = load_model("hf", path=final / "hf").model
    assert drop_lists(reloaded)["attention"] == plan["attention"]
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    from onnxruntime import InferenceSession

    sess = InferenceSession(str(final / "onnx" / "model.onnx"))
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, 5), np.int64),
            "position_ids": np.arange(5)[None]}
    feed.update({i.name: np.zeros((1, 2, 0, 16), np.float32) for i in sess.get_inputs() if "past" in i.name})
    with torch.no_grad():
        ref = reloaded(input_ids=ids).logits.numpy()
    assert np.abs(sess.run(["logits"], feed)[0] - ref).max() < 1e-4


def test_failed_gate_exits_nonzero_and_names_the_gate(tiny_project, capsys):
    data = yaml.safe_load(tiny_project.read_text())
    data["drop"] = {"attention": 2}
    data["validate"]["gates"] = {"max_perplexity_increase_pct": 0.0}
    tiny_project.write_text(yaml.safe_dump(data))
    assert main(["run", str(tiny_project)]) == 3
    err = capsys.readouterr().err
    assert "compressed: max_perplexity_increase_pct: measured" in err and "limit 0" in err
    with pytest.raises(GateError):
        run(load_recipe(tiny_project))


def test_too_many_drops_refused_before_any_folder(tiny_project, capsys):
    data = yaml.safe_load(tiny_project.read_text())
    data["drop"] = {"attention": 9}
    tiny_project.write_text(yaml.safe_dump(data))
    assert main(["run", str(tiny_project)]) == 2
    assert "drop.attention: 9 requested but the model has only 4" in capsys.readouterr().err
    assert not (tiny_project.parent / "runs").exists()


def test_sweep_measures_each_variant(tiny_project, tmp_path):
    from pipeline.sweep import sweep

    rows = sweep(load_recipe(tiny_project), counts=[0, 1, 2], variants=["attention", "blocks"],
                 out=str(tmp_path / "sweep.json"))
    assert [(r["variant"], r["dropped"]) for r in rows] == [
        ("none", 0), ("attention", 1), ("attention", 2), ("blocks", 1), ("blocks", 2)]
    assert all("decode_p50_ms" in r for r in rows if r["variant"] in ("none", "attention"))
    assert "decode_p50_ms" not in rows[-1]
    assert json.loads((tmp_path / "sweep.json").read_text())["rows"] == rows


def test_quantised_variants_and_mobile_packages_in_one_run(tiny_project):
    data = yaml.safe_load(tiny_project.read_text())
    data["quantize"] = [{"kind": "onnx-int8"}, {"kind": "onnx-int4", "block_size": 16}, {"kind": "onnx-fp16"}]
    data["export"] = {"ort_format": True, "genai": True,
                      "coreml": {"context_length": 64, "compression": [{"kind": "linear-int8"}]}}
    loose = {"min_top1_agreement": 0.5}
    data["validate"]["variant_gates"] = {"int8": loose, "int4": {**loose, "max_abs_logit_error": 1.0}, "fp16": loose}
    tiny_project.write_text(yaml.safe_dump(data))
    final = run(load_recipe(tiny_project))
    report = json.loads((final / "report.json").read_text())
    assert set(report["models"]) == {"original", "compressed", "int8", "int4", "fp16"}
    assert {g["variant"] for g in report["gates"]} == {"compressed", "int8", "int4", "fp16"}
    assert sorted(g["limit"] for g in report["gates"] if g["variant"] == "int4") == [0.5, 1.0]
    assert len([g for g in report["gates"] if g["variant"] == "compressed"]) == 2  # the recipe's own gates
    for name in ("compressed", "int8", "int4", "fp16"):
        assert (final / f"ort-{name}").is_dir() and (final / f"genai-{name}" / "genai_config.json").is_file()
        assert report["parity"][name]["top1_agreement"] > 0.5
    assert report["models"]["int8"]["file_mb"] < report["models"]["compressed"]["file_mb"]
    # the tiny word-level tokenizer is one onnxruntime-genai cannot read: reported, not fatal
    assert "cannot load the tokenizer" in report["packages"]["genai"]["int4"]["tokenizer_problem"]
    ort = report["packages"]["ort"]
    assert ort["compressed"]["parity_vs_onnx"]["max_abs_diff"] < 1e-4
    assert all(o["parity_vs_onnx"]["top1_agreement"] > 0.5 for o in ort.values())
    # fp16 weights stay fp16 in the .ort (Runtime style), so it is smaller than the fp32 one
    assert ort["fp16"]["path"].endswith(".with_runtime_opt.ort")
    assert ort["fp16"]["bytes"] < ort["compressed"]["bytes"]
    assert (final / "ort-fp16" / "model.with_runtime_opt.ort").stat().st_size == ort["fp16"]["bytes"]
    coreml = report["packages"]["coreml"]
    assert [p["kv_states"] for p in coreml] == [6, 6]  # 3 kept attention layers, key and value
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["variants"]["int4"] == "onnx-int4/model.onnx"
    assert "## Every variant against the original fp32 model" in (final / "report.md").read_text()


def test_variant_gate_for_unknown_variant_is_refused(tiny_project, capsys):
    data = yaml.safe_load(tiny_project.read_text())
    data["quantize"] = [{"kind": "onnx-int8"}, {"kind": "onnx-int8"}]
    data["validate"]["variant_gates"] = {"int3": {"min_top1_agreement": 0.5}}
    tiny_project.write_text(yaml.safe_dump(data))
    assert main(["run", str(tiny_project)]) == 2
    err = capsys.readouterr().err
    assert "variant name 'int8' is used twice" in err and "no quantize variant is named 'int3'" in err


def test_targets_judge_every_variant_and_a_failure_names_target_variant_and_limit(tiny_project, capsys):
    data = yaml.safe_load(tiny_project.read_text())
    data["quantize"] = [{"kind": "onnx-int8"}]
    data["validate"]["variant_gates"] = {"int8": {"min_top1_agreement": 0.5}}
    strict = {"max_abs_logit_error": 1e-12, "min_top1_agreement": None, "max_perplexity_diff_pct": None}
    data["validate"]["targets"] = [
        {"kind": "host", "name": "cpu", "perplexity_windows": 1, "perplexity_tokens": 16,
         "variant_tolerances": {"int8": {"max_abs_logit_error": 1.0, "min_top1_agreement": 0.5}}},
        {"kind": "host", "name": "picky", "perplexity_windows": 1, "tolerances": strict}]
    tiny_project.write_text(yaml.safe_dump(data))
    assert main(["run", str(tiny_project)]) == 3
    err = capsys.readouterr().err
    assert "int8 on picky: max_abs_logit_error: measured" in err and "limit 1e-12" in err
    assert "on cpu:" not in err  # the same files pass where the tolerance is sane
    final = next((tiny_project.parent / "runs").glob("tiny-*"))
    report = json.loads((final / "report.json").read_text())
    rows = {(r["target"], r["variant"]): r for r in report["targets"]}
    assert set(rows) == {(t, v) for t in ("cpu", "picky") for v in ("compressed", "int8")}
    cpu = rows[("cpu", "compressed")]
    assert cpu["perplexity_tokens"] == 15 and cpu["perplexity_diff_pct"] == pytest.approx(0, abs=1e-6)
    assert cpu["max_abs_logit_error"] < 1e-4 and cpu["decode_p50_ms"] > 0 and cpu["timing"] == "real"
    picky = rows[("picky", "compressed")]  # same window as "cpu" but whole: its own host run, not cpu's
    assert picky["perplexity_tokens"] == 31 and picky["perplexity_diff_pct"] == pytest.approx(0, abs=1e-6)
    assert "| int8 | picky |" in (final / "report.md").read_text()


def test_targets_command_checks_a_finished_run_folder(tiny_project, tmp_path, capsys):
    final = run(load_recipe(tiny_project))
    targets = tmp_path / "targets.yaml"
    targets.write_text(yaml.safe_dump({"targets": [
        {"kind": "host", "name": "again", "perplexity_windows": 1,
         "variant_tolerances": {"int4": {"max_abs_logit_error": 3.0}}}]}))  # names a variant this run lacks
    out = tmp_path / "checked"
    assert main(["targets", str(final), str(targets), "--out", str(out)]) == 0
    result = json.loads((out / "targets.json").read_text())
    assert [(r["target"], r["variant"]) for r in result["rows"]] == [("again", "compressed")]
    assert result["passed"] and {g["name"] for g in result["gates"]} == {
        "max_abs_logit_error", "min_top1_agreement", "max_perplexity_diff_pct"}
    assert "| compressed | again |" in capsys.readouterr().out and not (out / "work").exists()
    targets.write_text(yaml.safe_dump({"targets": [{"kind": "arm64-emulated", "root": "nowhere"}]}))
    assert main(["targets", str(final), str(targets)]) == 2
    err = capsys.readouterr().err
    assert "no arm64 root at" in err and "make arm-root" in err


def test_heal_stage_reports_before_and_after_and_ships_the_healed_weights(tiny_project):
    import torch

    from pipeline.models import load_model

    data = yaml.safe_load(tiny_project.read_text())
    data["heal"] = {"steps": 12, "batch_size": 2, "seq_len": 32, "learning_rate": 1e-3, "warmup_steps": 2}
    tiny_project.write_text(yaml.safe_dump(data))
    final = run(load_recipe(tiny_project))
    report = json.loads((final / "report.json").read_text())
    heal = report["heal"]
    assert heal["steps"] == 12 and heal["stopped_by"] == "steps"  # loss curves are tested in test_heal.py
    assert heal["after"]["perplexity"] != heal["before"]["perplexity"]
    assert heal["weights_sha256"] == sha256_file(final / "hf" / "model.safetensors")
    assert (final / "heal_curve.png").stat().st_size > 0
    assert len(json.loads((final / "heal_curve.json").read_text())["curve"]) == 12
    # the ONNX file is the healed model: parity against the healed PyTorch weights holds
    assert report["parity"]["compressed"]["max_abs_error"] < 1e-3
    healed = load_model("hf", path=final / "hf").model
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7, 8]])
        assert healed(ids).logits.shape == (1, 4, 256)
    assert "## Healing" in (final / "report.md").read_text()


def test_heal_on_evaluation_text_is_refused_and_interrupted_heal_leaves_no_run(tiny_project, capsys, monkeypatch):
    data = yaml.safe_load(tiny_project.read_text())
    data["heal"] = {"files": ["eval.txt"], "steps": 2}
    tiny_project.write_text(yaml.safe_dump(data))
    assert main(["run", str(tiny_project)]) == 2
    err = capsys.readouterr().err
    assert "healing and evaluation text overlap" in err and "eval.txt is both a healing and an evaluation file" in err
    assert not (tiny_project.parent / "runs").exists()

    import pipeline.heal

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline.heal, "heal", interrupted)
    data["heal"] = {"steps": 2}
    tiny_project.write_text(yaml.safe_dump(data))
    with pytest.raises(KeyboardInterrupt):
        run(load_recipe(tiny_project))
    assert list((tiny_project.parent / "runs").iterdir()) == []  # the staged folder is gone


def test_heal_sweep_heals_each_point_on_each_text_and_refuses_evaluation_text(tiny_project, tmp_path):
    from conftest import synthetic_text

    from pipeline.errors import DataError
    from pipeline.sweep import heal_sweep

    data = yaml.safe_load(tiny_project.read_text())
    data["heal"] = {"steps": 3, "batch_size": 2, "seq_len": 32}
    tiny_project.write_text(yaml.safe_dump(data))
    domain = tmp_path / "domain.txt"
    domain.write_text(synthetic_text(7))
    rows = heal_sweep(load_recipe(tiny_project), counts=[0, 1], sources={"calibration": None, "domain": [domain]},
                      out=str(tmp_path / "heal.json"))
    assert [r["dropped"] for r in rows] == [0, 1]
    assert rows[1]["healed_calibration"]["steps"] == rows[1]["healed_domain"]["steps"] == 3
    assert rows[1]["healed_calibration"]["perplexity"] != rows[1]["healed_domain"]["perplexity"]
    with pytest.raises(DataError, match="healing and evaluation text overlap"):
        heal_sweep(load_recipe(tiny_project), counts=[1], sources={"oops": [tmp_path / "eval.txt"]})


def test_killed_during_healing_leaves_no_run_folder(tiny_project):
    import signal
    import subprocess
    import sys

    data = yaml.safe_load(tiny_project.read_text())
    data["heal"] = {"steps": 100000, "batch_size": 2, "seq_len": 32}
    tiny_project.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(tiny_project)],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "heal ..." in line:
            break
    runs = tiny_project.parent / "runs"
    assert [p.name.split("-")[0] for p in runs.iterdir()] == [".tiny"]  # only the staged, hidden folder
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert list(runs.iterdir()) == []
