"""The recipe: one strict, typed pydantic block per stage, read from YAML by `pipeline.config.loading`.

Unknown keys and wrong types are refused with their path in the YAML, every problem at once. The checks that
span blocks or need the model's shape live in `pipeline.config.checks`. `Recipe.model_json_schema()` is what
`slimformer schema` prints for editors, and what `make docs` turns into docs/recipe-reference.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, NonNegativeInt, model_validator

from .base import NAME_PATTERN, Block, Override, RecipePath
from .budget import BudgetSpec
from .coreml import CoreMLSpec
from .quantize import QuantSpec
from .targets import Target


class SourceSpec(Block):
    """One source model: where its weights come from."""

    source: Literal["packaged", "hf", "gguf"] = Field(
        "packaged", description="packaged: a model shipped in a Python package; hf: a local Hugging Face "
        "folder (safetensors only); gguf: a local .gguf file.")
    name: str | None = Field("smollm2-135m", description="Packaged model name (source: packaged): smollm2-135m "
                             "or gemma3-270m.")
    path: RecipePath | None = Field(None, description="Folder (hf) or .gguf file (gguf), relative to the recipe.")

    @model_validator(mode="after")
    def _path_matches_source(self):
        if self.source in ("hf", "gguf") and self.path is None:
            raise ValueError(f"source '{self.source}' needs 'path' (a {'folder' if self.source == 'hf' else '.gguf file'})")
        return self

    @property
    def key(self) -> str:
        """A short name for folders and records: the packaged name, or the file or folder name."""
        return self.name if self.source == "packaged" else Path(self.path).name.removesuffix(".gguf")


class ModelSpec(SourceSpec):
    candidates: list[SourceSpec] = Field(
        default_factory=list, description="Other source models a budgeted run may take each rung from (budget "
        "block only): every model is searched for every rung it can reach, and each rung is the model whose "
        "chosen structure has the fewest bits per byte of calibration text (per-byte, so tokenizers compare).")

    def sources(self) -> list[SourceSpec]:
        """This model, then its candidates."""
        return [SourceSpec(source=self.source, name=self.name, path=self.path), *self.candidates]


class CalibrationSpec(Block):
    files: list[RecipePath] | None = Field(
        None, description="UTF-8 text files to calibrate on; omit for the packaged calibration split.")
    samples: int = Field(32, ge=1, le=4096, description="Number of calibration windows.")
    seq_len: int = Field(256, ge=8, le=8192, description="Tokens per calibration window.")
    batch_size: int = Field(4, ge=1, le=256, description="Windows per forward pass.")


class ScoreSpec(Block):
    metric: Literal["cosine"] = Field(
        "cosine", description="Importance S = 1 - cos(X, X + f(Norm(X))), mean over calibration tokens.")


# layer -> head indices, both in the model's own numbering (layer 0 first, head 0 first)
HeadLists = dict[NonNegativeInt, list[NonNegativeInt]]


class WindowSpec(Block):
    """Sliding-window attention for chosen layers: each attends to its last `size` tokens (itself included)."""

    layers: int | list[int] = Field(
        ..., description="How many kept attention sublayers to convert, those whose attention falls least beyond "
        "`size` tokens on calibration text (measured once, in scores.json), or the layer indices themselves.")
    size: int = Field(..., ge=16, description="Tokens each converted layer attends to. onnxruntime-genai keeps a "
                      "window-sized KV cache for these layers.")

    @model_validator(mode="after")
    def _distinct_layers(self):
        if isinstance(self.layers, list) and (len(set(self.layers)) < len(self.layers) or min(self.layers, default=0) < 0):
            raise ValueError("layers must be distinct, non-negative layer indices (or a count)")
        if isinstance(self.layers, int) and self.layers < 1:
            raise ValueError("layers must be at least 1 (or a list of layer indices); remove window to convert none")
        return self


class DropSpec(Block):
    joint: int = Field(0, ge=0, description="Drop the N least important sublayers, attention and MLP ranked together.")
    attention: int = Field(0, ge=0, description="Drop the N least important attention sublayers (and their KV cache).")
    mlp: int = Field(0, ge=0, description="Drop the N least important MLP sublayers.")
    blocks: int = Field(0, ge=0, description="Drop the N least important whole blocks (attention and MLP).")
    heads: NonNegativeInt | HeadLists = Field(
        0, description="Remove KV groups (a key/value head with the query heads that read it), which shrinks that "
        "layer's KV cache. A number N: the N least important groups over every layer whose attention stays, ranked "
        "by head importance (see `heads`); each layer keeps at least one group. A mapping layer -> group indices "
        "(group g holds query heads g*q..g*q+q-1, q = query heads per KV head): exactly those. Composes with the "
        "sublayer drops above.")
    query_heads: HeadLists = Field(
        default_factory=dict, description="Remove query heads within kept groups, per layer (layer -> query head "
        "indices). Every kept group of a layer must keep the same number of query heads (grouped attention "
        "repeats each KV head for a fixed number). Saves weights and compute, not KV cache.")


    window: WindowSpec | None = Field(None, description="Convert kept attention sublayers to sliding-window "
                                      "attention over their last `size` tokens, so their KV cache stops growing.")

    @model_validator(mode="after")
    def _one_method(self):
        if self.joint and (self.attention or self.mlp or self.blocks):
            raise ValueError("'joint' ranks every sublayer together: use it alone, without attention/mlp/blocks")
        if self.blocks and (self.attention or self.mlp):
            raise ValueError("'blocks' drops whole blocks: use it alone, without attention/mlp")
        for field, table in (("heads", self.heads if isinstance(self.heads, dict) else {}),
                             ("query_heads", self.query_heads)):
            for layer, heads in table.items():
                if not heads or len(set(heads)) != len(heads):
                    raise ValueError(f"{field}: layer {layer} lists {heads}; give each head index once, at least one")
        return self

    @property
    def prunes_heads(self) -> bool:
        return bool(self.heads or self.query_heads)

    @property
    def method(self) -> str:
        if self.joint:
            sublayers = "joint"
        elif self.blocks:
            sublayers = "blocks"
        else:
            sublayers = "+".join(k for k in ("attention", "mlp") if getattr(self, k))
        return "+".join(k for k in (sublayers, "heads" if self.prunes_heads else "") if k) or "none"


class HeadsSpec(Block):
    """Head analysis: one pass over calibration windows (eager attention) gives every head's importance, mean
    attention distance, entropy, first-token share and redundancy: heads.json, and heat maps in the report."""

    samples: int | None = Field(
        None, ge=1, le=4096, description="Calibration windows for the analysis (the first N of `calibration`); "
        "omit for calibration.samples. Each layer's [heads, seq, seq] attention probabilities are materialised.")


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
    files: list[RecipePath] | None = Field(
        None, description="UTF-8 text files to train on (your own domain text); omit for the packaged "
        "calibration split. Must not overlap the evaluation text.")

    @model_validator(mode="after")
    def _fields_match_choices(self):
        problems = []
        if "distill" not in self.objective:
            problems += self.misplaced(("temperature", "hidden_mse_weight"), "objective: distill or "
                                       "distill+next-token", "objective: distill+next-token")
        if self.train != "lora":
            problems += self.misplaced(("lora_modules", "lora_rank", "lora_alpha"), "train: lora", "train: lora")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ExportSpec(Block):
    format: Literal["onnx"] = Field("onnx", description="Export format.")
    graph: Literal["fused", "optimum"] = Field(
        "fused", description="fused: one decoder graph written from the model's own weights, the layout of "
        "onnxruntime-genai's model builder (GroupQueryAttention with rotary inside and KV only for kept layers, "
        "SkipSimplifiedLayerNormalization, fused QKV and gate/up, MatMulNBits for quantised weights); what phones "
        "should run. optimum: optimum's exporter (position_ids input, unfused ops), loadable by "
        "ORTModelForCausalLM.")
    opset: int = Field(18, ge=15, le=21, description="ONNX opset.")
    max_length: int | None = Field(
        None, ge=1, description="Most positions (prompt plus generated tokens) the fused graph serves: caps its "
        "rotary caches (file size) and the onnxruntime-genai context_length / max_length (the KV buffer genai "
        "allocates). null: the model's max_position_embeddings.")
    ort_format: bool = Field(False, description="Also write .ort files (onnxruntime mobile builds) for every ONNX "
                             "variant, with the required-operators config and the mobile usability verdict.")
    genai: bool = Field(False, description="Also write a folder per ONNX variant that onnxruntime-genai runs as is.")
    coreml: CoreMLSpec | None = Field(None, description="Also write Core ML packages of the compressed model.")


class LatencySpec(Block):
    threads: int = Field(2, ge=1, le=64, description="onnxruntime intra-op threads.")
    prefill_tokens: int = Field(128, ge=1, description="Prompt length for the prefill timing.")
    decode_context: int = Field(256, ge=1, description="Tokens already in the KV cache when decode is timed.")
    decode_steps: int = Field(32, ge=4, description="Timed decode steps (p50/p90 over these).")
    rounds: int = Field(3, ge=1, le=20, description="Interleaved rounds: every file is timed once per round, in "
                        "the same order, each in a fresh process; figures are the median over rounds.")


class GateSpec(Block):
    max_perplexity_increase_pct: float | None = Field(
        None, ge=0, description="Fail if held-out perplexity rises by more than this percentage.")
    max_mc_accuracy_drop: float | None = Field(
        None, ge=0, le=1, description="Fail if multiple-choice accuracy falls by more than this (0-1 scale).")
    min_top1_agreement: float | None = Field(
        None, ge=0, le=1, description="Fail if ONNX vs PyTorch top-1 agreement (parity batch) is below this.")
    max_abs_logit_error: float | None = Field(
        None, gt=0, description="Fail if ONNX vs PyTorch max abs logit error (parity batch) exceeds this.")


class GateOverride(Override, GateSpec):
    """Gates for one variant: the fields set here replace the recipe's `validate.gates` (null turns a gate off);
    the fields left out keep the recipe's values."""


class ValidateSpec(Block):
    files: list[RecipePath] | None = Field(None, description="Held-out evaluation text; omit for the packaged split.")
    distractor_files: list[RecipePath] | None = Field(
        None, description="Text that multiple-choice distractors are drawn from; omit for the packaged one.")
    perplexity_windows: int = Field(16, ge=1, description="Held-out windows for perplexity.")
    seq_len: int = Field(512, ge=16, description="Tokens per perplexity window.")
    mc_items: int = Field(200, ge=1, description="Next-sentence multiple-choice items (4 choices each).")
    parity_decode_steps: int = Field(8, ge=1, description="Greedy decode steps in the ONNX vs PyTorch parity check.")
    seed: int = Field(0, description="Seed for item sampling and timing inputs.")
    latency: LatencySpec = Field(default_factory=LatencySpec, description="Latency measurement.")
    gates: GateSpec = Field(default_factory=GateSpec, description="Pass/fail limits; a failure exits non-zero.")
    variant_gates: dict[str, GateOverride] = Field(
        default_factory=dict, description="Changes to `gates` for one quantised variant, keyed by its name, field by "
        "field: int4: {max_perplexity_increase_pct: 50} loosens that gate and keeps the others; null turns one off. "
        "Variants not listed use `gates` as they are.")

    def gates_for(self, variant: str) -> GateSpec:
        override = self.variant_gates.get(variant)
        return self.gates if override is None else override.apply(self.gates)
    targets: list[Target] = Field(
        default_factory=list, description="Where else every variant is run and judged besides this host's "
        "validation: host, arm64-emulated (QEMU, numbers only) or ssh (a real device; real latency).")


class OutputSpec(Block):
    dir: RecipePath = Field(Path("runs"), description="Folder that receives one sub-folder per run, relative to the "
                            "recipe file like every other path (the shipped recipes write to runs/ beside recipes/).")


class Recipe(Block):
    name: str = Field(..., min_length=1, max_length=100, pattern=NAME_PATTERN, description="Run name (used in folder "
                      "names and as the registry name).")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Which model to compress.")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec, description="Data for importance scores.")
    score: ScoreSpec = Field(default_factory=ScoreSpec, description="Importance metric.")
    heads: HeadsSpec | None = Field(None, description="Analyse every attention head in the run (heads.json, heat "
                                    "maps in the report); a recipe that removes heads runs it with defaults anyway.")
    drop: DropSpec = Field(default_factory=DropSpec, description="What to drop.")
    heal: HealSpec | None = Field(None, description="A short fine-tune of the pruned model after dropping "
                                  "(distillation from the undropped model and/or next-token loss), merged before "
                                  "export; omit to export the one-shot drop as is.")
    quantize: list[QuantSpec] = Field(default_factory=list, description="Quantised ONNX variants of the compressed "
                                      "model, each exported, validated and reported on its own.")
    export: ExportSpec = Field(default_factory=ExportSpec, description="Export formats.")
    validate_: ValidateSpec = Field(default_factory=ValidateSpec, alias="validate", description="Validation and gates.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where run folders go.")
    budget: BudgetSpec | None = Field(
        None, description="Memory-budgeted models: limits (file, memory at a context, decode time, accuracy) and a "
        "search that picks what to drop and how to store each layer to fit them; replaces drop counts and quantize "
        "entries. A ladder makes one model per budget.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)  # `validate` shadows BaseModel.validate

    def for_source(self, source: SourceSpec) -> "Recipe":
        """This recipe with `source` as its only model: what each candidate of a budgeted run is searched with."""
        return self.model_copy(update={"model": ModelSpec(**dict(source))})

    def resolved(self) -> dict:
        """The recipe with every default filled in, as plain YAML-able data."""
        return self.model_dump(mode="json", by_alias=True)
