"""The `budget:` block: what the phone can give (file size, memory at a context length, time per token, an accuracy
floor), the search that finds the most accurate model within it, and an optional ladder of budgets.

A budget replaces `drop:` counts and `quantize:` entries: the search chooses, layer by layer, which attention
(and, opted in, MLP) sublayers to keep and every linear group's storage format, and the chosen model is exported,
packaged and validated like any recipe's. Omitted limits do not constrain.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from .base import NAME_PATTERN, Block, Override
from .quantize import BlockSize

Form = Literal["symmetric", "asymmetric", "offset"]


class SelectionStep(Block):
    """One step of the multi-step selection: the candidates still in the race are scored on the first `windows`
    calibration windows and the best `keep` go on."""

    windows: int = Field(..., ge=1, description="Calibration windows (of calibration.seq_len tokens) scored here.")
    keep: int = Field(..., ge=1, description="Candidates that go on to the next step (1 at the last step).")


class SearchSpec(Block):
    """The space (per layer: sublayers kept, each linear group's format, the table's, the KV precision) and the
    evolutionary search over it."""

    drop_attention: bool = Field(True, description="Each attention sublayer may be dropped (with its KV cache).")
    drop_mlp: bool = Field(False, description="Each MLP sublayer may be dropped too (costly in accuracy; opt in).")
    bits: list[Literal[4, 8]] = Field([4, 8], min_length=1, description="Bit widths a linear group may take.")
    block_sizes: list[BlockSize] = Field([32, 64, 128], min_length=1, description="Block sizes a quantised group "
                                         "may take (powers of two >= 16).")
    table_bits: list[Literal[4, 8]] = Field([4, 8], min_length=1, description="Bit widths of the embedding / "
                                            "logits table.")
    source_blocks: bool = Field(True, description="Groups may keep the source GGUF's own blocks (exact, no "
                                "added error) where the model came from a GGUF with Q4_0, Q4_1 or Q8_0 tensors.")
    algorithm: Literal["rtn", "hqq", "gptq"] = Field("rtn", description="Quantiser for every group not kept in "
                                                     "the source's blocks (see the quantize block's algorithm).")
    table_algorithm: Literal["rtn", "hqq", "gptq"] | None = Field(
        None, description="Quantiser of the embedding / logits table when it is not kept in the source's blocks "
        "(default: `algorithm`). gptq fits a tied table to the logits it feeds (its Hessian is the final hidden "
        "state's), which held-out text rewards more than it rewards the other groups (docs/results.md).")
    form: Form | Annotated[list[Form], Field(min_length=1)] = Field(
        "symmetric", description="Block grid of that quantiser, or several for the search to choose from per group "
        "(offset blocks cost two more bytes each but fit better); hqq (for either) always uses offset.")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        4, description="MatMulNBits compute type of the written file. At 4 (int8 activations) the search scores "
        "candidates with their inputs rounded to int8 per block, as the file computes.")
    kv_precisions: list[Literal["fp32", "fp16"]] = Field(
        ["fp32", "fp16"], min_length=1, description="KV cache precisions to choose from (fp16 halves KV memory; "
        "GroupQueryAttention then runs in fp16).")
    generations: int = Field(40, ge=0, description="Generations of the evolutionary search (0: the greedy plan "
                             "from the sensitivities, unrefined).")
    offspring: int = Field(12, ge=1, description="Children mutated from the parent in each generation.")
    selection: list[SelectionStep] = Field(
        default_factory=lambda: [SelectionStep(windows=1, keep=3), SelectionStep(windows=4, keep=1)], min_length=1,
        description="Multi-step selection on growing token counts (EvoPress): every child is scored on the first "
        "step's windows, the best `keep` on the next step's, ...; the last step's winner replaces the parent if "
        "it is better on the same windows.")
    sensitivity_windows: int = Field(2, ge=1, description="Calibration windows for the per-layer sensitivities "
                                     "(KL of each single change), measured once and cached.")
    seed: int = Field(0, description="Seed of the mutations: the same seed, model and data give the same search.")
    max_seconds: float | None = Field(None, gt=0, description="Stop each search after the generation that crosses "
                                      "this many seconds; omit to run every generation.")
    heldout_points: int = Field(8, ge=0, description="Frontier candidates also scored on the held-out text for "
                                "the Pareto plot (besides the chosen models and the uniform baselines).")
    heldout_windows: int = Field(4, ge=1, description="Held-out windows (of validate.seq_len tokens) the Pareto "
                                 "plot's perplexities are measured on, in PyTorch with the files' exact weights.")
    baseline_drops: list[int] = Field([0, 2, 4, 8], description="Attention drop counts of the uniform baselines "
                                      "(score-ranked drop, uniform int8 / 4-bit) in the Pareto report.")

    @property
    def forms(self) -> tuple[str, ...]:
        """The grids `form` lists, each once."""
        return tuple(dict.fromkeys([self.form] if isinstance(self.form, str) else self.form))

    @property
    def grids(self) -> tuple[str, ...]:
        """The grids searched: offset alone with hqq, else the listed ones."""
        return ("offset",) if "hqq" in (self.algorithm, self.table_algorithm) else self.forms

    @property
    def algorithms(self) -> str:
        """One line: the quantiser, and the table's where it differs."""
        table = self.table_algorithm
        return self.algorithm if table in (None, self.algorithm) else f"{self.algorithm} (table {table})"


class BudgetLimits(Block):
    max_file_mb: float | None = Field(None, gt=0, description="Largest shipped file (the `format` file), in MB "
                                      "(10^6 bytes).")
    max_memory_mb: float | None = Field(
        None, gt=0, description="Largest peak resident memory, in MB (2^20 bytes), of a process on `target` that "
        "loads the model, prefills `context` tokens and decodes (docs/budget.md: the protocol).")
    max_decode_ms: float | None = Field(None, gt=0, description="Longest decode time per token on `target` with "
                                        "`context` tokens cached.")
    max_perplexity_increase_pct: float | None = Field(
        None, ge=0, description="Accuracy floor: the chosen model's held-out perplexity may rise at most this much "
        "over the original's (a validation gate of the run).")

    def limits(self) -> dict[str, float]:
        return {k: v for k in ("max_file_mb", "max_memory_mb", "max_decode_ms") if (v := getattr(self, k))}


class BudgetRung(Override, BudgetLimits):
    """One rung of a ladder: its name, and limits that replace the budget's own, field by field (null removes
    one); fields left out keep the budget's."""

    name: str = Field(..., pattern=NAME_PATTERN, description="Rung name: its folder and its key in ladder.json.")


class BudgetSpec(BudgetLimits):
    """What the target device can give, and the search that fits the most accurate model into it."""

    name: str = Field("budget", pattern=NAME_PATTERN, description="Name of the chosen model (its variant folder "
                      "onnx-<name>/ and report key).")
    format: Literal["onnx"] = Field("onnx", description="The shipped file max_file_mb measures: the fused ONNX "
                                    "file (model.onnx) of the chosen model.")
    context: int = Field(2048, ge=1, description="Tokens in the KV cache for max_memory_mb and max_decode_ms.")
    target: str = Field("host", pattern=NAME_PATTERN, description="Where memory and decode time are measured: "
                        "host, or the name of a host or ssh target in validate.targets.")
    search: SearchSpec = Field(default_factory=SearchSpec, description="The search space and the search.")
    ladder: list[BudgetRung] = Field(
        default_factory=list, description="Several budgets in one run, sharing scores and sensitivities: one model "
        "per rung, and ladder.json ordered from most to least capable (docs/budget.md: how an app picks a rung).")

    @model_validator(mode="after")
    def _selection_grows(self):
        steps = self.search.selection
        if any(b.windows < a.windows or b.keep > a.keep for a, b in zip(steps, steps[1:])) or steps[-1].keep != 1:
            raise ValueError("search.selection: windows must not shrink and keep must not grow from step to step, "
                             "and the last step keeps 1; e.g. [{windows: 1, keep: 3}, {windows: 4, keep: 1}]")
        if steps[0].keep > self.search.offspring:
            raise ValueError(f"search.selection: the first step keeps {steps[0].keep} of {self.search.offspring} "
                             "offspring; keep at most search.offspring")
        return self

    def rungs(self) -> list[tuple[str, BudgetLimits]]:
        """(name, limits) per model to make: the ladder's rungs, or the budget itself."""
        base = BudgetLimits(**{k: getattr(self, k) for k in BudgetLimits.model_fields})
        if not self.ladder:
            return [(self.name, base)]
        return [(r.name, BudgetLimits(**{k: getattr(r, k) if k in r.model_fields_set else getattr(base, k)
                                         for k in BudgetLimits.model_fields})) for r in self.ladder]
