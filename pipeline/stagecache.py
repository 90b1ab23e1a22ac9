"""The stage cache: a stage's output, reused when everything it depends on is unchanged (used by `nightly`).

An entry is keyed by content: the stage's inputs (the source model's hash and the sha256 of every input file),
the recipe blocks it reads, the sha256 of the package's code and the library versions. It holds the stage's
returned record (paths inside the run folder stored relative to it) and a copy of the top-level entries the stage
added to the run folder. Entries are written atomically; an unreadable one is rebuilt. Latency is never cached.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from functools import cache
from pathlib import Path

from pydantic import TypeAdapter

from .rundir import library_versions, sha256_file, sha256_json, staged_folder

RUN = "{run}"  # stands for the run folder in stored records


@cache
def code_sha256() -> str:
    """sha256 of every module of the package: any code change invalidates every entry (coarse, never stale)."""
    root = Path(__file__).parent
    return sha256_json({str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*.py"))})


def folder_sha256(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


class StageCache:
    """`cache(stage, key, folder, build, kind)`: build() once per key. `reuse=False` rebuilds and replaces."""

    def __init__(self, root: Path, reuse: bool = True):
        self.root, self.reuse = Path(root), reuse
        self.hits: list[str] = []

    def __call__(self, stage: str, key: dict, folder: Path, build, kind):
        full = {"stage": stage, **key, "code": code_sha256(), "libraries": library_versions()}
        entry = self.root / stage / sha256_json(full)[:24]
        if self.reuse and (entry / "value.json").is_file():
            try:
                value = self._restore(entry, Path(folder), kind)
            except (OSError, ValueError):
                pass  # damaged entry: rebuild it below
            else:
                self.hits.append(stage)
                os.utime(entry)
                return value
        before = set(os.listdir(folder))
        value = build()
        self._store(entry, full, value, Path(folder), sorted(set(os.listdir(folder)) - before), kind)
        return value

    def _restore(self, entry: Path, folder: Path, kind):
        for item in sorted((entry / "files").iterdir()):
            if item.is_dir():
                shutil.copytree(item, folder / item.name)
            else:
                shutil.copy2(item, folder / item.name)
        text = (entry / "value.json").read_text().replace(json.dumps(RUN)[1:-1], json.dumps(str(folder))[1:-1])
        return TypeAdapter(kind).validate_json(text)

    def _store(self, entry: Path, key: dict, value, folder: Path, added: list[str], kind) -> None:
        if entry.exists():  # only when not reusing: replace it
            shutil.rmtree(entry, ignore_errors=True)
        text = TypeAdapter(kind).dump_json(value).decode()
        with staged_folder(entry) as tmp:
            (tmp / "files").mkdir()
            for name in added:
                source = folder / name
                (shutil.copytree if source.is_dir() else shutil.copy2)(source, tmp / "files" / name)
            (tmp / "value.json").write_text(text.replace(json.dumps(str(folder))[1:-1], json.dumps(RUN)[1:-1]))
            (tmp / "key.json").write_text(json.dumps(key, indent=1, default=str))

    def prune(self, keep_days: float) -> int:
        """Remove entries not used for `keep_days`; returns how many went."""
        limit, removed = time.time() - keep_days * 86400, 0
        for entry in self.root.glob("*/*"):
            if entry.is_dir() and not entry.name.startswith(".") and entry.stat().st_mtime < limit:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed


def accuracy_folder(cache: StageCache | None) -> Path | None:
    """Where `validate` keeps the variants' accuracy (its own atomic entries, keyed by file and tokens)."""
    return cache.root / "accuracy" if cache is not None and cache.reuse else None


def reused(cache: StageCache | None, validation) -> tuple[str, ...]:
    """What this run took from the cache: stages, then variants whose accuracy was not scored again."""
    return (*(cache.hits if cache else ()), *(f"accuracy of {name}" for name, m in validation.models.items()
                                             if name != "original" and m.accuracy_cached))


def cached(cache: StageCache | None, stage: str, key, folder: Path, build, kind):
    """build() through `cache` when there is one. `key` is a dict, or a function returning one (so that hashing
    the inputs costs nothing without a cache)."""
    if cache is None:
        return build()
    return cache(stage, key() if callable(key) else key, folder, build, kind)


# ---------------------------------------------------------------- what each cached stage depends on

def score_key(recipe, source_sha256: str) -> dict:
    cal = recipe.calibration
    return {"source": source_sha256, "model": recipe.model.model_dump(mode="json", exclude={"path"}),
            "calibration": cal.model_dump(mode="json", exclude={"files"}),
            "calibration_files": None if cal.files is None else [sha256_file(f) for f in cal.files],
            "score": recipe.score.model_dump(mode="json"),
            "window": recipe.drop.window.model_dump(mode="json") if recipe.drop.window else None}


def export_key(recipe, source_sha256: str, folder: Path) -> dict:
    """The pruned (or healed) model as saved in hf/, the graph kind, the opset and the rotary caches' length."""
    return {"source": source_sha256, "model": folder_sha256(folder / "hf"), "graph": recipe.export.graph,
            "opset": recipe.export.opset, "max_length": recipe.export.max_length}


def quantize_key(recipe, source_sha256: str, folder: Path) -> dict:
    """The fp32 export (a function of the pruned model), the entries, and the calibration text that GPTQ and
    mixed precision read."""
    cal = recipe.calibration
    return {"source": source_sha256, "onnx": folder_sha256(folder / "onnx"),
            "quantize": [q.model_dump(mode="json") for q in recipe.quantize],
            "calibration": cal.model_dump(mode="json", exclude={"files"}),
            "calibration_files": None if cal.files is None else [sha256_file(f) for f in cal.files]}


def package_key(recipe, source_sha256: str, folder: Path, variants: dict[str, Path]) -> dict:
    return {"source": source_sha256, "model": folder_sha256(folder / "hf"),
            "variants": {name: folder_sha256(Path(path).parent) for name, path in variants.items()},
            "export": recipe.export.model_dump(mode="json")}
