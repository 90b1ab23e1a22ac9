import json
import subprocess
import sys

import pytest

from pipeline.cli import main
from pipeline.rundir import staged_folder, write_manifest


def test_import_and_help_stay_light():
    code = ("import sys, pipeline.cli, pipeline.config.loading, pipeline.config.checks, pipeline.config.reference, "
            "pipeline.stages, pipeline.artifacts, pipeline.measure.ort_runner; "
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


def _tiny_gguf(path, arch: str):
    """A GGUF file with the metadata a loader reads first and one small tensor."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_context_length(256)
    writer.add_token_list(["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.zeros((3, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_gguf_architecture_fails_in_seconds_naming_it(tmp_path, capsys):
    import time

    _tiny_gguf(tmp_path / "phi.gguf", "phi3")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: {source: gguf, path: phi.gguf}\n")
    start = time.perf_counter()
    assert main(["run", str(recipe)]) == 2
    assert time.perf_counter() - start < 30
    err = capsys.readouterr().err
    assert "architecture 'phi3' (GGUF general.architecture) is not supported; supported: gemma3_text, llama" in err
    assert not (tmp_path / "runs").exists()


def test_broken_coreml_block_fails_in_seconds_naming_each_problem(tiny_project, capsys):
    import time

    import yaml

    data = yaml.safe_load(tiny_project.read_text())
    data["export"] = {"coreml": {"context_length": 4096, "compression": [{"kind": "linear-int4", "block_size": 48},
                                                                         {"kind": "palettize", "nbits": 5}]}}
    tiny_project.write_text(yaml.safe_dump(data))
    start = time.perf_counter()
    assert main(["run", str(tiny_project)]) == 2
    assert time.perf_counter() - start < 30
    err = capsys.readouterr().err
    assert "export.coreml.compression.1.palettize.nbits" in err  # a schema problem and ...
    data["export"]["coreml"]["compression"].pop()
    tiny_project.write_text(yaml.safe_dump(data))
    assert main(["run", str(tiny_project)]) == 2
    err = capsys.readouterr().err  # ... the problems the model's config reveals, all at once
    assert "context_length: 4096 exceeds the model's max_position_embeddings 256" in err
    assert "block_size 48 does not divide the input width(s) [64, 128]" in err
    assert not (tiny_project.parent / "runs").exists()


def test_console_shows_stages_and_the_log_keeps_library_noise(tiny_project):
    # optimum's exporter warns on every export of a tied model: noise a user should not have to read
    noise = "Found different candidate ONNX initializers"
    tiny_project.write_text(tiny_project.read_text().replace("name: tiny", "name: tiny\nexport: {graph: optimum}"))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(tiny_project)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("[") for line in lines), lines  # stage lines, nothing else
    assert "[13/13] report done" in proc.stderr and "wall time:" in proc.stdout
    [final] = (tiny_project.parent / "runs").iterdir()
    assert noise in (final / "run.log").read_text()
    verbose = subprocess.run([sys.executable, "-m", "pipeline.cli", "--verbose", "run", str(tiny_project)],
                             capture_output=True, text=True, timeout=600)
    assert verbose.returncode == 0 and noise in verbose.stderr


def test_recipe_reference_in_docs_is_generated_from_the_schema():
    from pathlib import Path

    from pipeline.config.reference import recipe_reference

    committed = Path(__file__).resolve().parents[1] / "docs" / "recipe-reference.md"
    assert committed.read_text() == recipe_reference(), "docs/recipe-reference.md is stale: run `make docs`"
