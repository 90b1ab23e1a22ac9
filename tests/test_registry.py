"""publish / pull / ls against the embedded (local folder) registry, on one tiny finished run: round trip with
every sha256 checked against the run's manifest, tampered and truncated blobs refused by name, and SIGKILL
during publish and during pull (a real process, killed while it is writing)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.registry.layout import version_name
from pipeline.rundir import sha256_file, write_manifest

REPO = Path(__file__).resolve().parents[1]


def run_manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def assert_pulled_matches_run(pulled: Path, run_dir: Path, folder: str) -> None:
    files = run_manifest(run_dir)["files"]
    got = {str(p.relative_to(pulled)) for p in pulled.rglob("*") if p.is_file()}
    assert {f for f in got if "/" in f} == {f for f in files if f.startswith(folder + "/")}
    for rel in got - {"manifest.json"}:
        assert sha256_file(pulled / rel) == files[rel]["sha256"], rel
    assert sha256_file(pulled / "manifest.json") == sha256_file(run_dir / "manifest.json")


def test_publish_pull_and_ls_round_trip(tiny_run, tmp_path, capsys):
    registry = tmp_path / "registry"
    assert main(["publish", str(tiny_run), "--to", str(registry), "--tag", "nightly"]) == 0
    assert main(["publish", str(tiny_run), "--to", str(registry)]) == 0  # the same version: only tags move
    assert "is already published" in capsys.readouterr().err
    assert main(["pull", "tiny:latest", "--from", str(registry), "--variant", "compressed", "--dest",
                 str(tmp_path / "fp32")]) == 0
    assert_pulled_matches_run(tmp_path / "fp32", tiny_run, "onnx")
    assert main(["pull", "tiny:nightly", "--from", str(registry), "--variant", "int4", "--dest",
                 str(tmp_path / "int4")]) == 0
    assert_pulled_matches_run(tmp_path / "int4", tiny_run, "onnx-int4")
    # the local registry is an OCI image layout per name (the stock CLI reads it with --oci-layout)
    index = json.loads((registry / "tiny" / "index.json").read_text())
    refs = sorted(m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"])
    version = version_name(tiny_run, run_manifest(tiny_run))
    assert refs == sorted([version, "latest", "nightly"])
    assert json.loads((registry / "tiny" / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    capsys.readouterr()
    assert main(["ls", str(registry), "tiny"]) == 0
    table = capsys.readouterr().out
    report = json.loads((tiny_run / "report.json").read_text())["validation"]["models"]
    assert f"| {version} | latest nightly | int4 | onnx | {report['int4']['perplexity']:.3f} |" in table
    assert main(["ls", str(registry)]) == 0
    assert "tiny: 1 version(s); tags: latest, nightly" in capsys.readouterr().out
    assert main(["pull", f"tiny:{version}", "--from", str(registry), "--variant", "fp16", "--dest",
                 str(tmp_path / "x")]) == 2
    assert "no variant 'fp16' in format 'onnx'; it has: compressed (hf), compressed (onnx), int4 (onnx)" in \
        capsys.readouterr().err


def test_manifest_and_annotations_describe_every_file(tiny_run, tmp_path):
    from pipeline.registry import open_store
    from pipeline.registry.ops import publish

    store = open_store(tmp_path / "registry")
    info = publish(tiny_run, store)
    manifest, _ = store.manifest("tiny", info.version)
    files = run_manifest(tiny_run)["files"]
    layers = {d["annotations"]["org.opencontainers.image.title"]: d for d in manifest["layers"]}
    assert set(layers) == set(files) | {"manifest.json"}
    for rel, entry in files.items():
        assert layers[rel]["digest"] == f"sha256:{entry['sha256']}" and layers[rel]["size"] == entry["bytes"]
        assert layers[rel]["annotations"]["dev.slimformer.sha256"] == entry["sha256"]
    assert layers["onnx-int4/model.onnx"]["mediaType"] == "application/vnd.slimformer.onnx.v1"
    assert layers["onnx-int4/model.onnx"]["annotations"]["dev.slimformer.variant"] == "int4"
    notes = manifest["annotations"]
    assert notes["dev.slimformer.recipe.sha256"] == run_manifest(tiny_run)["recipe_sha256"]
    assert notes["dev.slimformer.source.sha256"] == run_manifest(tiny_run)["source_model"]["sha256"]
    figures = json.loads(notes["dev.slimformer.figures"])
    measured = json.loads((tiny_run / "report.json").read_text())["validation"]["models"]["compressed"]
    assert figures["compressed"]["perplexity"] == measured["perplexity"]
    assert figures["compressed"]["decode_ms"]["host"] == round(measured["decode_p50_ms"], 3)
    assert figures["compressed"]["kv_kb_per_token"] == measured["kv_kb_per_token"]


@pytest.mark.parametrize("damage", ["tamper", "truncate"])
def test_damaged_blob_is_refused_by_name_and_nothing_stays(tiny_run, tmp_path, capsys, damage):
    registry = tmp_path / "registry"
    assert main(["publish", str(tiny_run), "--to", str(registry)]) == 0
    blob = registry / "tiny" / "blobs" / "sha256" / run_manifest(tiny_run)["files"]["onnx/model.onnx"]["sha256"]
    data = bytearray(blob.read_bytes())
    if damage == "tamper":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 3]
    blob.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["pull", "tiny", "--from", str(registry), "--dest", str(tmp_path / "pulled")]) == 6
    err = capsys.readouterr().err
    assert "onnx/model.onnx: " in err and "nothing was kept" in err
    assert ("truncated: " in err) == (damage == "truncate")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry"]  # no destination, no partial folder


def test_publish_refuses_a_run_folder_changed_since_its_run(tiny_run, tmp_path, capsys):
    copy = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    (copy / "onnx" / "config.json").write_text("{}")
    assert main(["publish", str(copy), "--to", str(tmp_path / "registry")]) == 2
    assert "onnx/config.json: 2 bytes" in capsys.readouterr().err
    assert not (tmp_path / "registry" / "tiny" / "index.json").exists()


def _bigger_run(run_dir: Path, dest: Path) -> Path:
    """A copy of the run with three 48 MB files added and a new manifest: a second, slow-to-copy version."""
    copy = Path(shutil.copytree(run_dir, dest))
    for i in range(3):
        (copy / "onnx" / f"extra-{i}.bin").write_bytes(os.urandom(48 << 20))
    time.sleep(1.1)  # a new created_utc second: a new version name
    manifest = run_manifest(run_dir)
    write_manifest(copy, {k: v for k, v in manifest.items() if k not in ("files", "created_utc", "libraries")})
    return copy


def _kill_while(proc: subprocess.Popen, writing) -> None:
    """SIGSTOP the process once `writing()` finds its temporary folder, check it is still there (so the process
    is frozen mid-write), then SIGKILL it."""
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, f"finished before it could be killed: {proc.communicate()}"
        if writing():
            proc.send_signal(signal.SIGSTOP)
            if writing():
                proc.kill()
                proc.wait()
                return
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.002)
    raise AssertionError("the process never started writing")


def cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_sigkill_during_publish_keeps_the_previous_version_and_tags(tiny_run, tmp_path, capsys):
    registry = tmp_path / "registry"
    assert main(["publish", str(tiny_run), "--to", str(registry), "--tag", "nightly"]) == 0
    before = (registry / "tiny" / "index.json").read_text()
    bigger = _bigger_run(tiny_run, tmp_path / "bigger")
    proc = cli("publish", str(bigger), "--to", str(registry), "--tag", "nightly")
    _kill_while(proc, lambda: any((registry / "tiny").glob(".incoming.partial-*/blob")))
    assert (registry / "tiny" / "index.json").read_text() == before  # no new version, tags untouched
    assert main(["pull", "tiny:nightly", "--from", str(registry), "--dest", str(tmp_path / "pulled")]) == 0
    assert_pulled_matches_run(tmp_path / "pulled", tiny_run, "onnx")
    # the killed writer's folder is cleared by the next publish, which completes
    assert main(["publish", str(bigger), "--to", str(registry), "--tag", "nightly"]) == 0
    assert not list((registry / "tiny").glob(".incoming*"))
    assert main(["pull", "tiny:nightly", "--from", str(registry), "--dest", str(tmp_path / "pulled2")]) == 0
    assert_pulled_matches_run(tmp_path / "pulled2", bigger, "onnx")


def test_sigkill_during_pull_leaves_no_destination(tiny_run, tmp_path):
    registry = tmp_path / "registry"
    bigger = _bigger_run(tiny_run, tmp_path / "bigger")
    assert main(["publish", str(bigger), "--to", str(registry)]) == 0
    dest = tmp_path / "out" / "pulled"
    proc = cli("pull", "tiny", "--from", str(registry), "--dest", str(dest))
    _kill_while(proc, lambda: any(dest.parent.glob(".pulled.partial-*/onnx")))
    assert not dest.exists()
    assert main(["pull", "tiny", "--from", str(registry), "--dest", str(dest)]) == 0
    assert_pulled_matches_run(dest, bigger, "onnx")
    assert sorted(p.name for p in dest.parent.iterdir()) == ["pulled"]  # the killed pull's folder is gone
