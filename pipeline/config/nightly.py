"""The nightly file (`slimformer nightly NIGHTLY.yaml`): which recipes, which registry and tag, the regression limits.

Strict like every recipe block. Paths (recipes, a local registry, the report folder) are relative to the nightly
file; an `oci://` registry is kept as written. `load_nightly` also loads every recipe it names, so a broken recipe
stops the night before any work, with every problem at once.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError, field_validator

from ..errors import RecipeError
from .base import Block, RecipePath
from .loading import _read_yaml_file, describe, load_recipe
from .paths import resolve_path

TAG_RULE = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$"


class RegressionLimits(Block):
    """How much worse than the tagged version a new model may be, per variant both versions have; null turns a
    limit off. A variant whose file is byte-identical to the tagged one cannot regress."""

    max_perplexity_increase_pct: float | None = Field(
        1.0, ge=0, description="Refuse to publish if held-out perplexity rises by more than this percentage.")
    max_mc_accuracy_drop: float | None = Field(
        0.01, ge=0, description="Refuse to publish if multiple-choice accuracy falls by more than this (absolute).")
    max_file_size_increase_pct: float | None = Field(
        1.0, ge=0, description="Refuse to publish if the ONNX file (with external data) grows by more than this "
        "percentage.")
    max_decode_slowdown_pct: float | None = Field(
        25.0, ge=0, description="Refuse to publish if decode ms/token p50 (interleaved rounds, this machine) rises "
        "by more than this percentage. Shared machines drift about 20 % between runs: keep it loose there.")


class CompareSpec(Block):
    """The side-by-side measurement of tonight's model against the tagged version."""

    variants: list[str] | None = Field(
        None, description="Variants to compare (e.g. [compressed, int4]); null: every variant both versions have.")
    latency_rounds: int = Field(3, ge=1, le=20, description="Interleaved latency rounds (previous, new, ...); "
                                "the median per file.")


class NightlySpec(Block):
    recipes: list[RecipePath] = Field(..., min_length=1, description="Recipe files, relative to this file; each "
                                      "recipe's `name` is its name in the registry.")
    registry: str = Field(..., min_length=1, description="A local folder (relative to this file) or "
                          "oci://host[:port]/repository.")
    tag: str = Field("nightly", pattern=TAG_RULE, description="The tag each new model is compared with, and "
                     "moved to it (with `latest`) when no limit is crossed.")
    limits: RegressionLimits = Field(default_factory=RegressionLimits, description="Regression limits.")
    compare: CompareSpec = Field(default_factory=CompareSpec, description="Side-by-side comparison settings.")
    out: RecipePath = Field(Path("runs/nightly"), description="Folder for history.jsonl, summary.md and "
                            "trend.png, relative to this file.")
    cpus_per_recipe: float = Field(2, gt=0, description="CPUs each recipe's Ray task declares (with --ray).")
    cache_keep_days: float = Field(14, gt=0, description="Stage cache entries unused this long are removed after "
                                   "the night.")

    @field_validator("recipes")
    @classmethod
    def _distinct(cls, recipes):
        if len(set(recipes)) != len(recipes):
            raise ValueError("a recipe is listed twice")
        return recipes


def load_nightly(path: str | Path, registry: str | None = None) -> NightlySpec:
    """The nightly file, typed, with paths resolved; every recipe it names loaded and checked (names distinct).
    `registry` replaces the file's (a relative folder is then relative to the working folder)."""
    path = Path(path).absolute()  # absolute paths: Ray workers and later runs may have another working folder
    data = _read_yaml_file(path)
    if not isinstance(data, dict):
        raise RecipeError(["expected a mapping with recipes, registry, tag, limits"], str(path))
    data = dict(data, **({"registry": registry} if registry else {}))
    if isinstance(data.get("recipes"), list):
        data["recipes"] = [resolve_path(p, path.parent) if isinstance(p, str) else p for p in data["recipes"]]
    for key in ("out", "registry"):
        if isinstance(data.get(key), str) and not data[key].startswith("oci://"):
            data[key] = resolve_path(data[key], path.parent)
    try:
        spec = NightlySpec.model_validate(data)
    except ValidationError as e:
        raise RecipeError([describe(err, NightlySpec) for err in e.errors()], str(path)) from None
    problems, names = [], {}
    for recipe_path in spec.recipes:
        try:
            recipe = load_recipe(recipe_path)
        except RecipeError as e:
            problems += [f"{recipe_path}: {p}" for p in e.problems]
            continue
        if recipe.name in names:
            problems.append(f"{recipe_path}: name '{recipe.name}' is also the name of {names[recipe.name]}; each "
                            "recipe publishes under its name, so names must differ")
        names[recipe.name] = recipe_path
    if problems:
        raise RecipeError(problems, str(path))
    return spec
