"""Budgeted runs end to end on a tiny model: a budget below the smallest reachable model exits 2 before any work
and leaves no folder; a memory budget writes the chosen model with its Pareto plot and predicted vs measured
footprint; a ladder writes ladder.json with a rung per budget that the reference picker chooses from."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import save_tiny_folder, synthetic_text
from pipeline import picker
from pipeline.cli import main


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny model, texts and a base recipe; one cache home for the module (the target is calibrated once)."""
    root = tmp_path_factory.mktemp("budget")
    texts = {name: synthetic_text(seed) for seed, name in enumerate(("calib", "eval", "distract"))}
    for name, text in texts.items():
        (root / f"{name}.txt").write_text(text)
    save_tiny_folder(root / "model", texts=list(texts.values()))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLIMFORMER_HOME", str(root / "home"))
        yield root


def recipe(root, name: str, budget: dict) -> str:
    data = {"name": name, "model": {"source": "hf", "path": "model"},
            "calibration": {"files": ["calib.txt"], "samples": 4, "seq_len": 32},
            "validate": {"files": ["eval.txt"], "distractor_files": ["distract.txt"], "perplexity_windows": 2,
                         "seq_len": 32, "mc_items": 5, "parity_decode_steps": 4,
                         "latency": {"prefill_tokens": 8, "decode_context": 16, "decode_steps": 4, "rounds": 1}},
            "budget": {"context": 64, **budget, "search": {
                "generations": 3, "offspring": 3, "selection": [{"windows": 1, "keep": 2}, {"windows": 2, "keep": 1}],
                "sensitivity_windows": 1, "heldout_windows": 2, "heldout_points": 3, "baseline_drops": [0, 1]}},
            "output": {"dir": "runs"}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_an_impossible_budget_exits_2_with_the_smallest_figure_and_leaves_no_folder(project, capsys):
    assert main(["run", recipe(project, "impossible", {"max_file_mb": 0.01})]) == 2
    err = capsys.readouterr().err
    assert "budget.max_file_mb: 0.01 MB is below the smallest file this search can reach" in err
    assert "3 of 4 attention and 0 of 4 MLP sublayers dropped" in err and "raise budget.max_file_mb" in err
    assert not (project / "runs").exists() or not any((project / "runs").iterdir())


def test_an_impossible_memory_budget_is_checked_on_the_smallest_kv_precision_alone(project, capsys, tmp_path,
                                                                                 monkeypatch):
    """The check needs only the smallest structure, so only its KV precision is calibrated before exiting 2."""
    monkeypatch.setenv("SLIMFORMER_HOME", str(tmp_path / "home"))
    assert main(["run", recipe(project, "impossible-memory", {"max_memory_mb": 1})]) == 2
    err = capsys.readouterr().err
    assert "budget.max_memory_mb: 1 MB is below the smallest peak memory this search can reach" in err
    keys = [json.loads(p.read_text()) for p in (tmp_path / "home" / "footprint").glob("*/key.json")]
    assert [k["kv"] for k in keys] == ["fp16"]


def test_a_memory_budget_writes_the_chosen_model_and_its_predicted_and_measured_footprint(project):
    assert main(["run", recipe(project, "memory", {"max_file_mb": 0.3, "max_memory_mb": 400})]) == 0
    run = next((project / "runs").glob("memory-*"))
    for name in ("pareto.json", "pareto.png", "budget.json", "sensitivities.json", "report.md",
                 "onnx-budget/model.onnx", "manifest.json"):
        assert (run / name).is_file(), name
    b = json.loads((run / "budget.json").read_text())
    assert b["predicted"]["file_mb"] == pytest.approx(b["measured"]["file_mb"], rel=0.01)
    assert b["measured"]["file_mb"] <= 0.3 and b["predicted"]["memory_mb"] is not None
    assert b["predicted"]["memory_mb"] == pytest.approx(b["measured"]["memory_mb"], rel=0.15)
    pareto = json.loads((run / "pareto.json").read_text())
    assert pareto["chosen"]["budget"] < len(pareto["points"]) and pareto["frontier"]
    report = (run / "report.md").read_text()
    assert "## Budget: budget" in report and "| peak memory MB |" in report


def test_a_ladder_writes_a_rung_per_budget_that_the_picker_chooses_from(project):
    rungs = [{"name": "large", "max_file_mb": 0.4}, {"name": "medium", "max_file_mb": 0.2},
             {"name": "small", "max_file_mb": 0.12}]
    assert main(["run", recipe(project, "ladder", {"ladder": rungs})]) == 0
    run = next((project / "runs").glob("ladder-*"))
    ladder = json.loads((run / "ladder.json").read_text())
    assert [r["name"] for r in ladder["rungs"]] != [] and len(ladder["rungs"]) == 3
    assert [r["perplexity"] for r in ladder["rungs"]] == sorted(r["perplexity"] for r in ladder["rungs"])
    for r in ladder["rungs"]:
        assert (run / r["files"]["onnx"]).is_file() and r["file_mb"] <= r["limits"]["max_file_mb"]
        assert r["kv_factor"] >= 1  # its KV precision's measured cost of a KV MiB: at least the cache itself
    usable = [r for r in ladder["rungs"] if not r["dominated_by"]]
    best, roomy = usable[0], max(r["memory_mb"] for r in ladder["rungs"]) + 1
    assert picker.pick(ladder, free_mb=roomy)["name"] == best["name"]
    fallback = picker.pick(ladder, free_mb=roomy, failed=(best["name"],))
    assert (fallback["name"] if fallback else None) == (usable[1]["name"] if len(usable) > 1 else None)
    assert picker.pick(ladder, free_mb=1) is None
    assert (run / "pareto.png").is_file() and "# Model ladder" in (run / "report.md").read_text()


def test_candidate_models_each_rung_from_the_one_with_the_fewest_bits_per_byte(project, capfd):
    """A second source model (more layers, a larger vocabulary, so other tokens): a rung only the first can reach
    comes from it; a rung both reach comes from the one whose choice has the fewest bits per byte."""
    save_tiny_folder(project / "model-b", texts=[synthetic_text(s) for s in range(3)], vocab_size=400,
                     num_hidden_layers=6)
    path = recipe(project, "candidates", {"ladder": [{"name": "roomy", "max_file_mb": 0.5},
                                                     {"name": "tight", "max_file_mb": 0.1}]})
    data = yaml.safe_load(open(path))
    data["model"]["candidates"] = [{"source": "hf", "path": "model-b"}]
    open(path, "w").write(yaml.safe_dump(data))
    assert main(["run", path]) == 0
    assert "budget tight: out of model-b's reach (its smallest: file 0.1 MB); not searched" in capfd.readouterr().err
    run = next((project / "runs").glob("candidates-*"))
    ladder = json.loads((run / "ladder.json").read_text())
    assert set(ladder["models"]) >= {r["model"] for r in ladder["rungs"]}
    rungs = {r["name"]: r for r in ladder["rungs"]}
    budgets = {name: json.loads((run / "rungs" / name / "budget.json").read_text()) for name in rungs}
    assert rungs["tight"]["model"] == "model" and set(budgets["tight"]["compared"]) == {"model"}  # b's least is 0.12 MB
    compared = budgets["roomy"]["compared"]
    assert set(compared) == {"model", "model-b"} and rungs["roomy"]["model"] == min(compared, key=compared.get)
    assert [r["bits_per_byte"] for r in ladder["rungs"]] == sorted(r["bits_per_byte"] for r in ladder["rungs"])
    for key in ("model", "model-b"):
        assert (run / "candidates" / key / "pareto.png").is_file() and (run / "candidates" / key / "scores.json").is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    assert len(manifest["candidate_models"]) == 1 and "model-b" in manifest["candidate_models"][0]["description"]


def test_a_budget_no_candidate_reaches_names_the_smallest_of_them_and_candidates_need_a_budget(project, capsys):
    save_tiny_folder(project / "model-c", texts=[synthetic_text(0)], num_hidden_layers=6)
    path = recipe(project, "unreachable", {"max_file_mb": 0.05})
    data = yaml.safe_load(open(path))
    data["model"]["candidates"] = [{"source": "hf", "path": "model-c"}]
    open(path, "w").write(yaml.safe_dump(data))
    assert main(["run", path]) == 2
    err = capsys.readouterr().err
    assert "budget.max_file_mb: 0.05 MB is below the smallest file this search can reach, 0.09 MB (model: 3 of 4 " in err
    del data["budget"]
    open(path, "w").write(yaml.safe_dump(data))
    assert main(["run", path]) == 2
    assert "model.candidates: only a budgeted run chooses among source models" in capsys.readouterr().err
