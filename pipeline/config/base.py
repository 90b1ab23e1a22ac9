"""The base classes every recipe block derives from, and the shared field types.

`Block`: a strict, frozen pydantic model (unknown keys are errors). `Override`: a block whose fields replace
another block's field by field: the fields a recipe sets (null included) replace, the rest are inherited, and
only the set fields are written back out, so a resolved recipe means the same thing when it is read again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, model_serializer

NAME_PATTERN = r"^[A-Za-z0-9._-]+$"
# POSIX limits on this machine (Linux: 255 bytes per name, 4096 per path); refused at parse time so that no
# file check later fails with an OSError traceback.
NAME_MAX = 255
PATH_MAX = 4096


class Block(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def misplaced(self, fields: tuple[str, ...], where: str, fix: str) -> list[str]:
        """One message per field in `fields` that is set to something other than its default, for fields that
        only apply `where` (another choice of the block); defaults pass so a fully resolved block loads again."""
        declared = type(self).model_fields
        return [f"{name} applies only to {where}; remove it or set {fix}" for name in fields
                if getattr(self, name) != declared[name].get_default(call_default_factory=True)]


class Override(Block):
    """Fields set here replace the inherited block's (null too); unset fields are inherited."""

    def apply(self, base: Block) -> Block:
        return base.model_copy(update={name: getattr(self, name) for name in self.model_fields_set})

    @model_serializer(mode="wrap")
    def _only_what_was_set(self, handler):
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}


def _checked_path(path: Path) -> Path:
    text = os.fspath(path)
    if "\x00" in text:
        raise ValueError("the path contains a NUL byte; write a plain file path")
    if len(os.fsencode(text)) > PATH_MAX:
        raise ValueError(f"the path is {len(os.fsencode(text))} bytes long, over this system's limit of {PATH_MAX}")
    long = [part for part in Path(text).parts if len(os.fsencode(part)) > NAME_MAX]
    if long:
        raise ValueError(f"the name '{long[0][:40]}...' is {len(os.fsencode(long[0]))} bytes long, over this "
                         f"system's limit of {NAME_MAX} per file or folder name")
    return path


# A path from a recipe: relative paths are resolved against the recipe's folder before validation.
RecipePath = Annotated[Path, AfterValidator(_checked_path)]
