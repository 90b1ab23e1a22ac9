"""publish / pull / ls over oci:// against a real registry: Debian's `docker-registry` (the reference OCI
distribution server), started on a free loopback port for each test, with htpasswd basic auth in one. Skipped
only when the binary is absent (`.ci/run` installs it)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from pipeline.cli import main
from test_registry import _bigger_run, _kill_while, assert_pulled_matches_run, cli, run_manifest

BINARY = shutil.which("docker-registry")
pytestmark = pytest.mark.skipif(BINARY is None, reason="docker-registry is not installed (apt-get install "
                                "docker-registry; .ci/run does it)")
USER, PASSWORD = "ci", "s3cret-pass"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _htpasswd(path: Path) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # bcrypt from the C library: the hash docker-registry's htpasswd needs

    # cost 4 (16 rounds): the server checks the password on every request
    path.write_text(f"{USER}:{crypt.crypt(PASSWORD, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))}\n")
    return path


@pytest.fixture
def oci_registry(tmp_path, request):
    """(oci:// URL, storage root) of a docker-registry serving on loopback; `auth` param: htpasswd basic auth."""
    port, root = _free_port(), tmp_path / "storage"
    config = {"version": 0.1, "log": {"level": "error"}, "storage": {"filesystem": {"rootdirectory": str(root)}},
              "http": {"addr": f"127.0.0.1:{port}"}}
    if getattr(request, "param", None) == "auth":
        config["auth"] = {"htpasswd": {"realm": "slimformer-test", "path": str(_htpasswd(tmp_path / "htpasswd"))}}
    (tmp_path / "registry.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "registry.log", "w")
    proc = subprocess.Popen([BINARY, "serve", str(tmp_path / "registry.yml")], stdout=log, stderr=log)
    try:
        deadline = time.time() + 30
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code in (200, 401):
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "registry.log").read_text()
            time.sleep(0.1)
        yield f"oci://127.0.0.1:{port}/slim", root / "docker" / "registry" / "v2"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_publish_pull_ls_and_a_tampered_blob_over_oci(tiny_run, oci_registry, tmp_path, capsys):
    url, storage = oci_registry
    assert main(["publish", str(tiny_run), "--to", url, "--tag", "nightly"]) == 0
    assert main(["pull", "tiny:nightly", "--from", url, "--dest", str(tmp_path / "fp32")]) == 0
    assert_pulled_matches_run(tmp_path / "fp32", tiny_run, "onnx")
    assert main(["pull", "tiny", "--from", url, "--variant", "int4", "--dest", str(tmp_path / "int4")]) == 0
    assert_pulled_matches_run(tmp_path / "int4", tiny_run, "onnx-int4")
    capsys.readouterr()
    assert main(["ls", url]) == 0
    assert "tiny: 1 version(s); tags: latest, nightly" in capsys.readouterr().out
    assert main(["ls", url, "tiny"]) == 0
    assert "| latest nightly | int4 | onnx |" in capsys.readouterr().out
    sha = run_manifest(tiny_run)["files"]["onnx/model.onnx"]["sha256"]
    blob = storage / "blobs" / "sha256" / sha[:2] / sha / "data"
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF  # same size: the server serves it as it is
    blob.write_bytes(bytes(data))
    assert main(["pull", "tiny", "--from", url, "--dest", str(tmp_path / "tampered")]) == 6
    assert "onnx/model.onnx: sha256 " in capsys.readouterr().err
    assert not (tmp_path / "tampered").exists() and not list(tmp_path.glob(".tampered*"))


@pytest.mark.parametrize("oci_registry", ["auth"], indirect=True)
def test_basic_auth_from_the_environment_or_the_docker_credential_file(tiny_run, oci_registry, tmp_path, capsys,
                                                                       monkeypatch):
    import base64

    url, _ = oci_registry
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.docker/config.json of this machine's user
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    assert main(["publish", str(tiny_run), "--to", url]) == 2
    assert "needs credentials: set SLIMFORMER_REGISTRY_USER and SLIMFORMER_REGISTRY_PASSWORD" in capsys.readouterr().err
    monkeypatch.setenv("SLIMFORMER_REGISTRY_USER", USER)
    monkeypatch.setenv("SLIMFORMER_REGISTRY_PASSWORD", "wrong")
    assert main(["publish", str(tiny_run), "--to", url]) == 2
    assert "refused user 'ci' from SLIMFORMER_REGISTRY_USER (HTTP 401)" in capsys.readouterr().err
    monkeypatch.setenv("SLIMFORMER_REGISTRY_PASSWORD", PASSWORD)
    assert main(["publish", str(tiny_run), "--to", url]) == 0
    monkeypatch.delenv("SLIMFORMER_REGISTRY_USER")
    monkeypatch.delenv("SLIMFORMER_REGISTRY_PASSWORD")
    config = tmp_path / "docker"
    config.mkdir()
    host = url.removeprefix("oci://").split("/")[0]
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (config / "config.json").write_text(json.dumps({"auths": {host: {"auth": token}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    assert main(["pull", "tiny", "--from", url, "--dest", str(tmp_path / "pulled")]) == 0
    assert_pulled_matches_run(tmp_path / "pulled", tiny_run, "onnx")


def test_sigkill_during_oci_publish_keeps_the_previous_version_and_tags(tiny_run, oci_registry, tmp_path):
    url, storage = oci_registry
    assert main(["publish", str(tiny_run), "--to", url, "--tag", "nightly"]) == 0
    bigger = _bigger_run(tiny_run, tmp_path / "bigger")
    uploads = storage / "repositories" / "slim" / "tiny" / "_uploads"
    proc = cli("publish", str(bigger), "--to", url, "--tag", "nightly")
    _kill_while(proc, lambda: any(uploads.glob("*/data")))  # the server holds an unfinished upload
    from pipeline.registry import open_store
    from pipeline.registry.ops import versions

    [only] = versions(open_store(url), "tiny")
    assert only.tags == ("latest", "nightly") and only.version != bigger.name
    assert main(["pull", "tiny:nightly", "--from", url, "--dest", str(tmp_path / "pulled")]) == 0
    assert_pulled_matches_run(tmp_path / "pulled", tiny_run, "onnx")
