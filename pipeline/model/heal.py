"""Heal a pruned model: a short fine-tune that recovers quality lost by dropping sublayers.

The student is the pruned model (from `prune.drop_sublayers`), the teacher the undropped one. Objectives:
distillation (KL(teacher || student) on the logits, optionally plus MSE between hidden states), next-token
cross-entropy on the text, or both. What trains: hand-written LoRA adapters (merged back into plain
nn.Linear weights afterwards, so saved and exported models keep the original module structure and
parameter names), only the norms, the MLPs around dropped attention, or everything.

Configured by the recipe block `pipeline.config.recipe.HealSpec`.
Owns the training windows (`heal_windows`), the loop (`heal`) and its loss curve (`write_curve`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .. import console
from ..artifacts import HealCurve
from ..config.recipe import HealSpec
from ..errors import DataError, ModelError, SlimformerError
from .adapters import adapter_for, decoder_layers, get_path
from .prune import drop_lists

CURVE_PNG = "heal_curve.png"
# ---------------------------------------------------------------- LoRA

class LoRALinear(nn.Module):
    """An nn.Linear plus a trainable low-rank update: y = base(x) + (x A^T B^T) * alpha / rank.

    The base layer is frozen. B starts at zero, so a fresh adapter leaves the output unchanged.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        base.requires_grad_(False)
        a = torch.empty(rank, base.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # nn.Linear's own initialisation
        kind = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a = nn.Parameter(a.to(**kind))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **kind))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> nn.Linear:
        """The base nn.Linear with the update folded into its weight (W + scale * B A)."""
        with torch.no_grad():
            self.base.weight.add_((self.lora_b @ self.lora_a) * self.scale)
        return self.base


def _parent_and_name(model: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    parent, _, name = qualified.rpartition(".")
    return (model.get_submodule(parent) if parent else model), name


def add_lora(model: nn.Module, names: Sequence[str], rank: int, alpha: float, seed: int = 0) -> list[str]:
    """Wrap every nn.Linear inside the decoder layers whose last name component is in `names` in a
    LoRALinear (initialised from a generator seeded by `seed`); returns the wrapped modules' names."""
    layers = get_path(model, adapter_for(model.config).layers)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    generator = torch.Generator().manual_seed(seed)
    targets = [n for n, m in model.named_modules()
               if n.startswith(prefix + ".") and isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in names]
    if not targets:
        found = sorted({n.rsplit(".", 1)[-1] for n, m in layers.named_modules() if isinstance(m, nn.Linear)})
        raise ModelError(f"heal.lora_modules {list(names)} match no nn.Linear inside the decoder layers; "
                         f"this model has: {', '.join(found)}. Set lora_modules to some of these.")
    for qualified in targets:
        parent, name = _parent_and_name(model, qualified)
        setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, generator))
    return targets


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear back into its plain nn.Linear, in place; module names and parameter names
    are then exactly those of the model before `add_lora`. Returns `model`."""
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for qualified in wrapped:
        parent, name = _parent_and_name(model, qualified)
        setattr(parent, name, getattr(parent, name).merged())
    return model


# ---------------------------------------------------------------- what trains

def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("RMSNorm")


def _norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)]


def mlps_near_dropped(model) -> list[int]:
    """Layers whose MLP `train: mlp-near-dropped` trains: those whose attention was dropped and the
    layer right after each, where the MLP itself was kept."""
    ad, layers = adapter_for(model.config), decoder_layers(model)
    dropped = drop_lists(model)["attention"]
    near = sorted({j for i in dropped for j in (i, i + 1) if j < len(layers)})
    return [i for i in near if getattr(layers[i], ad.mlp) is not None]


def _select_trainable(model, spec: HealSpec) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze (or add) what `spec.train` names; returns the trainable tensors."""
    model.requires_grad_(False)
    if spec.train == "all":
        params = list(model.parameters())
    elif spec.train == "norms":
        params = _norm_parameters(model)
    elif spec.train == "mlp-near-dropped":
        near = mlps_near_dropped(model)
        if not near:
            raise SlimformerError("heal.train: mlp-near-dropped trains the MLPs next to dropped attention "
                                  "sublayers, but this model has none; use train: lora or train: norms.")
        ad, layers = adapter_for(model.config), decoder_layers(model)
        params = [p for i in near for p in getattr(layers[i], ad.mlp).parameters()] + _norm_parameters(model)
    else:
        add_lora(model, spec.lora_modules, spec.lora_rank, spec.lora_alpha, spec.seed)
        params = [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b)]
    params = list({id(p): p for p in params}.values())  # a tied tensor once
    for p in params:
        p.requires_grad_(True)
    return params


# ---------------------------------------------------------------- data

def heal_windows(tokenizer, spec: HealSpec, calibration_files: list[Path] | None = None) -> np.ndarray:
    """int64 [n, spec.seq_len] training windows: every non-overlapping window the text gives, at most
    steps * batch_size of them (evenly spaced over the files when the text gives more).

    The text is `spec.files`, else `calibration_files`, else the packaged calibration split.
    """
    from .corpus import calibration_texts, token_windows

    texts = calibration_texts(spec.files if spec.files is not None else calibration_files)
    # Counted the way token_windows tokenises: each text plus a paragraph break, no special tokens.
    encoded = tokenizer([t + "\n\n" for t in texts], add_special_tokens=False, verbose=False)["input_ids"]
    available = sum(len(ids) for ids in encoded) // spec.seq_len
    if available < 1:
        raise DataError(f"heal: the training text has {sum(len(ids) for ids in encoded)} tokens, fewer than "
                        f"one window of seq_len {spec.seq_len}. Give more text (heal.files) or lower seq_len.")
    return token_windows(tokenizer, texts, min(available, spec.steps * spec.batch_size), spec.seq_len)


def _batch_order(n: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """[steps, batch_size] window indices: shuffled epochs over all n windows, one after another."""
    rng = np.random.default_rng(seed)
    epochs = -(-steps * batch_size // n)
    return np.concatenate([rng.permutation(n) for _ in range(epochs)])[: steps * batch_size].reshape(steps, -1)


# ---------------------------------------------------------------- training

@dataclass(frozen=True)
class HealResult:
    """The healed model and how training went."""

    model: Any  # the healed student: CPU, fp32, eval mode, LoRA merged
    curve: list[dict]  # per step: step, loss, seconds, lr, and the unweighted kl / ce / mse the objective uses
    seconds: float
    steps: int  # steps actually done
    stopped_by: Literal["steps", "time"]
    trainable_params: int
    device: str

    def record(self) -> HealCurve:
        return HealCurve(steps=self.steps, stopped_by=self.stopped_by, seconds=self.seconds,
                         trainable_params=self.trainable_params, device=self.device, curve=tuple(self.curve))


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay that reaches 0 after the last step."""
    if step < warmup:
        return (step + 1) / warmup
    done = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * done))


@contextmanager
def _as_teacher(model, device: torch.device):
    """`model` in eval mode on `device` for the duration; its mode and device are restored after."""
    training, home = model.training, next(model.parameters()).device
    model.eval().to(device)
    try:
        yield model
    finally:
        model.to(home).train(training)


def _losses(student, teacher, ids: torch.Tensor, spec: HealSpec) -> dict[str, torch.Tensor]:
    """The loss terms the objective uses: kl, ce, mse (each a scalar), and their weighted sum `loss`."""
    distill = "distill" in spec.objective
    hidden = distill and spec.hidden_mse_weight > 0
    out = student(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    logits, terms = out.logits.float(), {}
    if distill:
        with torch.no_grad():
            want = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        t = spec.temperature
        log_s = torch.log_softmax(logits / t, dim=-1)
        log_t = torch.log_softmax(want.logits.float() / t, dim=-1)
        terms["kl"] = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * t * t
        if hidden:
            pairs = list(zip(out.hidden_states[1:], want.hidden_states[1:], strict=True))
            terms["mse"] = sum(nn.functional.mse_loss(s.float(), w.float()) for s, w in pairs) / len(pairs)
    if spec.objective != "distill":
        terms["ce"] = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                  ids[:, 1:].reshape(-1))
    terms["loss"] = terms.get("kl", 0) + terms.get("ce", 0) + spec.hidden_mse_weight * terms.get("mse", 0)
    return terms


def _check_windows(windows: np.ndarray, vocab_size: int) -> None:
    if windows.ndim != 2 or len(windows) < 1 or windows.shape[1] < 2:
        raise DataError(f"heal needs token windows shaped [n >= 1, seq_len >= 2], got shape {windows.shape}; "
                        "build them with heal_windows.")
    if windows.min() < 0 or windows.max() >= vocab_size:
        raise DataError(f"heal windows hold token ids {windows.min()}..{windows.max()}, outside the model's "
                        f"vocabulary 0..{vocab_size - 1}; tokenise with the model's own tokenizer.")


def heal(student, teacher, windows: np.ndarray, spec: HealSpec, progress: bool = True) -> HealResult:
    """Fine-tune a copy of `student` (the pruned model) towards `teacher` (the undropped one) and/or the text.

    `windows` is int64 [n, seq_len] token ids; batches come from it in shuffled epochs drawn with
    `numpy.random.default_rng(spec.seed)`. Runs on CUDA when available, else CPU; the student trains in
    eval mode so that dropout stays off, and with the same inputs and seed the healed weights are
    bit-identical on the same machine (on CPU). Neither argument is modified (the teacher is moved to the
    device and back). Raises SlimformerError if the loss stops being finite.
    """
    windows = np.asarray(windows)
    _check_windows(windows, student.config.vocab_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = copy.deepcopy(student).float().to(device).eval()
    torch.manual_seed(spec.seed)
    params = _select_trainable(model, spec)
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=0.0)
    warmup = min(spec.warmup_steps, spec.steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, spec.steps, warmup))
    order = _batch_order(len(windows), spec.steps, spec.batch_size, spec.seed)
    data = torch.from_numpy(windows.astype(np.int64))
    curve, stopped_by = [], "steps"
    start = time.perf_counter()
    with _as_teacher(teacher, device), console.progress(total=spec.steps, desc="heal", disable=None if progress else True) as bar:
        for step, rows in enumerate(order):
            lr = optimizer.param_groups[0]["lr"]
            terms = _losses(model, teacher, data[rows].to(device), spec)
            loss = terms["loss"]
            if not torch.isfinite(loss):
                raise SlimformerError(f"heal: the loss became {loss.item()} at step {step + 1}; training "
                                      f"diverged. Lower heal.learning_rate (now {spec.learning_rate:g}).")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            seconds = time.perf_counter() - start
            curve.append({"step": step + 1, "loss": loss.item(), "seconds": seconds, "lr": lr,
                          **{k: v.item() for k, v in terms.items() if k != "loss"}})
            bar.set_postfix(loss=f"{curve[-1]['loss']:.4f}", refresh=False)
            bar.update()
            if spec.max_seconds is not None and seconds >= spec.max_seconds and step + 1 < spec.steps:
                stopped_by = "time"
                break
    merge_lora(model)
    model.requires_grad_(True)
    model = model.cpu().eval()
    return HealResult(model=model, curve=curve, seconds=time.perf_counter() - start, steps=len(curve),
                      stopped_by=stopped_by, trainable_params=sum(p.numel() for p in params),
                      device=str(device))


# ---------------------------------------------------------------- loss curve

def plot_curve(result: HealResult, path: Path) -> Path:
    """PNG of the training loss per step (and of its kl / ce / mse terms when there are several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in result.curve]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    ax.plot(steps, [row["loss"] for row in result.curve], "-", label="loss", linewidth=1.5)
    parts = [k for k in ("kl", "ce", "mse") if result.curve and k in result.curve[0]]
    for key in parts if len(parts) > 1 else ():
        ax.plot(steps, [row[key] for row in result.curve], "--", label=key, linewidth=1)
    if all(row["loss"] > 0 for row in result.curve):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"Heal: {result.steps} steps in {result.seconds:.0f} s on {result.device} "
                 f"(stopped by {result.stopped_by}), {result.trainable_params:,} trainable parameters",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def write_curve(result: HealResult, folder: Path) -> tuple[Path, Path]:
    """Write heal_curve.json (a HealCurve record) and heal_curve.png into `folder`; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return result.record().write(folder), plot_curve(result, folder / CURVE_PNG)
