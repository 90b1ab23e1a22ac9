"""The recipe: YAML parsed into strict, typed config blocks, one pydantic model per block.

Unknown keys and wrong types are rejected with their path in the YAML; every problem is reported at
once. `check_against_model` holds the checks that need the model's shape (drop counts vs layers).
`Recipe.model_json_schema()` is what `slimformer schema` prints for editors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .coreml_export import CoreMLSpec
from .errors import RecipeError
from .quantize import QuantSpec
from .targets import Target, target_problems, unready_targets


class Block(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Block):
    source: Literal["packaged", "hf", "gguf"] = Field(
        "packaged", description="packaged: a model shipped in a Python package; hf: a local Hugging Face "
        "folder (safetensors only); gguf: a local .gguf file.")
    name: str | None = Field("smollm2-135m", description="Packaged model name (source: packaged).")
    path: Path | None = Field(None, description="Folder (hf) or .gguf file (gguf), relative to the recipe.")

    @model_validator(mode="after")
    def _path_matches_source(self):
        if self.source in ("hf", "gguf") and self.path is None:
            raise ValueError(f"source '{self.source}' needs 'path' (a {'folder' if self.source == 'hf' else '.gguf file'})")
        return self


class CalibrationSpec(Block):
    files: list[Path] | None = Field(
        None, description="UTF-8 text files to calibrate on; omit for the packaged calibration split.")
    samples: int = Field(32, ge=1, le=4096, description="Number of calibration windows.")
    seq_len: int = Field(256, ge=8, le=8192, description="Tokens per calibration window.")
    batch_size: int = Field(4, ge=1, le=256, description="Windows per forward pass.")


class ScoreSpec(Block):
    metric: Literal["cosine"] = Field(
        "cosine", description="Importance S = 1 - cos(X, X + f(Norm(X))), mean over calibration tokens.")


class DropSpec(Block):
    joint: int = Field(0, ge=0, description="Drop the N least important sublayers, attention and MLP ranked together.")
    attention: int = Field(0, ge=0, description="Drop the N least important attention sublayers (and their KV cache).")
    mlp: int = Field(0, ge=0, description="Drop the N least important MLP sublayers.")
    blocks: int = Field(0, ge=0, description="Drop the N least important whole blocks (attention and MLP).")

    @model_validator(mode="after")
    def _one_method(self):
        if self.joint and (self.attention or self.mlp or self.blocks):
            raise ValueError("'joint' ranks every sublayer together: use it alone, without attention/mlp/blocks")
        if self.blocks and (self.attention or self.mlp):
            raise ValueError("'blocks' drops whole blocks: use it alone, without attention/mlp")
        return self

    @property
    def method(self) -> str:
        if self.joint:
            return "joint"
        if self.blocks:
            return "blocks"
        kinds = [k for k in ("attention", "mlp") if getattr(self, k)]
        return "+".join(kinds) or "none"


DEFAULT_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class HealSpec(Block):
    """A short fine-tune of the pruned model, run after dropping and before export."""

    objective: Literal["distill", "next-token", "distill+next-token"] = Field(
        "distill", description="distill: KL(teacher || student) between the undropped model's and the pruned "
        "model's next-token distributions at `temperature` (needs no labels, keeps the student close to the "
        "original everywhere). next-token: cross-entropy on the training text. distill+next-token: their sum.")
    temperature: float = Field(
        1.0, gt=0, description="distill: softmax temperature of both distributions; the KL term is multiplied "
        "by temperature^2 so that its gradient scale does not depend on it.")
    hidden_mse_weight: float = Field(
        0.0, ge=0, description="distill: weight of an extra mean squared error between student and teacher "
        "hidden states at every decoder layer output (the last one after the final norm, as transformers "
        "reports it); 0 turns it off. The pruned model keeps every decoder layer, so the states align 1:1.")
    train: Literal["lora", "norms", "mlp-near-dropped", "all"] = Field(
        "lora", description="What trains. lora: low-rank adapters on `lora_modules`, merged into the weights "
        "afterwards. norms: only RMSNorm/LayerNorm weights. mlp-near-dropped: the MLPs of layers whose "
        "attention was dropped and of the layer right after each, plus every norm. all: every parameter. "
        "A tied embedding / lm_head table trains only with all.")
    lora_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LORA_MODULES), min_length=1,
        description="lora: last name component of the nn.Linear modules inside decoder layers that get "
        "adapters (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj in Llama-family models).")
    lora_rank: int = Field(16, ge=1, le=256, description="lora: rank of each adapter.")
    lora_alpha: float = Field(32.0, gt=0, description="lora: the adapter's output is scaled by "
                              "lora_alpha / lora_rank.")
    steps: int = Field(200, ge=1, description="Optimizer steps (fewer when max_seconds runs out first).")
    learning_rate: float = Field(2e-4, gt=0, description="Peak AdamW learning rate (weight decay 0): linear "
                                 "warm-up over warmup_steps, then cosine decay to 0 at the last step.")
    warmup_steps: int = Field(10, ge=0, description="Steps of linear learning-rate warm-up (at most steps).")
    batch_size: int = Field(4, ge=1, le=256, description="Windows per optimizer step.")
    seq_len: int = Field(256, ge=8, le=8192, description="Tokens per training window.")
    seed: int = Field(0, description="Seed of the window order and the adapter initialisation.")
    max_seconds: float | None = Field(
        None, gt=0, description="Time budget of the training loop; training stops after the step that "
        "crosses it. Omit to run all steps.")
    files: list[Path] | None = Field(
        None, description="UTF-8 text files to train on (your own domain text); omit for the packaged "
        "calibration split. Must not overlap the evaluation text.")

    @model_validator(mode="after")
    def _fields_match_choices(self):
        # Defaults pass, so a fully resolved recipe (every field written out) loads again.
        needs = {}
        if "distill" not in self.objective:
            needs |= {f: ("objective: distill or distill+next-token", "objective: distill+next-token")
                      for f in ("temperature", "hidden_mse_weight")}
        if self.train != "lora":
            needs |= {f: ("train: lora", "train: lora") for f in ("lora_modules", "lora_rank", "lora_alpha")}
        fields = type(self).model_fields
        problems = [f"{name} applies only to {where}; remove it or set {fix}"
                    for name, (where, fix) in needs.items()
                    if getattr(self, name) != fields[name].get_default(call_default_factory=True)]
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ExportSpec(Block):
    format: Literal["onnx"] = Field("onnx", description="Export format.")
    opset: int = Field(18, ge=15, le=21, description="ONNX opset.")
    ort_format: bool = Field(False, description="Also write .ort files (onnxruntime mobile builds) for every ONNX "
                             "variant, with the required-operators config and the mobile usability verdict.")
    genai: bool = Field(False, description="Also write a folder per ONNX variant that onnxruntime-genai runs as is.")
    coreml: CoreMLSpec | None = Field(None, description="Also write Core ML packages of the compressed model.")


class LatencySpec(Block):
    threads: int = Field(2, ge=1, le=64, description="onnxruntime intra-op threads.")
    prefill_tokens: int = Field(128, ge=1, description="Prompt length for the prefill timing.")
    decode_context: int = Field(256, ge=1, description="Tokens already in the KV cache when decode is timed.")
    decode_steps: int = Field(32, ge=4, description="Timed decode steps (p50/p90 over these).")


class GateSpec(Block):
    max_perplexity_increase_pct: float | None = Field(
        None, ge=0, description="Fail if held-out perplexity rises by more than this percentage.")
    max_mc_accuracy_drop: float | None = Field(
        None, ge=0, le=1, description="Fail if multiple-choice accuracy falls by more than this (0-1 scale).")
    min_top1_agreement: float | None = Field(
        None, ge=0, le=1, description="Fail if ONNX vs PyTorch top-1 agreement (parity batch) is below this.")
    max_abs_logit_error: float | None = Field(
        None, gt=0, description="Fail if ONNX vs PyTorch max abs logit error (parity batch) exceeds this.")


class ValidateSpec(Block):
    files: list[Path] | None = Field(None, description="Held-out evaluation text; omit for the packaged split.")
    distractor_files: list[Path] | None = Field(
        None, description="Text that multiple-choice distractors are drawn from; omit for the packaged one.")
    perplexity_windows: int = Field(16, ge=1, description="Held-out windows for perplexity.")
    seq_len: int = Field(512, ge=16, description="Tokens per perplexity window.")
    mc_items: int = Field(200, ge=1, description="Next-sentence multiple-choice items (4 choices each).")
    parity_decode_steps: int = Field(8, ge=1, description="Greedy decode steps in the ONNX vs PyTorch parity check.")
    seed: int = Field(0, description="Seed for item sampling and timing inputs.")
    latency: LatencySpec = Field(default_factory=LatencySpec, description="Latency measurement.")
    gates: GateSpec = Field(default_factory=GateSpec, description="Pass/fail limits; a failure exits non-zero.")
    variant_gates: dict[str, GateSpec] = Field(
        default_factory=dict, description="Gates for one quantised variant, keyed by its name (e.g. a looser "
        "perplexity limit for int4); variants not listed use `gates`.")
    targets: list[Target] = Field(
        default_factory=list, description="Where else every variant is run and judged besides this host's "
        "validation: host, arm64-emulated (QEMU, numbers only) or ssh (a real device; real latency).")


class OutputSpec(Block):
    dir: Path = Field(Path("runs"), description="Folder that receives one sub-folder per run, relative to the working directory.")


class Recipe(Block):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9._-]+$", description="Run name (used in folder names).")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Which model to compress.")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec, description="Data for importance scores.")
    score: ScoreSpec = Field(default_factory=ScoreSpec, description="Importance metric.")
    drop: DropSpec = Field(default_factory=DropSpec, description="What to drop.")
    heal: HealSpec | None = Field(None, description="A short fine-tune of the pruned model after dropping "
                                  "(distillation from the undropped model and/or next-token loss), merged before "
                                  "export; omit to export the one-shot drop as is.")
    quantize: list[QuantSpec] = Field(default_factory=list, description="Quantised ONNX variants of the compressed "
                                      "model, each exported, validated and reported on its own.")
    export: ExportSpec = Field(default_factory=ExportSpec, description="Export formats.")
    validate_: ValidateSpec = Field(default_factory=ValidateSpec, alias="validate", description="Validation and gates.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where run folders go.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def resolved(self) -> dict:
        """The recipe with every default filled in, as plain YAML-able data."""
        return self.model_dump(mode="json", by_alias=True)


def _describe(err: dict) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        parent, key = err["loc"][:-1], err["loc"][-1]
        allowed = _allowed_keys(parent)
        return f"{where}: unknown key '{key}'; allowed here: {', '.join(allowed)}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg} (got {err['input']!r})" if err["type"] != "missing" else f"{where}: {msg}"


def _allowed_keys(loc: tuple) -> list[str]:
    cls: type[BaseModel] = Recipe
    for part in loc:
        field = next((f for n, f in cls.model_fields.items() if part in (n, f.alias)), None)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        cls = field.annotation
    return [f.alias or n for n, f in cls.model_fields.items()]


PACKAGED_TEXT = "packaged:"


def resolve_path(p: str, base: Path) -> str:
    """A recipe path: `packaged:<file>` names a text in the packaged corpus (e.g.
    packaged:miltondata/texts/comus_gut.txt, fetched once into the cache); others are relative to `base`."""
    if p.startswith(PACKAGED_TEXT):
        from .assets import ensure_texts

        return str(ensure_texts() / p[len(PACKAGED_TEXT):])
    return str(p) if Path(p).is_absolute() else str((base / p).resolve())


def _resolve_paths(data: dict, base: Path) -> dict:
    """Paths in a recipe are relative to the recipe file, so a recipe works from any directory."""
    def fix(p):
        return resolve_path(p, base)
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str):
        model["path"] = fix(model["path"])
    for block, key in (("calibration", "files"), ("heal", "files"), ("validate", "files"),
                       ("validate", "distractor_files")):
        section = data.get(block)
        if isinstance(section, dict) and isinstance(section.get(key), list):
            section[key] = [fix(p) if isinstance(p, str) else p for p in section[key]]
    targets = (data.get("validate") or {}).get("targets") if isinstance(data.get("validate"), dict) else None
    for target in targets if isinstance(targets, list) else []:
        for key in ("root", "key_file"):
            if isinstance(target, dict) and isinstance(target.get(key), str) and not target[key].startswith("~"):
                target[key] = fix(target[key])
    return data


def parse_recipe(data, source: str = "recipe", base: Path | None = None) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError([f"expected a mapping of blocks at the top level, found {type(data).__name__}"], source)
    if base is not None:
        data = _resolve_paths(data, base)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError([_describe(err) for err in e.errors()], source) from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"file not found: {path}"], str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError([f"not valid YAML: {e}"], str(path)) from None
    return parse_recipe(data, str(path), base=path.parent)


def check_against_model(recipe: Recipe, num_layers: int | None = None) -> None:
    """Checks that span blocks or need the model's shape (skipped while `num_layers` is None);
    every problem is reported at once."""
    d, problems = recipe.drop, []
    for kind in ("joint", "attention", "mlp", "blocks") if num_layers is not None else ():
        limit = 2 * num_layers if kind == "joint" else num_layers
        if getattr(d, kind) > limit:
            problems.append(f"drop.{kind}: {getattr(d, kind)} requested but the model has only {limit} "
                            f"{'sublayers' if kind == 'joint' else kind if kind != 'blocks' else 'blocks'}; "
                            f"use at most {limit - 1}")
    if num_layers is not None and num_layers in (d.attention, d.blocks):
        problems.append("drop: every attention layer would be dropped; keep at least one")
    if recipe.heal is not None and d.method == "none":
        problems.append("heal: nothing is dropped, so there is nothing to heal; set drop counts or remove heal")
    for kind in ("calibration", "heal", "validate_"):
        for f in (getattr(recipe, kind).files if getattr(recipe, kind) is not None else None) or []:
            if not Path(f).is_file():
                problems.append(f"{kind.rstrip('_')}.files: {f} does not exist")
    for f in recipe.validate_.distractor_files or []:
        if not Path(f).is_file():
            problems.append(f"validate.distractor_files: {f} does not exist")
    if recipe.model.path is not None and not Path(recipe.model.path).exists():
        problems.append(f"model.path: {recipe.model.path} does not exist")
    names = [q.name for q in recipe.quantize]
    for name in sorted({n for n in names if names.count(n) > 1 or n in ("original", "compressed")}):
        problems.append(f"quantize: variant name '{name}' is used twice or reserved; give each variant its own name")
    for name in recipe.validate_.variant_gates:
        if name not in names:
            problems.append(f"validate.variant_gates.{name}: no quantize variant is named '{name}'; "
                            f"variants: {', '.join(names) or 'none'}")
    problems += target_problems(recipe.validate_.targets, ["compressed", *names])
    problems += unready_targets(recipe.validate_.targets)
    coreml = recipe.export.coreml
    if coreml and coreml.stateful and num_layers is not None and num_layers in (d.attention, d.blocks):
        problems.append("export.coreml.stateful: every attention layer would be dropped, so there is no KV state "
                        "to keep; keep an attention layer or set stateful: false")
    if problems:
        raise RecipeError(problems)
