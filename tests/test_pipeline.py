"""End to end on a tiny model: recipe -> scores -> plan -> pruned model -> ONNX -> validation -> run folder."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.artifacts import Report, TargetsReport
from pipeline.cli import main
from pipeline.errors import GateError
from pipeline.config.loading import load_recipe
from pipeline.stages import run
from pipeline.rundir import sha256_file


def test_run_writes_a_complete_verified_folder(tiny_project):
    final = run(load_recipe(tiny_project))
    names = {p.name for p in final.iterdir()}
    assert {"recipe.yaml", "scores.json", "plan.json", "hf", "onnx", "report.json", "report.md",
            "importance.png", "manifest.json"} <= names
    assert not list(final.parent.glob(".*partial*"))
    report = Report.read(final)
    orig, comp = report.validation.models["original"], report.validation.models["compressed"]
    assert comp.kv_layers == orig.kv_layers - 1 == 3
    assert comp.kv_kb_per_token == pytest.approx(orig.kv_kb_per_token * 3 / 4)
    assert comp.params_m < orig.params_m and comp.file_mb < orig.file_mb
    for figures in (orig, comp):
        assert np.isfinite(figures.perplexity) and 0 <= figures.mc_accuracy <= 1
        assert 0 < figures.decode_p50_ms <= figures.decode_p90_ms and figures.peak_rss_mb > 0
    assert report.validation.parity["compressed"].top1_agreement == 1.0 and report.passed
    assert set(report.stage_seconds) == {"check", "load model", "score", "plan", "drop", "export", "quantize",
                                         "package", "validate"} and report.wall_seconds > 0
    assert "run.log" in names
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["files"]["onnx/model.onnx"]["sha256"] == sha256_file(final / "onnx" / "model.onnx")
    assert yaml.safe_load((final / "recipe.yaml").read_text())["drop"]["attention"] == 1
    assert "| KV cache per token (KB) |" in (final / "report.md").read_text()


def test_saved_pruned_folder_reloads_identically(tiny_project):
    import torch

    from pipeline.model.loading import load_model
    from pipeline.model.prune import drop_lists

    final = run(load_recipe(tiny_project))
    plan = json.loads((final / "plan.json").read_text())
    reloaded = load_model("hf", path=final / "hf").model
    assert drop_lists(reloaded)["attention"] == plan["attention"]
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    from pipeline.measure.ort_runner import OnnxLM

    lm = OnnxLM(final / "onnx" / "model.onnx")
    assert not lm.takes_positions  # the default graph is the fused one
    logits, _ = lm.forward(ids.numpy(), np.ones((1, 5), np.int64), np.arange(5)[None], lm.empty_past(1))
    with torch.no_grad():
        ref = reloaded(input_ids=ids).logits.numpy()
    assert np.abs(logits - ref).max() < 1e-4


def test_head_pruned_run_shrinks_kv_per_layer_and_reports_heads(tiny_project):
    from pipeline.artifacts import HeadPlan, HeadScores
    from pipeline.model.loading import load_model
    from pipeline.model.prune_heads import kv_heads_per_layer

    data = yaml.safe_load(tiny_project.read_text())
    data["drop"] = {"attention": 1, "heads": 2, "query_heads": {0: [0, 2]}}
    data["export"] = {"genai": True}
    tiny_project.write_text(yaml.safe_dump(data))
    final = run(load_recipe(tiny_project))
    report, head_plan = Report.read(final), HeadPlan.read(final)
    assert report.head_plan == head_plan and head_plan.removed_groups == 2 and head_plan.method == "global"
    assert head_plan.query_heads == {0: (0, 2)} and len(HeadScores.read(final).importance) == 4
    kept = [k for k in head_plan.kv_heads if k]
    assert len(kept) == 3 and sum(kept) == 3 * 2 - 2  # 3 kept attention layers of 2 KV heads, 2 groups removed
    orig, comp = report.validation.models["original"], report.validation.models["compressed"]
    assert comp.kv_kb_per_token == pytest.approx(orig.kv_kb_per_token * sum(kept) / (4 * 2))
    assert report.validation.parity["compressed"].top1_agreement == 1.0 and report.passed
    assert kv_heads_per_layer(load_model("hf", path=final / "hf").model) == list(head_plan.kv_heads)
    assert {"heads.json", "head_plan.json", "heads.png", "genai-compressed"} <= {p.name for p in final.iterdir()}
    md = (final / "report.md").read_text()
    assert "## Attention heads" in md and "2 KV groups and 2 further query heads removed" in md


def test_heads_command_writes_the_analysis(tiny_project, tmp_path, capsys):
    data = yaml.safe_load(tiny_project.read_text())
    data["heads"] = {"samples": 2}
    data["drop"] = {"heads": {1: [0]}}
    tiny_project.write_text(yaml.safe_dump(data))
    assert main(["heads", str(tiny_project), "--out", str(tmp_path / "h")]) == 0
    assert {p.name for p in (tmp_path / "h").iterdir()} == {"heads.json", "head_plan.json", "heads.png", "heads.md"}
    assert json.loads((tmp_path / "h" / "head_plan.json").read_text())["kv_groups"] == {"1": [0]}
    out = capsys.readouterr().out
    assert "least important KV groups" in out and "| 1 | [0] |" in out


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
    from pipeline.bench.sweep import sweep

    rows = sweep(load_recipe(tiny_project), counts=[0, 1, 2], kinds=["attention", "blocks"],
                 out=str(tmp_path / "sweep.json"))
    assert [(r["variant"], r["dropped"]) for r in rows] == [
        ("none", 0), ("attention", 1), ("attention", 2), ("blocks", 1), ("blocks", 2)]
    assert all("decode_p50_ms" in r for r in rows if r["variant"] in ("none", "attention"))
    assert "decode_p50_ms" not in rows[-1]
    assert json.loads((tmp_path / "sweep.json").read_text())["rows"] == rows


def test_heads_sweep_compares_ranked_random_and_sublayer_drops(tiny_project, tmp_path):
    from pipeline.bench.heads_sweep import heads_sweep

    rows = heads_sweep(load_recipe(tiny_project), counts=[1, 2], out=str(tmp_path / "heads.json"))
    assert [(r["variant"], r["kv_groups_removed"]) for r in rows] == [
        ("none", 0), ("heads", 1), ("heads, random", 1), ("heads", 2), ("heads, random", 2), ("attention", 2)]
    assert [r["kv_heads"] for r in rows] == [8, 7, 7, 6, 6, 6]  # 4 layers x 2 KV heads
    assert len(rows[-1]["attention_dropped"]) == 1 and len(rows[3]["groups"]) == 2
    assert all(np.isfinite(r["perplexity"]) for r in rows)
    assert json.loads((tmp_path / "heads.json").read_text())["rows"] == rows


def test_quantised_variants_and_mobile_packages_in_one_run(tiny_project):
    data = yaml.safe_load(tiny_project.read_text())
    data["quantize"] = [{"kind": "onnx-int8"}, {"kind": "onnx-int4", "block_size": 16}, {"kind": "onnx-fp16"}]
    data["export"] = {"ort_format": True, "genai": True,
                      "coreml": {"context_length": 64, "compression": [{"kind": "linear-int8"}]}}
    data["validate"]["variant_gates"] = {  # field by field: the recipe's gates are top-1 0.99 and logit error 0.01
        "int8": {"min_top1_agreement": 0.5, "max_abs_logit_error": 1.0},
        "int4": {"min_top1_agreement": 0.5, "max_abs_logit_error": None},  # null turns that gate off
        "fp16": {"max_abs_logit_error": 0.5}}
    tiny_project.write_text(yaml.safe_dump(data))
    final = run(load_recipe(tiny_project))
    report = Report.read(final)
    validation = report.validation
    assert set(validation.models) == {"original", "compressed", "int8", "int4", "fp16"}
    assert {g.variant for g in validation.gates} == {"compressed", "int8", "int4", "fp16"}
    limits = {v: sorted((g.name, g.limit) for g in validation.gates if g.variant == v) for v in ("int8", "int4", "fp16")}
    assert limits == {"int8": [("max_abs_logit_error", 1.0), ("min_top1_agreement", 0.5)],
                      "int4": [("min_top1_agreement", 0.5)],
                      "fp16": [("max_abs_logit_error", 0.5), ("min_top1_agreement", 0.99)]}
    resolved = yaml.safe_load((final / "recipe.yaml").read_text())["validate"]["variant_gates"]
    assert resolved == data["validate"]["variant_gates"]  # only what was set is written back
    for name in ("compressed", "int8", "int4", "fp16"):
        assert (final / f"ort-{name}").is_dir() and (final / f"genai-{name}" / "genai_config.json").is_file()
        assert validation.parity[name].top1_agreement > 0.5
    assert validation.models["int8"].file_mb < validation.models["compressed"].file_mb
    # the folder's byte-level BPE tokenizer encodes alike in onnxruntime-genai, for every variant
    assert {name: g.tokenizer_problem for name, g in report.packages.genai.items()} == dict.fromkeys(
        ("compressed", "int8", "int4", "fp16"))
    ort = report.packages.ort
    assert ort["compressed"].parity_vs_onnx.max_abs_diff < 1e-4
    assert all(o.parity_vs_onnx.top1_agreement > 0.5 for o in ort.values())
    # fp16 weights stay fp16 in the .ort (Runtime style), so it is smaller than the fp32 one
    assert ort["fp16"].path.name.endswith(".with_runtime_opt.ort")
    assert ort["fp16"].bytes < ort["compressed"].bytes
    assert (final / "ort-fp16" / "model.with_runtime_opt.ort").stat().st_size == ort["fp16"].bytes
    assert [p.kv_states for p in report.packages.coreml] == [6, 6]  # 3 kept attention layers, key and value
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
    report = Report.read(final)
    rows = {(r.target, r.variant): r for r in report.validation.targets}
    assert set(rows) == {(t, v) for t in ("cpu", "picky") for v in ("compressed", "int8")}
    cpu = rows[("cpu", "compressed")]
    assert cpu.perplexity_tokens == 15 and cpu.perplexity_diff_pct == pytest.approx(0, abs=1e-6)
    assert cpu.max_abs_logit_error < 1e-4 and cpu.decode_p50_ms > 0 and cpu.timing == "real"
    assert cpu.max_rel_diff_vs_host < 1e-6  # the same file on the same host: the same logits
    picky = rows[("picky", "compressed")]  # same window as "cpu" but whole: its own host run, not cpu's
    assert picky.perplexity_tokens == 31 and picky.perplexity_diff_pct == pytest.approx(0, abs=1e-6)
    assert "| int8 | picky |" in (final / "report.md").read_text()


def test_targets_command_checks_a_finished_run_folder(tiny_project, tmp_path, capsys):
    final = run(load_recipe(tiny_project))
    targets = tmp_path / "targets.yaml"
    targets.write_text(yaml.safe_dump({"targets": [
        {"kind": "host", "name": "again", "perplexity_windows": 1,
         "variant_tolerances": {"int4": {"max_abs_logit_error": 3.0}}}]}))  # names a variant this run lacks
    out = tmp_path / "checked"
    assert main(["targets", str(final), str(targets), "--out", str(out)]) == 0
    result = TargetsReport.read(out)
    assert [(r.target, r.variant) for r in result.rows] == [("again", "compressed")]
    assert result.passed and {g.name for g in result.gates} == {
        "max_abs_logit_error", "min_top1_agreement", "max_rel_diff_vs_host", "max_perplexity_diff_pct"}
    assert "| compressed | again |" in capsys.readouterr().out and not (out / "work").exists()
    targets.write_text(yaml.safe_dump({"targets": [{"kind": "arm64-emulated", "root": "nowhere"}]}))
    assert main(["targets", str(final), str(targets)]) == 2
    err = capsys.readouterr().err
    assert "no arm64 root at" in err and "make arm-root" in err


def _kl_to_teacher(student, teacher, windows) -> float:
    """Mean KL(teacher || student) of the next-token distributions over token windows."""
    import torch

    with torch.no_grad():
        ids = torch.from_numpy(windows)
        log_t = torch.log_softmax(teacher(ids).logits, -1)
        log_s = torch.log_softmax(student(ids).logits, -1)
        return float((log_t.exp() * (log_t - log_s)).sum(-1).mean())


def test_heal_stage_brings_the_model_closer_to_the_teacher_and_ships_the_healed_weights(tiny_project):
    from pipeline.measure.validate import prepare_eval_data
    from pipeline.model.loading import load_model
    from pipeline.model.prune import drop_sublayers

    data = yaml.safe_load(tiny_project.read_text())
    data["heal"] = {"steps": 12, "batch_size": 2, "seq_len": 32, "learning_rate": 3e-3, "warmup_steps": 2}
    tiny_project.write_text(yaml.safe_dump(data))
    final = run(load_recipe(tiny_project))
    report = Report.read(final)
    heal = report.heal
    assert heal.steps == 12 and heal.stopped_by == "steps"  # loss curves are tested in test_heal.py
    assert heal.weights_sha256 == sha256_file(final / "hf" / "model.safetensors")
    assert (final / "heal_curve.png").stat().st_size > 0
    assert len(json.loads((final / "heal_curve.json").read_text())["curve"]) == 12
    # on held-out windows the shipped (healed) weights are closer to the undropped model than the one-shot drop
    original = load_model("hf", path=tiny_project.parent / "model")
    plan = json.loads((final / "plan.json").read_text())
    one_shot = drop_sublayers(original.model, plan["attention"], plan["mlp"])
    healed = load_model("hf", path=final / "hf").model
    windows = prepare_eval_data(original.tokenizer, load_recipe(tiny_project).validate_).windows
    kl = {name: _kl_to_teacher(m, original.model, windows) for name, m in (("healed", healed), ("one-shot", one_shot))}
    assert kl["healed"] < 0.8 * kl["one-shot"], kl  # measured 0.0064 vs 0.0083
    # the ONNX file is the healed model: parity against the healed PyTorch weights holds
    assert report.validation.parity["compressed"].max_abs_error < 1e-3
    assert "## Healing" in (final / "report.md").read_text()


def test_heal_on_evaluation_text_is_refused_and_interrupted_heal_leaves_no_run(tiny_project, capsys, monkeypatch):
    data = yaml.safe_load(tiny_project.read_text())
    data["heal"] = {"files": ["eval.txt"], "steps": 2}
    tiny_project.write_text(yaml.safe_dump(data))
    assert main(["run", str(tiny_project)]) == 2
    err = capsys.readouterr().err
    assert "healing and evaluation text overlap" in err and "eval.txt is both a healing and an evaluation file" in err
    assert not (tiny_project.parent / "runs").exists()

    import pipeline.model.heal

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline.model.heal, "heal", interrupted)
    data["heal"] = {"steps": 2}
    tiny_project.write_text(yaml.safe_dump(data))
    with pytest.raises(KeyboardInterrupt):
        run(load_recipe(tiny_project))
    assert list((tiny_project.parent / "runs").iterdir()) == []  # the staged folder is gone


def test_heal_sweep_heals_each_point_on_each_text_and_refuses_evaluation_text(tiny_project, tmp_path):
    from conftest import synthetic_text

    from pipeline.bench.heal_sweep import heal_sweep
    from pipeline.errors import RecipeError

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
    with pytest.raises(RecipeError, match="healing and evaluation text overlap"):
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


def test_report_round_trips_and_the_original_is_scored_once(tiny_project):
    first = Report.read(run(load_recipe(tiny_project)))
    data = json.loads(json.dumps(first.to_json()))
    assert data["schema_version"] == 2 and Report.from_json(data) == first
    with pytest.raises(ValueError, match="schema_version 1 is not 2"):
        Report.from_json({**data, "schema_version": 1})
    second = Report.read(run(load_recipe(tiny_project)))
    before, after = first.validation.models["original"], second.validation.models["original"]
    assert not before.accuracy_cached and after.accuracy_cached
    assert (after.perplexity, after.mc_accuracy) == (before.perplexity, before.mc_accuracy)
    assert not second.validation.models["compressed"].accuracy_cached  # what the run made is always scored


def test_baseline_cache_key_covers_config_graph_and_exporter(tmp_path, monkeypatch):
    import dataclasses

    from conftest import tiny_model
    from pipeline.config.recipe import ExportSpec
    from pipeline.export import fused as exporter
    from pipeline.model.loading import LoadedModel
    from pipeline.stages import baseline_onnx

    monkeypatch.setenv("SLIMFORMER_HOME", str(tmp_path))
    loaded = LoadedModel(model=tiny_model(), tokenizer=None, source_sha256="same-weights", description="tiny")
    first = baseline_onnx(loaded, ExportSpec())
    assert baseline_onnx(loaded, ExportSpec()) == first  # cached
    assert baseline_onnx(loaded, ExportSpec(graph="optimum")) != first
    changed = tiny_model(rope_theta=500000.0)  # same weights file hash, another config.json
    assert baseline_onnx(dataclasses.replace(loaded, model=changed), ExportSpec()) != first
    code = tmp_path / "exporter.py"
    code.write_text(Path(exporter.__file__).read_text() + "\n# changed\n")
    monkeypatch.setattr(exporter, "__file__", str(code))
    assert baseline_onnx(loaded, ExportSpec()) != first
