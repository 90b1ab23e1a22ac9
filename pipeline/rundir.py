"""The run folder: written under a hidden temporary name, renamed into place only when complete.

A crash, Ctrl-C or bad input leaves no folder that looks like a finished run; the manifest records
sha256 of every file plus library versions, so a mobile team can check what it pulled.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

LIBRARIES = ("slimformer", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "numpy")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@contextmanager
def staged_folder(final: Path):
    """Yield a temporary sibling of `final`; rename it to `final` if the block completes, else delete it."""
    final = Path(final)
    if final.exists():
        raise FileExistsError(f"{final} already exists")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(final)


def new_run_path(output_dir: Path, name: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(output_dir) / f"{name}-{stamp}"


def write_manifest(folder: Path, extra: dict) -> Path:
    """manifest.json: every file's size and sha256, library versions and the caller's hashes."""
    files = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"
    }
    manifest = {"created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "libraries": library_versions(), **extra, "files": files}
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
