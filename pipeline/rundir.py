"""The run folder: written under a hidden temporary name, renamed into place only when complete.

A crash, Ctrl-C or bad input leaves no folder that looks like a finished run; the manifest records
sha256 of every file plus library versions, so a mobile team can check what it pulled.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
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
    """Yield an empty temporary sibling of `final`, renamed to `final` only if the block completes.

    On any exception (Ctrl-C included) the temporary folder is deleted. If another process finished
    `final` first, ours is discarded: callers give runs unique names, and cache entries built from the
    same inputs are interchangeable.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, so that the rename stays on one filesystem and is atomic.
    work = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        yield work
        try:
            work.rename(final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def new_run_path(output_dir: Path, name: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path, n = Path(output_dir) / f"{name}-{stamp}", 1
    while path.exists():
        n += 1
        path = Path(output_dir) / f"{name}-{stamp}-{n}"
    return path


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
