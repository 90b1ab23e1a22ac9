"""The recipe reference (docs/recipe-reference.md), generated from the recipe blocks themselves.

`make docs` writes it; a test fails when the committed file differs from what this module generates, so the
reference cannot drift from the schema.
"""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .recipe import Recipe

HEADER = """# Recipe reference

Generated from the recipe's schema by `make docs` (`slimformer docs --out docs/recipe-reference.md`); do not
edit by hand. Every block is strict: an unknown key is an error that lists the keys allowed there. Paths are
relative to the recipe file; `packaged:<file>` names a text in the packaged corpus. `slimformer schema` prints
the same schema as JSON Schema for editors.
"""


def recipe_reference() -> str:
    sections, seen = [], set()
    _block(Recipe, "(top level)", sections, seen)
    return HEADER + "\n" + "\n".join(sections)


def _block(cls: type[BaseModel], where: str, sections: list[str], seen: set) -> None:
    if cls in seen:
        return
    seen.add(cls)
    doc = " ".join((cls.__doc__ or "").split()) if cls.__doc__ and cls.__module__.startswith("pipeline") else ""
    lines = [f"## `{where}`" + (f": {cls.__name__}" if where != "(top level)" else ""), ""]
    if doc:
        lines += [doc, ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for name, field in cls.model_fields.items():
        key = field.alias or name
        lines.append(f"| `{key}` | {_type(field.annotation)} | {_default(field)} | "
                     f"{(field.description or '').replace('|', '/')} |")
        for sub in _blocks_in(field.annotation):
            nested.append((sub, f"{where}.{key}" if where != "(top level)" else key))
    sections.append("\n".join(lines) + "\n")
    for sub, path in nested:
        tag = sub.model_fields.get("kind")
        label = f"{path}[kind: {typing.get_args(tag.annotation)[0]}]" if tag is not None and _is_tagged(sub) else path
        _block(sub, label, sections, seen)


def _is_tagged(cls) -> bool:
    kind = cls.model_fields.get("kind")
    return kind is not None and typing.get_origin(kind.annotation) is typing.Literal


def _blocks_in(tp) -> list[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [b for arg in typing.get_args(tp) for b in _blocks_in(arg)]


def _type(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _type(typing.get_args(tp)[0])
    if origin is typing.Literal:
        return " / ".join(f"`{a}`" for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type(typing.get_args(tp)[0])}"
    if origin is dict:
        key, value = typing.get_args(tp)
        return f"map of {'name' if key is str else _type(key)} to {_type(value)}"
    if tp is type(None):
        return "null"
    return f"`{getattr(tp, '__name__', str(tp))}`"


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.default if field.default is not PydanticUndefined else field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(block defaults)"
    return f"`{value}`" if value not in (None, [], {}) else ("`null`" if value is None else f"`{value}`")
