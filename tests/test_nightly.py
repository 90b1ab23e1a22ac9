"""`slimformer nightly` on tiny models: publish, reuse the stage cache the next night, refuse a regression; a
two-recipe night on a local Ray instance where one recipe fails; the stage cache itself."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.artifacts import OnnxExport
from pipeline.cli import main
from pipeline.nightly.report import read_history
from pipeline.stagecache import StageCache, cached

REPO = Path(__file__).resolve().parents[1]


def _nightly_file(project: Path, recipes: list[str], **extra) -> Path:
    path = project.parent / "nightly.yaml"
    path.write_text(yaml.safe_dump({"recipes": recipes, "registry": "registry", "tag": "nightly", "out": "nightly",
                                    "compare": {"latency_rounds": 1},
                                    "limits": {"max_decode_slowdown_pct": None}, **extra}))
    return path


def _versions(registry: Path, name: str):
    from pipeline.registry import open_store
    from pipeline.registry.ops import versions

    return versions(open_store(registry), name)


def test_nightly_publishes_then_reuses_the_cache_then_refuses_a_regression(tiny_project, capsys):
    root = tiny_project.parent
    nightly = _nightly_file(tiny_project, ["recipe.yaml"])
    first_night = subprocess.run(  # in a child process, to see that a night without --ray never imports Ray
        [sys.executable, "-c", "import sys; from pipeline.cli import main; code = main(['nightly', sys.argv[1]]); "
         "print('ray' in sys.modules, code)", str(nightly)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first_night.stdout.splitlines()[-1] == "False 0", first_night.stderr
    [first] = read_history(root / "nightly" / "history.jsonl")[-1].recipes
    assert first.status == "published" and first.previous is None and first.cached_stages == ()

    assert main(["nightly", str(nightly)]) == 0
    [second] = read_history(root / "nightly" / "history.jsonl")[-1].recipes
    assert second.status == "published" and second.previous == first.version != second.version
    assert {"score", "export", "quantize", "package", "accuracy of compressed"} <= set(second.cached_stages)
    [row] = second.side_by_side
    assert row.identical and row.previous["perplexity"] == row.new["perplexity"]  # the same bytes, re-measured
    summary = (root / "nightly" / "summary.md").read_text()
    assert re.search(r"export \d+\.\d \(cached\)", summary) and f"| tiny | published | {second.version} |" in summary
    assert (root / "nightly" / "trend.png").read_bytes()[:4] == b"\x89PNG"

    data = yaml.safe_load(tiny_project.read_text())
    data["drop"] = {"attention": 2}  # tonight's recipe drops one more attention sublayer
    tiny_project.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert main(["nightly", str(nightly)]) == 4
    [third] = read_history(root / "nightly" / "history.jsonl")[-1].recipes
    assert third.status == "regressed" and third.version is None and third.previous == second.version
    crossed = {g.figure: g for g in third.regressions}
    ppl = crossed["perplexity"]
    assert ppl.new > ppl.previous * 1.01 and ppl.previous == third.side_by_side[0].previous["perplexity"]
    err = capsys.readouterr().err
    assert (f"regression, not published: tiny: compressed: perplexity: previous {ppl.previous:.4g}, new "
            f"{ppl.new:.4g} (+{ppl.change:.3g} %); limit max_perplexity_increase_pct 1") in err
    assert [(v.version, v.tags) for v in _versions(root / "registry", "tiny")] == [
        (first.version, ()), (second.version, ("latest", "nightly"))]  # the tag did not move
    assert len(read_history(root / "nightly" / "history.jsonl")) == 3


def test_two_recipe_nightly_on_local_ray_publishes_one_and_reports_the_failed_one(tiny_project, capsys):
    ray = pytest.importorskip("ray")
    root = tiny_project.parent
    strict = yaml.safe_load(tiny_project.read_text())
    strict.update(name="tiny-strict", drop={"attention": 2})
    strict["validate"]["gates"] = {"max_perplexity_increase_pct": 0.0}  # two dropped sublayers cannot meet it
    (root / "strict.yaml").write_text(yaml.safe_dump(strict))
    nightly = _nightly_file(tiny_project, ["recipe.yaml", "strict.yaml"], cpus_per_recipe=1)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        assert main(["nightly", str(nightly), "--ray"]) == 5
        _fan_out_contract(ray)
    finally:
        ray.shutdown()
    err = capsys.readouterr().err
    assert "slimformer: tiny-strict: failed, not published: 1 validation gate(s) failed" in err
    assert "compressed: max_perplexity_increase_pct: measured" in err
    night = read_history(root / "nightly" / "history.jsonl")[-1]
    assert night.ray == "local" and [(r.name, r.status) for r in night.recipes] == [
        ("tiny", "published"), ("tiny-strict", "failed")]
    assert Path(night.recipes[1].run_dir).is_dir()  # the failed run's folder is kept for a look
    assert [v.version for v in _versions(root / "registry", "tiny")] == [night.recipes[0].version]
    assert _versions(root / "registry", "tiny-strict") == []
    assert "## tiny-strict (" in (root / "nightly" / "summary.md").read_text()


def _fan_out_contract(ray) -> None:
    """On the running instance: results in job order, each task holding the CPUs it declared; a task whose
    worker dies gives on_error's result; an exception raised by the function comes back as itself."""
    from pipeline.fanout import fan_out

    def cpus_held(i):
        return i, ray.get_runtime_context().get_assigned_resources().get("CPU")

    def dies(i):
        os._exit(1)

    def refuses(i):
        raise ValueError(f"job {i} refused")

    assert fan_out(cpus_held, [(i,) for i in range(3)], ray="local", cpus=1) == [(0, 1.0), (1, 1.0), (2, 1.0)]
    assert fan_out(dies, [(7,)], ray="local", on_error=lambda job, e: ("lost", job)) == [("lost", (7,))]
    with pytest.raises(ValueError, match="job 3 refused"):
        fan_out(refuses, [(3,)], ray="local")


def test_a_broken_recipe_in_the_nightly_file_stops_the_night_before_any_work(tiny_project, capsys):
    data = yaml.safe_load(tiny_project.read_text())
    data["drop"] = {"colour": 1}
    (tiny_project.parent / "broken.yaml").write_text(yaml.safe_dump(data))
    nightly = _nightly_file(tiny_project, ["recipe.yaml", "broken.yaml", "missing.yaml"], tag="not a tag")
    assert main(["nightly", str(nightly)]) == 2
    err = capsys.readouterr().err
    assert "tag: String should match pattern" in err
    nightly = _nightly_file(tiny_project, ["recipe.yaml", "broken.yaml", "missing.yaml"])
    assert main(["nightly", str(nightly)]) == 2
    err = capsys.readouterr().err
    assert "broken.yaml: drop.colour: unknown key 'colour'" in err and "missing.yaml: file not found" in err
    assert not (tiny_project.parent / "runs").exists() and not (tiny_project.parent / "registry").exists()


def _export_into(folder: Path, calls: list):
    def build() -> OnnxExport:
        calls.append(folder)
        (folder / "onnx").mkdir()
        (folder / "onnx" / "model.onnx").write_text(f"built in {folder.name}")
        return OnnxExport(path=folder / "onnx" / "model.onnx", kv_layers=3, input_names=("input_ids",),
                          output_names=("logits",))
    return build


def test_stage_cache_restores_the_files_a_stage_added_and_rebases_paths(tmp_path):
    cache, calls = StageCache(tmp_path / "cache"), []
    runs = [tmp_path / f"run{i}" for i in range(4)]
    for run in runs:
        run.mkdir()
        (run / "run.log").write_text("not the stage's")
    first = cached(cache, "export", {"weights": "a"}, runs[0], _export_into(runs[0], calls), OnnxExport)
    again = cached(cache, "export", lambda: {"weights": "a"}, runs[1], _export_into(runs[1], calls), OnnxExport)
    assert calls == [runs[0]] and cache.hits == ["export"]
    assert again == OnnxExport(path=runs[1] / "onnx" / "model.onnx", kv_layers=3, input_names=("input_ids",),
                               output_names=("logits",))
    assert (runs[1] / "onnx" / "model.onnx").read_text() == "built in run0" and first.path.parent == runs[0] / "onnx"
    [entry] = (tmp_path / "cache" / "export").iterdir()
    assert sorted(p.name for p in (entry / "files").iterdir()) == ["onnx"]  # run.log was there before the stage
    cached(cache, "export", {"weights": "b"}, runs[2], _export_into(runs[2], calls), OnnxExport)
    assert calls[-1] == runs[2]  # another key: built
    forced = StageCache(tmp_path / "cache", reuse=False)
    cached(forced, "export", {"weights": "a"}, runs[3], _export_into(runs[3], calls), OnnxExport)
    assert calls[-1] == runs[3] and forced.hits == []
    assert json.loads((entry / "value.json").read_text())["path"] == "{run}/onnx/model.onnx"
    assert (entry / "files" / "onnx" / "model.onnx").read_text() == "built in run3"  # replaced
