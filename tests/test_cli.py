import json
import subprocess
import sys

import pytest

from pipeline.cli import main
from pipeline.rundir import staged_folder, write_manifest


def test_import_and_help_stay_light():
    code = ("import sys, pipeline.cli, pipeline.recipe, pipeline.run, pipeline.ort_runner; "
            "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'optimum', 'coremltools') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_schema_command_prints_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False and "drop" in schema["properties"]


def test_broken_recipe_exits_nonzero_naming_each_problem_and_writes_nothing(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"name: bad\ndrop: {{attention: two, colour: red}}\noutput: {{dir: {tmp_path / 'runs'}}}\n"
                      "model: {source: hf, path: does/not/exist}\n")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "drop.attention" in err and "unknown key 'colour'" in err
    assert not (tmp_path / "runs").exists()


def test_missing_model_path_is_named_before_any_work(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {{source: hf, path: nowhere}}\noutput: {{dir: {tmp_path / 'runs'}}}\n")
    assert main(["run", str(recipe)]) == 2
    assert f"model.path: {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_staged_folder_is_removed_on_failure_and_renamed_on_success(tmp_path):
    final = tmp_path / "runs" / "x"
    with pytest.raises(RuntimeError):
        with staged_folder(final) as tmp:
            (tmp / "half.bin").write_bytes(b"1")
            raise RuntimeError("boom")
    assert list((tmp_path / "runs").iterdir()) == []
    with staged_folder(final) as tmp:
        (tmp / "a.txt").write_text("a")
        write_manifest(tmp, {"k": 1})
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["files"]["a.txt"]["sha256"].startswith("ca978112")  # sha256("a")
    assert manifest["libraries"]["torch"] and manifest["k"] == 1
