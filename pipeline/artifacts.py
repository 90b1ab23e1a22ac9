"""Typed artifacts: every record a stage hands to the next, and every JSON file a run folder holds.

Each is a frozen dataclass deriving from `Artifact`, which gives it `to_json` / `from_json` (through pydantic's
TypeAdapter, so nested records, tuples and paths round-trip) and a schema version that `from_json` checks.
Nothing here imports a stage: configuration, stages and the CLI all read these types.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import ClassVar, Literal

SCHEMA_VERSION = 2


@cache
def _adapter(cls):
    from pydantic import TypeAdapter

    return TypeAdapter(cls)


class Artifact:
    """Base of every record. `filename` names its file in a run folder, where it has one."""

    filename: ClassVar[str] = ""
    # parity SQNR is infinite for identical traces: keep inf as a number (JSON Infinity) instead of null.
    __pydantic_config__: ClassVar[dict] = {"ser_json_inf_nan": "constants"}

    def to_json(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, **_adapter(type(self)).dump_python(self, mode="json")}

    @classmethod
    def from_json(cls, data: dict):
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"{cls.__name__}: schema_version {version} is not {SCHEMA_VERSION}; this file was "
                             "written by another slimformer version")
        return _adapter(cls).validate_python({k: v for k, v in data.items() if k != "schema_version"})

    def write(self, folder: Path) -> Path:
        path = Path(folder) / self.filename
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, folder: Path):
        return cls.from_json(json.loads((Path(folder) / cls.filename).read_text()))


# ---------------------------------------------------------------- the model and what to drop

@dataclass(frozen=True)
class ModelInfo(Artifact):
    """A model's shape, read from config.json or GGUF metadata before any weight is loaded."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    source: str  # where the figures were read: "config.json of <folder>" or "GGUF metadata of <file>"
    fused_graph: bool = True  # the fused decoder export (export.graph: fused) can write this architecture
    biases: tuple[str, ...] = ()  # linear groups (qkv, o, gate_up, down) whose projections carry a bias
    activation: str = "silu"  # the MLP activation
    sliding_layers: tuple[int, ...] = ()  # layers attending within the config's sliding window

    def with_max_length(self, max_length: int | None) -> "ModelInfo":
        """The shape as exported with at most `max_length` positions (rotary caches, genai context); None: all."""
        return self if max_length is None else replace(self, max_position_embeddings=max_length)

    @property
    def linear_input_widths(self) -> tuple[int, ...]:
        """Input widths of the decoder's linear layers (q/k/v/gate/up/lm_head, o, down)."""
        return tuple(sorted({self.hidden_size, self.num_heads * self.head_dim, self.intermediate_size}))


@dataclass(frozen=True)
class Scores(Artifact):
    """Importance of every sublayer and block: mean of 1 - cos(X, Y) over calibration tokens."""

    model: str
    metric: str
    tokens: int
    attention: tuple[float, ...]
    mlp: tuple[float, ...]
    block: tuple[float, ...]
    # Measured when the recipe asks for windows (pipeline.model.window.measure_windows): per layer, the KL of the
    # next-token distribution when it alone is windowed to window_size with its fitted per-head sinks.
    window_kl: tuple[float, ...] = ()
    window_sinks: dict[int, tuple[float, ...]] = field(default_factory=dict)
    window_size: int = 0
    filename: ClassVar[str] = "scores.json"

    @property
    def num_layers(self) -> int:
        return len(self.block)


@dataclass(frozen=True)
class DropPlan(Artifact):
    """Which sublayers to remove (original layer indices), and why."""

    method: str
    attention: tuple[int, ...]
    mlp: tuple[int, ...]
    num_layers: int
    order: tuple[tuple[str, int, float], ...] = ()  # (kind, layer, score), in drop order
    window: tuple[int, ...] = ()  # kept attention layers converted to sliding-window attention
    window_size: int = 0
    window_sinks: dict[int, tuple[float, ...]] = field(default_factory=dict)  # layer -> sink logit per head
    filename: ClassVar[str] = "plan.json"

    @property
    def kept_attention(self) -> int:
        return self.num_layers - len(self.attention)


@dataclass(frozen=True)
class HeadScores(Artifact):
    """Every attention head's figures from one pass over calibration windows (heads.json).

    Per-head lists are [layer][query head] in the model's current numbering; a layer without attention has
    empty lists. importance: mean of 1 - cos(Y, Y without the head) over tokens, Y = X + Attn(Norm(X));
    group_importance: the same with every query head of one KV group zeroed, [layer][group]. sink: the attention
    probability on each window's first token (where heads park attention they do not use); distance: mean
    query-key distance in tokens of the rest of the attention; entropy: of the probabilities, in nats.
    similarity: [layer][head][head], cosine between two heads' contributions to the residual stream over all
    tokens (redundancy)."""

    model: str
    metric: str
    tokens: int
    seq_len: int
    importance: tuple[tuple[float, ...], ...]
    group_importance: tuple[tuple[float, ...], ...]
    distance: tuple[tuple[float, ...], ...]
    entropy: tuple[tuple[float, ...], ...]
    sink: tuple[tuple[float, ...], ...]
    similarity: tuple[tuple[tuple[float, ...], ...], ...]
    filename: ClassVar[str] = "heads.json"

    @property
    def num_layers(self) -> int:
        return len(self.importance)

    @property
    def redundancy(self) -> tuple[tuple[float, ...], ...]:
        """Per head: its highest similarity to another head of the same layer (0 for a lone head)."""
        return tuple(tuple(max([s for j, s in enumerate(row) if j != i] or [0.0]) for i, row in enumerate(layer))
                     for layer in self.similarity)


@dataclass(frozen=True)
class HeadPlan(Artifact):
    """Which KV groups (a key/value head with its query heads) and which query heads to remove, per layer, in
    the model's numbering before head pruning (head_plan.json). `order` lists the groups in removal order as
    (layer, group, score); `kv_heads` the KV heads each layer keeps (0 where its attention is dropped)."""

    method: Literal["none", "global", "per-layer"]
    kv_groups: dict[int, tuple[int, ...]]
    query_heads: dict[int, tuple[int, ...]]
    kv_heads: tuple[int, ...]
    order: tuple[tuple[int, int, float], ...] = ()
    filename: ClassVar[str] = "head_plan.json"

    @property
    def removed_groups(self) -> int:
        return sum(len(g) for g in self.kv_groups.values())

    @property
    def removed_query_heads(self) -> int:
        return sum(len(q) for q in self.query_heads.values())


@dataclass(frozen=True)
class Accuracy(Artifact):
    """Held-out perplexity and multiple-choice accuracy of one model on one evaluation set."""

    perplexity: float
    mc_accuracy: float


@dataclass(frozen=True)
class HealCurve(Artifact):
    """heal_curve.json: the training loss per step (and the kl / ce / mse terms the objective uses)."""

    steps: int
    stopped_by: Literal["steps", "time"]
    seconds: float
    trainable_params: int
    device: str
    curve: tuple[dict[str, float], ...]
    filename: ClassVar[str] = "heal_curve.json"


@dataclass(frozen=True)
class HealSummary(Artifact):
    """What the heal stage did and what it changed (PyTorch figures on the run's held-out data)."""

    objective: str
    train: str
    steps: int
    stopped_by: Literal["steps", "time"]
    seconds: float
    device: str
    trainable_params: int
    windows: int
    tokens_seen: int
    first_loss: float
    last_loss: float
    before: Accuracy
    after: Accuracy
    weights_sha256: str | None  # of the healed model.safetensors, when saved


@dataclass(frozen=True)
class Sensitivities(Artifact):
    """What each single change the budget search can make costs, as KL divergence from the original model on
    calibration windows: an attention or MLP sublayer dropped, one layer's groups at their smallest format, the
    table at each format, the KV cache at each precision; and each group's expected output error per format
    (a proxy that splits a layer's measured KL among its groups)."""

    model: str
    windows: int
    tokens: int
    attention: tuple[float, ...]
    mlp: tuple[float, ...]
    layers: tuple[float, ...]
    table: dict[str, float]
    kv: dict[str, float]
    proxies: dict[str, dict[str, float]]
    seconds: float = 0.0
    filename: ClassVar[str] = "sensitivities.json"


@dataclass(frozen=True)
class FootprintPoint(Artifact):
    """One calibration file run under the memory protocol on a target, with the cost model's features."""

    label: str
    kv_dtype: str
    file_bytes: int
    features: dict[str, float]
    peak_rss_mb: float
    decode_ms: float


@dataclass(frozen=True)
class FootprintCalibration(Artifact):
    """A target's runtime costs, measured once on synthetic files of one model shape at one context: peak RSS
    (MiB) and decode ms per token are linear in the cost model's features (`pipeline.model.costs`), with these
    coefficients (KV cache precision -> feature name -> coefficient). Each KV precision has its own fit: an fp16
    cache runs attention between Casts, which changes what the peak holds and what a step costs."""

    target: str
    context: int
    threads: int
    onnxruntime: str
    points: tuple[FootprintPoint, ...]
    memory: dict[str, dict[str, float]]
    decode: dict[str, dict[str, float]]
    seconds: float = 0.0
    filename: ClassVar[str] = "calibration.json"

    def memory_mb(self, features: dict[str, float], kv_dtype: str) -> float:
        return sum(c * features[k] for k, c in self.memory[kv_dtype].items())

    def decode_ms(self, features: dict[str, float], kv_dtype: str) -> float:
        return sum(c * features[k] for k, c in self.decode[kv_dtype].items())


@dataclass(frozen=True)
class BudgetPoint(Artifact):
    """One model the budget search priced and scored: a searched candidate, a uniform baseline, a chosen rung or
    a peer's file. KL is on the search's first selection step's calibration windows; perplexity on the held-out
    windows (PyTorch, weights exactly as the file holds them), where measured."""

    label: str
    structure: str
    file_mb: float
    kv_kb_per_token: float | None = None
    memory_mb: float | None = None
    decode_ms: float | None = None
    kl: float | None = None
    perplexity: float | None = None


@dataclass(frozen=True)
class Pareto(Artifact):
    """pareto.json: every evaluated candidate, the uniform baselines and the chosen models, the frontier (no
    point both smaller and closer to the original), and the budgets."""

    model: str
    reference_perplexity: float  # the original model (fp32, undropped) on the same held-out windows
    kl_tokens: int
    heldout_tokens: int
    points: tuple[BudgetPoint, ...]
    frontier: tuple[int, ...]  # indices into points, by file size
    budgets: dict[str, dict[str, float]]
    chosen: dict[str, int]  # rung -> index into points
    filename: ClassVar[str] = "pareto.json"


@dataclass(frozen=True)
class BudgetChoice(Artifact):
    """budget.json: the model chosen for one budget: what it keeps, how each group is stored, what the cost model
    predicted and what the run measured, and which limits bind."""

    name: str
    limits: dict[str, float]
    binding: tuple[str, ...]
    attention_dropped: tuple[int, ...]
    mlp_dropped: tuple[int, ...]
    formats: dict[str, str]  # group -> source, q4b32, q8b64, ... (kept groups only)
    kv_cache: str
    algorithm: str
    grid: str
    context: int
    target: str
    kl: float
    predicted: dict[str, float | None]  # file_mb, memory_mb, decode_ms, kv_kb_per_token
    measured: dict[str, float | None] = field(default_factory=dict)
    model: str = ""  # the source model it was made from (model.key)
    # with candidate source models: each one's chosen structure for this budget, in bits per byte of calibration
    # text (the fewest wins)
    compared: dict[str, float] = field(default_factory=dict)
    filename: ClassVar[str] = "budget.json"


@dataclass(frozen=True)
class LadderRung(Artifact):
    """One model of a ladder: its files (relative to ladder.json), what it costs, measured, and how accurate it
    is on the held-out text."""

    name: str
    files: dict[str, str]
    file_mb: float
    memory_mb: float  # peak RSS under the memory protocol at the ladder's context, on its target
    predicted_memory_mb: float | None
    kv_kb_per_token: float
    kv_factor: float | None  # peak MiB per MiB of this rung's KV cache, to move its memory to another context
    decode_ms: float  # per token with the context cached, same run
    perplexity: float
    perplexity_increase_pct: float
    mc_accuracy: float
    limits: dict[str, float]
    passed: bool
    model: str  # the source model it was made from (a key of Ladder.models)
    bits_per_byte: float  # held-out perplexity per byte of text: comparable across source models and tokenizers
    dominated_by: str | None = None  # a rung as accurate, small and fast at every context: never worth loading


@dataclass(frozen=True)
class Ladder(Artifact):
    """ladder.json: models for several budgets, most capable (fewest held-out bits per byte) first, each from one
    of the source models. An app takes the first rung whose memory fits what the device can give
    (docs/budget.md; pipeline/picker.py)."""

    models: dict[str, dict]  # source key -> description, original_perplexity, original_bits_per_byte
    context: int
    target: str
    rungs: tuple[LadderRung, ...]
    filename: ClassVar[str] = "ladder.json"


# ---------------------------------------------------------------- exported files

@dataclass(frozen=True)
class OnnxExport(Artifact):
    path: Path
    kv_layers: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    graph: Literal["optimum", "fused"] = "optimum"


@dataclass(frozen=True)
class QuantizedModel(Artifact):
    path: Path
    kind: str
    name: str
    bytes: int


@dataclass(frozen=True)
class OrtParity(Artifact):
    """A .ort file against the .onnx it came from, on the same tokens."""

    max_abs_diff: float
    top1_agreement: float
    steps: int


@dataclass(frozen=True)
class OrtFormat(Artifact):
    path: Path
    required_operators_config: Path
    usable_on_mobile: str  # short verdict: which execution provider to use on phones
    details: tuple[str, ...]
    bytes: int = 0
    parity_vs_onnx: OrtParity | None = None


@dataclass(frozen=True)
class GenaiFolder(Artifact):
    path: Path
    tokenizer_problem: str | None  # None: onnxruntime-genai encodes like Hugging Face


@dataclass(frozen=True)
class CoreMLNumerics(Artifact):
    checked: bool
    reason: str | None = None
    tokens: int = 0
    max_abs_logit_error: float | None = None
    mean_abs_logit_error: float | None = None
    top1_agreement: float | None = None


@dataclass(frozen=True)
class CoreMLPackage(Artifact):
    """One written .mlpackage, its structure as read back from disk. kv_states counts state tensors
    (a key and a value per kept attention layer); shapes give flexible dims as 'low..high'."""

    path: Path
    variant: str
    stateful: bool
    kv_states: int
    inputs: dict[str, list]
    outputs: dict[str, list]
    states: dict[str, list[int]]
    op_counts: dict[str, int]
    weight_bytes: int
    numerics: CoreMLNumerics | None = None

    @property
    def kv_layers(self) -> int:
        return self.kv_states // 2


@dataclass(frozen=True)
class Packages(Artifact):
    """Mobile deliverables, keyed by variant name."""

    ort: dict[str, OrtFormat] = field(default_factory=dict)
    genai: dict[str, GenaiFolder] = field(default_factory=dict)
    coreml: tuple[CoreMLPackage, ...] = ()


# ---------------------------------------------------------------- measurements

@dataclass(frozen=True)
class ModelFigures(Artifact):
    """One ONNX file measured by the runner: size, KV cache, accuracy, latency, memory."""

    file_mb: float
    kv_layers: int
    kv_kb_per_token: float
    perplexity: float
    perplexity_tokens: int
    mc_accuracy: float
    prefill_ms: float
    decode_p50_ms: float
    decode_p90_ms: float
    peak_rss_mb: float
    onnxruntime: str
    params_m: float
    accuracy_cached: bool = False  # perplexity and accuracy read from the baseline cache, not re-scored
    kv_bytes_at: dict[int, int] = field(default_factory=dict)  # context -> KV bytes held (pipeline.measure.kv)


@dataclass(frozen=True)
class Parity(Artifact):
    """ONNX logits against the pruned PyTorch model over a teacher-forced greedy trace."""

    max_abs_error: float
    mean_abs_error: float
    top1_agreement: float
    sqnr_db: float
    steps: int
    batch: int = 0
    decode_steps: int = 0


@dataclass(frozen=True)
class Gate(Artifact):
    variant: str
    name: str
    value: float
    limit: float
    passed: bool
    target: str | None = None

    def failure(self) -> str:
        where = f"{self.variant}{' on ' + self.target if self.target else ''}"
        return f"{where}: {self.name}: measured {self.value:.4g}, limit {self.limit:.4g}"


@dataclass(frozen=True)
class TargetRow(Artifact):
    """One variant on one target, judged against PyTorch and against this host running the same file."""

    target: str
    kind: str
    variant: str
    timing: str
    cpu: str | None
    features: tuple[str, ...] | None
    onnxruntime: str | None
    seconds: float
    max_abs_logit_error: float
    top1_agreement: float
    max_abs_diff_vs_host: float
    max_rel_diff_vs_host: float
    perplexity: float
    host_perplexity: float
    perplexity_tokens: int
    perplexity_diff_pct: float
    prefill_ms: float | None = None
    decode_p50_ms: float | None = None
    decode_p90_ms: float | None = None
    peak_rss_mb: float | None = None


@dataclass(frozen=True)
class ValidationSettings(Artifact):
    threads: int
    prefill_tokens: int
    decode_context: int
    decode_steps: int
    latency_rounds: int
    perplexity_tokens: int
    mc_items: int
    onnxruntime: str


@dataclass(frozen=True)
class Validation(Artifact):
    models: dict[str, ModelFigures]  # "original", "compressed" (fp32), then each quantised variant
    parity: dict[str, Parity]
    targets: tuple[TargetRow, ...]
    gates: tuple[Gate, ...]
    settings: ValidationSettings

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def failures(self) -> list[str]:
        return [g.failure() for g in self.gates if not g.passed]


@dataclass(frozen=True)
class TargetsReport(Artifact):
    """`slimformer targets`: a finished run's files judged on other targets."""

    run: str
    rows: tuple[TargetRow, ...]
    gates: tuple[Gate, ...]
    filename: ClassVar[str] = "targets.json"

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)


@dataclass(frozen=True)
class Report(Artifact):
    """report.json: everything a run measured, in one typed record."""

    name: str
    plan: DropPlan
    heal: HealSummary | None
    validation: Validation
    packages: Packages
    stage_seconds: dict[str, float]
    wall_seconds: float
    cached_stages: tuple[str, ...] = ()  # stages whose output came from the stage cache (nightly)
    head_plan: HeadPlan | None = None
    budget: BudgetChoice | None = None
    filename: ClassVar[str] = "report.json"

    @property
    def passed(self) -> bool:
        return self.validation.passed

    def failures(self) -> list[str]:
        return self.validation.failures()


# ---------------------------------------------------------------- registry and nightly

@dataclass(frozen=True)
class VariantFigures(Artifact):
    """The key figures of one published variant: held-out accuracy, file size, KV cache per token, and decode
    ms/token p50 per place it was timed ('host' is the machine that made the run; others are targets)."""

    perplexity: float
    mc_accuracy: float
    file_mb: float
    kv_kb_per_token: float
    decode_ms: dict[str, float]


@dataclass(frozen=True)
class PublishedVersion(Artifact):
    """One immutable version in a registry: what `slimformer ls` prints, and the artifact's config blob."""

    name: str
    version: str
    created_utc: str
    recipe_sha256: str
    source_model: str
    source_sha256: str
    passed: bool
    formats: dict[str, tuple[str, ...]]  # variant -> formats published for it (onnx, ort, genai, coreml, hf)
    figures: dict[str, VariantFigures]
    files: int
    bytes: int
    tags: tuple[str, ...] = ()  # the moving tags that point at this version when it was read


@dataclass(frozen=True)
class SideBySide(Artifact):
    """One variant of tonight's model beside the same variant of the tagged version, measured in one process on
    the same tokens; latency in interleaved rounds. `identical`: both files have the same sha256."""

    variant: str
    identical: bool
    previous: dict[str, float]  # perplexity, mc_accuracy, file_mb, decode_p50_ms
    new: dict[str, float]


@dataclass(frozen=True)
class Regression(Artifact):
    """A regression limit crossed by one variant: the figure, both values and the limit."""

    variant: str
    figure: str  # perplexity, mc_accuracy, file_mb, decode_p50_ms
    previous: float
    new: float
    change: float  # in the limit's unit: percent, or absolute for accuracy
    limit_name: str
    limit: float

    def describe(self, recipe: str) -> str:
        unit = "" if self.limit_name == "max_mc_accuracy_drop" else " %"
        return (f"{recipe}: {self.variant}: {self.figure}: previous {self.previous:.4g}, new {self.new:.4g} "
                f"({self.change:+.3g}{unit}); limit {self.limit_name} {self.limit:g}")


@dataclass(frozen=True)
class RecipeNight(Artifact):
    """What one night did with one recipe. status: published (and the tag moved), regressed (a limit was
    crossed: not published), failed (the run raised or a validation gate failed: not published)."""

    recipe: str
    name: str
    status: Literal["published", "regressed", "failed"]
    version: str | None = None
    previous: str | None = None  # the version the tag pointed at, compared against
    run_dir: str | None = None
    error: str | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    cached_stages: tuple[str, ...] = ()
    compare_seconds: float = 0.0
    figures: dict[str, VariantFigures] = field(default_factory=dict)
    side_by_side: tuple[SideBySide, ...] = ()
    regressions: tuple[Regression, ...] = ()


@dataclass(frozen=True)
class NightReport(Artifact):
    """One night: every recipe's outcome. history.jsonl holds one of these per line."""

    started_utc: str
    registry: str
    tag: str
    wall_seconds: float
    recipes: tuple[RecipeNight, ...]
    ray: str | None = None
