"""Reading recipes and targets files: YAML -> plain data with paths resolved -> typed blocks.

Every problem pydantic finds becomes one line naming its path in the YAML (`drop.colour: unknown key 'colour';
allowed here: joint, attention, mlp, blocks`), and all of them are raised together as one RecipeError.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from ..errors import RecipeError
from .paths import resolve_path
from .recipe import Recipe
from .targets import Target

# Recipe fields that hold paths, as (block, key); each value is one path or a list of paths.
PATH_FIELDS = (("model", "path"), ("calibration", "files"), ("heal", "files"), ("validate", "files"),
               ("validate", "distractor_files"), ("output", "dir"))
TARGET_PATH_FIELDS = ("root", "key_file")


def parse_recipe(data, source: str = "recipe", base: Path | None = None) -> Recipe:
    """A Recipe from plain data (a parsed YAML mapping); relative paths are taken from `base` when given."""
    if not isinstance(data, dict):
        raise RecipeError([f"expected a mapping of blocks at the top level, found {type(data).__name__}"], source)
    if base is not None:
        data = _resolve_paths(data, base)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError([describe(err, Recipe) for err in e.errors()], source) from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    text = _read_yaml_file(path)
    return parse_recipe(text, str(path), base=path.parent)


def load_targets(path: str | Path) -> list:
    """The `targets:` list of a YAML file (entries as in a recipe's validate.targets), typed and resolved."""
    path = Path(path)
    data = _read_yaml_file(path)
    if not isinstance(data, dict) or not isinstance(data.get("targets"), list):
        raise RecipeError(["expected a top-level `targets:` list (entries as in a recipe's validate.targets)"],
                          str(path))
    entries = [_resolve_target_paths(t, path.parent) for t in data["targets"]]
    try:
        return TypeAdapter(list[Target]).validate_python(entries)
    except ValidationError as e:
        raise RecipeError([f"targets.{describe(err, list[Target])}" for err in e.errors()],
                          str(path)) from None


def _read_yaml_file(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:  # missing, unreadable, a NUL byte or an over-long name in the path
        reason = "file not found" if isinstance(e, FileNotFoundError) else f"cannot be read ({e})"
        raise RecipeError([f"{reason}: {str(path)[:300]}"], str(path)[:300]) from None
    except UnicodeDecodeError as e:
        raise RecipeError([f"not UTF-8 text ({e})"], str(path)) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError([f"not valid YAML: {e}"], str(path)) from None


def _resolve_paths(data: dict, base: Path) -> dict:
    """A copy of `data` with every path made absolute (relative to `base`, or packaged:)."""
    data = dict(data)
    for block, key in PATH_FIELDS:
        section = data.get(block)
        if not isinstance(section, dict):
            continue
        value = section.get(key)
        if isinstance(value, str):
            data[block] = {**section, key: resolve_path(value, base)}
        elif isinstance(value, list):
            data[block] = {**section, key: [resolve_path(p, base) if isinstance(p, str) else p for p in value]}
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("candidates"), list):
        data["model"] = {**model, "candidates": [{**c, "path": resolve_path(c["path"], base)} if isinstance(
            c, dict) and isinstance(c.get("path"), str) else c for c in model["candidates"]]}
    validate = data.get("validate")
    if isinstance(validate, dict) and isinstance(validate.get("targets"), list):
        data["validate"] = {**validate, "targets": [_resolve_target_paths(t, base) for t in validate["targets"]]}
    return data


def _resolve_target_paths(target, base: Path):
    if not isinstance(target, dict):
        return target
    return {**target, **{k: resolve_path(target[k], base) for k in TARGET_PATH_FIELDS
                          if isinstance(target.get(k), str) and not target[k].startswith("~")}}


# ---------------------------------------------------------------- error messages

def describe(err: dict, root) -> str:
    """One line for one pydantic error: where, what was wrong, what was found; for an unknown key, the keys
    allowed at that place (found by walking the annotations from `root`, through optional blocks, lists,
    dicts and `kind`-tagged unions)."""
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = allowed_keys(root, err["loc"][:-1])
        return f"{where}: unknown key '{err['loc'][-1]}'; allowed here: {', '.join(allowed) or '(none)'}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"{where}: {msg}"
    found = repr(err["input"])
    return f"{where}: {msg} (got {found[:80] + '...' if len(found) > 80 else found})"


def allowed_keys(root, loc: tuple) -> list[str]:
    tp = root
    for part in loc:
        tp = _step(_unwrap(tp), part)
        if tp is None:
            return []
    block = _unwrap(tp)
    if isinstance(block, type) and issubclass(block, BaseModel):
        return [f.alias or n for n, f in block.model_fields.items()]
    return []


def _unwrap(tp):
    """Strip Annotated and Optional: the type that a value at this place is validated as."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) == 1:
                tp = members[0]
                continue
        return tp


def _step(tp, part):
    """The annotation one step below `tp` along the error location `part`."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = next((f for n, f in tp.model_fields.items() if part in (n, f.alias)), None)
        return None if field is None else field.annotation
    if origin is list and isinstance(part, int):
        return typing.get_args(tp)[0]
    if origin is dict:
        return typing.get_args(tp)[1]
    if origin in (typing.Union, types.UnionType):  # tagged union: `part` is the tag
        for member in typing.get_args(tp):
            kind = getattr(member, "model_fields", {}).get("kind")
            if kind is not None and part in typing.get_args(kind.annotation):
                return member
    return None
