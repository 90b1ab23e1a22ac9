"""Recipe block `validate.targets` (and the `targets:` list of a targets file): where else each variant runs.

host: this machine in a child process. arm64-emulated: an arm64 Debian root under QEMU user emulation, with a
chosen core. ssh: a real device. Each target has tolerances that gate its figures against the PyTorch
reference and against this host running the same file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from .base import NAME_PATTERN, Block, Override, RecipePath
from .paths import home

ROOT_MARKER = ".slimformer-arm-root"  # written by scripts/build_arm_root.sh when the root is complete
SSH_ENV = {"host": "SLIMFORMER_SSH_HOST", "port": "SLIMFORMER_SSH_PORT", "user": "SLIMFORMER_SSH_USER",
           "key_file": "SLIMFORMER_SSH_KEY", "python": "SLIMFORMER_SSH_PYTHON"}


class Tolerances(Block):
    max_abs_logit_error: float | None = Field(
        0.01, gt=0, description="Fail if the target's parity-trace logits differ from the PyTorch reference by "
        "more than this (absolute); null turns the gate off.")
    min_top1_agreement: float | None = Field(
        1.0, ge=0, le=1, description="Fail if the target's top-1 tokens agree with the PyTorch reference on less "
        "than this fraction of (step, row) positions; null turns the gate off.")
    max_rel_diff_vs_host: float | None = Field(
        1e-3, gt=0, description="Fail if the target's parity-trace logits differ from this host's, running the "
        "same file on the same tokens, by more than this fraction of the host's largest logit; null turns the "
        "gate off. Catches a kernel that computes differently on the target's core.")
    max_perplexity_diff_pct: float | None = Field(
        0.5, ge=0, description="Fail if the target's held-out perplexity differs from the host's (same file, "
        "same windows) by more than this percentage either way; null turns the gate off.")


class ToleranceOverride(Override, Tolerances):
    """Tolerances for one variant: the fields set here replace the target's (null turns a gate off); the
    fields left out keep the target's values."""


class _Target(Block):
    timeout_s: float = Field(3600, gt=0, description="Limit in seconds for each step on the target (copy, run).")
    perplexity_windows: int | None = Field(
        None, ge=1, description="Score only the first N held-out windows here; null scores them all.")
    perplexity_tokens: int | None = Field(
        None, ge=8, description="Score only the first N tokens of each window here; null keeps whole windows.")
    tolerances: Tolerances = Field(default_factory=Tolerances, description="Gates against the host and PyTorch.")
    variant_tolerances: dict[str, ToleranceOverride] = Field(
        default_factory=dict, description="Per-variant changes to `tolerances`, keyed by variant name, field by "
        "field (e.g. int4: {max_abs_logit_error: 2.0} changes that gate only): quantised kernels differ by core.")

    def tolerances_for(self, variant: str) -> Tolerances:
        override = self.variant_tolerances.get(variant)
        return self.tolerances if override is None else override.apply(self.tolerances)


class HostTarget(_Target):
    kind: Literal["host"] = Field("host", description="This machine, through a child process.")
    name: str = Field("host", pattern=NAME_PATTERN, description="Name in reports and gates.")


class ArmEmulatedTarget(_Target):
    kind: Literal["arm64-emulated"] = Field(
        "arm64-emulated", description="An arm64 Debian root run by QEMU user emulation.")
    name: str = Field(None, pattern=NAME_PATTERN, description="Name in reports; default arm64-<cpu>.")
    cpu: Literal["cortex-a53", "cortex-a76", "neoverse-n1", "max"] = Field(
        "cortex-a76", description="Emulated core: cortex-a53 (no dotprod, no fp16), cortex-a76 / neoverse-n1 "
        "(dotprod, fp16), max (SVE, i8mm). onnxruntime picks different kernels on each.")
    root: RecipePath | None = Field(None, description="Root built by scripts/build_arm_root.sh; default "
                                    "$SLIMFORMER_HOME/arm64-root.")
    timeout_s: float = Field(3600, gt=0, description="Limit in seconds for the run (emulation is 30-250x slower).")
    perplexity_windows: int | None = Field(
        2, ge=1, description="Score only the first N held-out windows here (emulation is slow); null for all.")

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data):
        if isinstance(data, dict) and data.get("name") is None:
            cpu = data.get("cpu", cls.model_fields["cpu"].default)
            data = {**data, "name": f"arm64-{cpu}" if isinstance(cpu, str) else None}
        return data

    def resolved_root(self) -> Path:
        return Path(self.root) if self.root is not None else home() / "arm64-root"


class SshTarget(_Target):
    kind: Literal["ssh"] = Field("ssh", description="A machine reached with the OpenSSH client (phone, ARM board).")
    name: str = Field("ssh", pattern=NAME_PATTERN, description="Name in reports and gates.")
    host: str | None = Field(None, description=f"Host name or address; default ${SSH_ENV['host']}.")
    port: int | None = Field(None, ge=1, le=65535, description=f"SSH port; default ${SSH_ENV['port']}, else 22.")
    user: str | None = Field(None, description=f"Login; default ${SSH_ENV['user']}, else ssh's own default.")
    key_file: RecipePath | None = Field(None, description=f"Private key; default ${SSH_ENV['key_file']}, else "
                                        "ssh's own.")
    python: str | None = Field(None, description="Python with onnxruntime and numpy on the target (a command "
                               f"for the remote shell); default ${SSH_ENV['python']}, else python3.")
    remote_dir: str = Field("/tmp/slimformer", pattern=r"^[A-Za-z0-9._/~-]+$",
                            description="Folder on the target for the copied files (one sub-folder per run).")
    connect_timeout_s: int = Field(10, ge=1, description="Seconds ssh waits for the connection.")
    timeout_s: float = Field(1800, gt=0, description="Limit in seconds for each step (copy, run).")


Target = Annotated[HostTarget | ArmEmulatedTarget | SshTarget, Field(discriminator="kind")]


def host_counterpart(target) -> HostTarget:
    """The host run a target's figures are compared with: the same windows and tokens."""
    return HostTarget(kind="host", name="host", perplexity_windows=target.perplexity_windows,
                      perplexity_tokens=target.perplexity_tokens)
