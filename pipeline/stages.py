"""The stage order, owned here and nowhere else:

recipe -> checks -> model -> scores (and head scores) -> plan (and head plan) -> pruned (and healed) model ->
ONNX export -> quantised variants -> mobile packages -> validation -> report and run folder.

Each stage is a function with typed input and output. `run` chains them inside a staged folder that is renamed
into place only when every stage has finished. `prepare` (checks, then the model) is the front of every command
that loads a model: `run`, the benches and `targets`; the benches then call the same stage functions.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import console
from .artifacts import (DropPlan, HeadPlan, HeadScores, HealSummary, ModelInfo, OnnxExport, Packages, Report, Scores,
                        TargetsReport)
from .config.checks import model_problems, path_problem, recipe_problems, target_problems, unready_targets
from .config.recipe import CalibrationSpec, DropSpec, ExportSpec, HeadsSpec, Recipe, WindowSpec
from .errors import DataError, GateError, ModelError, RecipeError, SlimformerError

STAGES = ("check", "load model", "score", "heads", "plan", "search", "drop", "heal", "export", "quantize",
          "package", "validate", "report")
# Encoded by onnxruntime-genai's tokenizer and by the Hugging Face one; both must give the same ids.
GENAI_CHECK_TEXT = "Hello, world!  It's 2026; caf\u00e9 prices rose 3.5%\n\tand then\u2014fell."


@contextmanager
def stage(name: str, timings: dict | None = None):
    with console.stage(STAGES.index(name) + 1, len(STAGES), name, timings):
        yield


@dataclass(frozen=True)
class Prepared:
    """A checked recipe and its loaded model: the common start of every command."""

    recipe: Recipe
    info: ModelInfo
    loaded: object  # pipeline.model.loading.LoadedModel


# ---------------------------------------------------------------- checks and loading

def preflight(recipe: Recipe) -> ModelInfo:
    """Every check a recipe allows before loading weights, all problems in one RecipeError: the recipe's own
    (files, names, targets), the model's config or GGUF metadata (architecture, drop limits, Core ML, tied
    tables), the text split (calibration or healing text must not overlap evaluation text) and a budget below the
    smallest reachable model (memory and decode limits measure the target once, cached). Candidate source models
    are checked like the model; the model's figures are returned."""
    problems = recipe_problems(recipe)
    infos = source_infos(recipe, problems)
    if not problems:
        problems += _overlap_problems(recipe)
    if not problems and recipe.budget is not None:
        from .budget import budget_problems

        problems += budget_problems(recipe, infos)
    if problems:
        raise RecipeError(problems)
    return infos[recipe.model.key]


def source_infos(recipe: Recipe, problems: list[str]) -> dict[str, ModelInfo]:
    """The figures of the model and of each candidate as exported (positions capped at export.max_length), by
    `SourceSpec.key`; what cannot be read or does not fit the recipe is added to `problems` (a candidate's
    prefixed with its key)."""
    from .model.loading import read_model_info

    infos, several = {}, bool(recipe.model.candidates)
    for n, spec in enumerate(recipe.model.sources()):
        where = "model" if n == 0 else f"model.candidates[{n - 1}]"
        if spec.path is not None and path_problem(spec.path) is not None:
            continue  # reported with the recipe's files
        try:
            info = read_model_info(spec.source, name=spec.name, path=spec.path)
        except ModelError as e:
            problems.append(f"{where}: {e}")
            continue
        problems += [f"{spec.key}: {p}" if several else p for p in model_problems(recipe.for_source(spec), info)]
        # the shape as exported: the budget prices rotary caches of export.max_length rows
        infos[spec.key] = info.with_max_length(recipe.export.max_length)
    return infos


def _overlap_problems(recipe: Recipe) -> list[str]:
    from .model.corpus import check_disjoint

    held_out = evaluation_files(recipe)
    sides = [(recipe.calibration.files, "calibration")]
    if recipe.heal is not None:
        sides.append((recipe.heal.files or recipe.calibration.files, "healing"))
    problems = []
    for files, role in sides:
        try:
            check_disjoint(files, held_out, role=role)
        except DataError as e:
            problems.append(str(e))
    return problems


def evaluation_files(recipe: Recipe) -> list[Path]:
    """Every file evaluation reads (held-out text and distractors), packaged defaults included."""
    from .model.corpus import default_files

    v = recipe.validate_
    split = default_files() if v.files is None or v.distractor_files is None else {}
    return [*(v.files if v.files is not None else split["evaluation"]),
            *(v.distractor_files if v.distractor_files is not None else split["distractor"])]


def load(recipe: Recipe):
    """The model and tokenizer the recipe names (a packaged model is converted once and cached)."""
    from .model.loading import load_model

    return load_model(recipe.model.source, name=recipe.model.name, path=recipe.model.path)


def prepare(recipe: Recipe, timings: dict | None = None) -> Prepared:
    with stage("check", timings):
        info = preflight(recipe)
    with stage("load model", timings):
        loaded = load(recipe)
    return Prepared(recipe, info, loaded)


# ---------------------------------------------------------------- model stages

WINDOW_SAMPLES = 4  # calibration windows of twice the window size that fit the sinks and rank the layers


def score(model, tokenizer, spec: CalibrationSpec, name: str, window: WindowSpec | None = None) -> Scores:
    """Importance of every sublayer; with a window, each layer's cost when windowed and its fitted sinks."""
    import dataclasses

    from .model.scoring import score_model

    scores = score_model(model, calibration_windows(tokenizer, spec), batch_size=spec.batch_size, name=name)
    if window is None:
        return scores
    from .model.corpus import calibration_texts, token_windows
    from .model.window import measure_windows

    long = token_windows(tokenizer, calibration_texts(spec.files), WINDOW_SAMPLES,
                         min(2 * window.size, model.config.max_position_embeddings))
    kl, sinks = measure_windows(model, long, window.size)
    return dataclasses.replace(scores, window_kl=tuple(kl), window_size=window.size,
                               window_sinks={i: tuple(s) for i, s in sinks.items()})


def analyse_heads(model, tokenizer, recipe: Recipe, name: str) -> HeadScores:
    """Every attention head's figures from one pass over calibration windows (the recipe's `heads` block)."""
    from .model.heads import score_heads

    cal, spec = recipe.calibration, recipe.heads or HeadsSpec()
    windows = calibration_windows(tokenizer, cal.model_copy(update={"samples": spec.samples or cal.samples}))
    return score_heads(model, windows, batch_size=cal.batch_size, name=name)


def plan(scores: Scores, spec: DropSpec) -> DropPlan:
    from .model.plan import plan_drop, plan_window

    drop_plan = plan_drop(scores, joint=spec.joint, attention=spec.attention, mlp=spec.mlp, blocks=spec.blocks)
    if spec.window is None:
        return drop_plan
    return plan_window(scores, drop_plan, spec.window.layers, spec.window.size)


def plan_heads(head_scores: HeadScores, spec: DropSpec, drop_plan: DropPlan) -> HeadPlan:
    """KV groups and query heads to remove, in layers whose attention `drop_plan` keeps."""
    from .model.plan import plan_heads as plan_

    return plan_(head_scores, heads=spec.heads, query_heads=spec.query_heads, dropped_attention=drop_plan.attention)


def drop(model, drop_plan: DropPlan, tokenizer, folder: Path | None = None, head_plan: HeadPlan | None = None):
    """The pruned model (a new object); also saved as a Hugging Face folder that reloads identically."""
    from .model.prune import drop_sublayers
    from .model.prune_heads import prune_heads_inplace
    from .model.window import set_windows_inplace

    pruned = drop_sublayers(model, list(drop_plan.attention), list(drop_plan.mlp))
    if head_plan is not None:
        prune_heads_inplace(pruned, {k: list(v) for k, v in head_plan.kv_groups.items()},
                            {k: list(v) for k, v in head_plan.query_heads.items()})
    if drop_plan.window:
        set_windows_inplace(pruned, list(drop_plan.window), drop_plan.window_size, drop_plan.window_sinks)
    if folder is not None:
        pruned.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return pruned


def heal(pruned, original, tokenizer, recipe: Recipe, data, folder: Path | None = None, before=None,
         progress: bool = True) -> tuple[object, HealSummary]:
    """(healed model, summary): the pruned model fine-tuned by the recipe's heal block, with held-out perplexity
    and accuracy before and after (PyTorch, same data; `before` when already measured). With a `folder`, the
    healed weights replace `folder/hf` (export reads them) and the loss curve is written there."""
    from .measure.torch_lm import torch_accuracy
    from .model.heal import heal as train, heal_windows, write_curve
    from .rundir import sha256_file

    spec = recipe.heal
    windows = heal_windows(tokenizer, spec, recipe.calibration.files)
    before = before or torch_accuracy(pruned, data)
    result = train(pruned, original, windows, spec, progress=progress)
    after = torch_accuracy(result.model, data)
    weights = None
    if folder is not None:
        write_curve(result, folder)
        result.model.save_pretrained(folder / "hf")
        weights = sha256_file(folder / "hf" / "model.safetensors")
    console.say(f"heal: perplexity {before.perplexity:.3f} -> {after.perplexity:.3f}, multiple choice "
                f"{before.mc_accuracy:.3f} -> {after.mc_accuracy:.3f} ({result.steps} steps, {result.seconds:.0f} s)")
    return result.model, HealSummary(
        objective=spec.objective, train=spec.train, steps=result.steps, stopped_by=result.stopped_by,
        seconds=result.seconds, device=result.device, trainable_params=result.trainable_params,
        windows=int(len(windows)), tokens_seen=result.steps * spec.batch_size * spec.seq_len,
        first_loss=result.curve[0]["loss"], last_loss=result.curve[-1]["loss"], before=before, after=after,
        weights_sha256=weights)


# ---------------------------------------------------------------- files

def export(model, tokenizer, folder: Path, spec: ExportSpec) -> OnnxExport:
    """The compressed model as fp32 ONNX (fused or optimum graph), with its config and tokenizer files."""
    if spec.graph == "fused":
        from .export.fused import export_fused

        result = export_fused(model, folder, opset=spec.opset, max_length=spec.max_length)
        model.config.save_pretrained(folder)
    else:
        from .export.onnx import export_onnx

        result = export_onnx(model, folder, opset=spec.opset)
    tokenizer.save_pretrained(folder)
    return result


def baseline_onnx(loaded, spec: ExportSpec) -> Path:
    """The undropped model's fp32 ONNX, written by the same exporter as the compressed model (so the report
    compares compression, not two graph layouts), once, and cached under a key of everything it depends on:
    the weights, config.json, the graph kind, the rotary caches' length, the exporter's code and the library
    versions."""
    from .export import fused, onnx
    from .model.assets import home
    from .rundir import library_versions, sha256_file, sha256_json, staged_folder

    exporter = fused if spec.graph == "fused" else onnx
    key = {"weights": loaded.source_sha256, "config": loaded.model.config.to_dict(), "graph": spec.graph,
           "opset": spec.opset, "max_length": spec.max_length, "exporter": sha256_file(Path(exporter.__file__)),
           "libraries": library_versions()}
    folder = home() / "baselines" / sha256_json(key)[:24]
    if not (folder / "model.onnx").exists():
        with staged_folder(folder) as tmp:
            if spec.graph == "fused":
                fused.export_fused(loaded.model, tmp, opset=spec.opset, max_length=spec.max_length)
            else:
                onnx.export_onnx(loaded.model, tmp, opset=spec.opset)
            (tmp / "key.json").write_text(yaml.safe_dump(key, sort_keys=True))
    return folder / "model.onnx"


def quantize(exported: OnnxExport, specs, folder: Path, pruned=None, loaded=None,
             calibration: CalibrationSpec | None = None, opset: int = 18,
             max_length: int | None = None) -> dict[str, Path]:
    """One folder per quantised variant (`onnx-<name>/`), with the fp32 folder's config and tokenizer files.
    A fused graph is written again from the (pruned) model with quantised weights; an optimum graph is
    rewritten by onnxruntime's quantisers."""
    from .export.quantize import quantize_onnx

    variants, gguf, windows = {}, None, None
    for spec in specs:
        out = folder / f"onnx-{spec.name}"
        if exported.graph == "fused" and spec.kind != "onnx-fp16":
            if spec.source_blocks and loaded.gguf is not None and gguf is None:
                from .export.gguf_blocks import GgufBlocks

                gguf = GgufBlocks(loaded.gguf)
            if (spec.algorithm == "gptq" or spec.eight_bit_groups) and windows is None:
                windows = calibration_windows(loaded.tokenizer, calibration)
            variants[spec.name] = quantize_fused(spec, pruned, out, gguf, windows, opset, max_length).path
        else:
            variants[spec.name] = quantize_onnx(exported.path, out, spec).path
        for extra in exported.path.parent.iterdir():
            if extra.suffix != ".onnx" and not extra.name.endswith(".onnx_data"):
                shutil.copy2(extra, out / extra.name)
    return variants


SENSITIVITY_WINDOWS = 8  # calibration windows for the per-group KL (every group is measured on the same ones)


def quantize_fused(spec, model, out: Path, gguf=None, windows=None, opset: int = 18,
                   max_length: int | None = None) -> OnnxExport:
    """`model` as a fused graph quantised as `spec` says: GPTQ's Hessians and the sensitivities that pick the
    8-bit groups come from the calibration `windows`."""
    from .export.fused import export_fused
    from .export.policy import TABLES, make_quantizer
    from .model.calibration import group_sensitivity, input_hessians
    from .model.groups import linear_groups, tied

    hessians = input_hessians(model, windows) if spec.algorithm == "gptq" else None
    quantizer = make_quantizer(spec, tied(model), gguf, hessians)
    if spec.eight_bit_groups:
        body = [g for g in linear_groups(model) if g not in TABLES]
        kl = group_sensitivity(model, quantizer, windows[:SENSITIVITY_WINDOWS], body, console.progress)
        eight = frozenset(sorted(body, key=kl.get, reverse=True)[:spec.eight_bit_groups])
        quantizer = make_quantizer(spec, tied(model), gguf, hessians, eight)
    return export_fused(model, out, quantizer, spec.accuracy_level, opset, max_length=max_length)


def calibration_windows(tokenizer, spec: CalibrationSpec):
    from .model.corpus import calibration_texts, token_windows

    return token_windows(tokenizer, calibration_texts(spec.files), spec.samples, spec.seq_len)


def package(variants: dict[str, Path], pruned, tokenizer, spec: ExportSpec, folder: Path) -> Packages:
    """Mobile deliverables: .ort files and onnxruntime-genai folders per ONNX variant, Core ML packages."""
    import dataclasses

    from .artifacts import GenaiFolder
    from .export.mobile import genai_tokenizer_problem, ort_parity, to_ort_format, write_genai_folder

    ort, genai, coreml = {}, {}, []
    check_ids = [tokenizer(GENAI_CHECK_TEXT, add_special_tokens=False)["input_ids"]]
    for name, path in variants.items():
        if spec.ort_format:
            converted = to_ort_format(path, folder / f"ort-{name}")
            ort[name] = dataclasses.replace(converted, parity_vs_onnx=ort_parity(path, converted.path, check_ids))
        if spec.genai:
            out = write_genai_folder(path, pruned.config, tokenizer, folder / f"genai-{name}")
            # Apps may tokenise on their own, so a tokenizer genai misreads is reported, not fatal.
            genai[name] = GenaiFolder(out, genai_tokenizer_problem(out, tokenizer, GENAI_CHECK_TEXT))
    if spec.coreml is not None:
        from .export.coreml import export_coreml, predict_parity

        coreml = [dataclasses.replace(p, numerics=predict_parity(p, pruned, [[1, 2, 3, 4]]))
                  for p in export_coreml(pruned, folder / "coreml", spec.coreml)]
    return Packages(ort=ort, genai=genai, coreml=tuple(coreml))


# ---------------------------------------------------------------- the run

def run(recipe: Recipe, cache=None) -> Path:
    """Run every stage; return the finished run folder. Raises GateError (after writing) if a gate fails.
    With a `pipeline.stagecache.StageCache`, score, export, quantize, package and the variants' accuracy are
    reused when their inputs are unchanged."""
    from .rundir import new_run_path, staged_folder

    start, timings = time.perf_counter(), {}
    with stage("check", timings):
        info = preflight(recipe)
    final = new_run_path(recipe.output.dir, recipe.name)
    with staged_folder(final) as tmp:
        log = tmp / "run.log"
        try:
            with console.capture(log):
                if recipe.budget is None:
                    report = _stages(recipe, info, tmp, timings, start, cache)
                else:  # the budget search is not cached: every run searches afresh
                    report = _budget_stages(recipe, info, tmp, timings, start)
        except Exception:  # a failure, not Ctrl-C or a kill: keep the library output that may explain it
            if log.is_file():
                failed = final.with_name(final.name + ".failed.log")
                shutil.copy2(log, failed)
                console.say(f"library output of the failed run: {failed}")
            raise
    print((final / "report.md").read_text())
    print(f"run folder: {final}\nwall time: {report.wall_seconds:.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in report.stage_seconds.items())})")
    if not report.passed:
        raise GateError(report.failures(), str(final))
    return final


def _stages(recipe: Recipe, info: ModelInfo, tmp: Path, timings: dict, start: float, cache=None) -> Report:
    from . import stagecache as sc
    from .measure.validate import prepare_eval_data, validate

    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe.resolved(), sort_keys=False))
    with stage("load model", timings):
        loaded = load(recipe)
    with stage("score", timings):
        scores = sc.cached(
            cache, "score", lambda: sc.score_key(recipe, loaded.source_sha256), tmp,
            lambda: score(loaded.model, loaded.tokenizer, recipe.calibration, loaded.description, recipe.drop.window),
            Scores)
        scores.write(tmp)
    head_scores = head_plan = None
    if recipe.heads is None and not recipe.drop.prunes_heads:
        console.skipped(STAGES.index("heads") + 1, len(STAGES), "heads",
                        "the recipe neither analyses nor removes heads")
    else:
        with stage("heads", timings):
            head_scores = analyse_heads(loaded.model, loaded.tokenizer, recipe, loaded.description)
            head_scores.write(tmp)
    with stage("plan", timings):
        drop_plan = plan(scores, recipe.drop)
        drop_plan.write(tmp)
        if recipe.drop.prunes_heads:
            head_plan = plan_heads(head_scores, recipe.drop, drop_plan)
            head_plan.write(tmp)
    console.skipped(STAGES.index("search") + 1, len(STAGES), "search", "the recipe has no budget block")
    with stage("drop", timings):
        pruned = drop(loaded.model, drop_plan, loaded.tokenizer, tmp / "hf", head_plan)
        _copy_terms(loaded, tmp / "hf")
    data = prepare_eval_data(loaded.tokenizer, recipe.validate_)
    healing = None
    if recipe.heal is None:
        console.skipped(STAGES.index("heal") + 1, len(STAGES), "heal", "the recipe has no heal block")
    else:
        with stage("heal", timings):
            pruned, healing = heal(pruned, loaded.model, loaded.tokenizer, recipe, data, tmp)
    with stage("export", timings):
        exported = sc.cached(cache, "export", lambda: sc.export_key(recipe, loaded.source_sha256, tmp), tmp,
                             lambda: export(pruned, loaded.tokenizer, tmp / "onnx", recipe.export), OnnxExport)
        _copy_terms(loaded, tmp / "onnx")  # quantised variants copy the fp32 folder's files
        original_onnx = baseline_onnx(loaded, recipe.export)
    with stage("quantize", timings):
        variants = {"compressed": exported.path, **sc.cached(
            cache, "quantize", lambda: sc.quantize_key(recipe, loaded.source_sha256, tmp), tmp,
            lambda: quantize(exported, recipe.quantize, tmp, pruned, loaded, recipe.calibration, recipe.export.opset,
                             recipe.export.max_length),
            dict[str, Path])}
    with stage("package", timings):
        packages = sc.cached(cache, "package", lambda: sc.package_key(recipe, loaded.source_sha256, tmp, variants),
                             tmp, lambda: package(variants, pruned, loaded.tokenizer, recipe.export, tmp), Packages)
    with stage("validate", timings):
        work = tmp / "validation"
        work.mkdir()
        params = {"original": _params_m(loaded.model), "compressed": _params_m(pruned)}
        validation = validate(original_onnx, variants, params, pruned, data, recipe.validate_, work,
                              original_onnx.parent, sc.accuracy_folder(cache))
        shutil.rmtree(work)
    with stage("report", timings):
        report = Report(name=recipe.name, plan=drop_plan, heal=healing, validation=validation, packages=packages,
                        stage_seconds=dict(timings), wall_seconds=round(time.perf_counter() - start, 1),
                        cached_stages=sc.reused(cache, validation), head_plan=head_plan)
        write_report(report, scores, tmp, head_scores)
        _manifest(tmp, recipe, loaded, variants, report)
    return report


def _copy_terms(loaded, folder: Path) -> None:
    """The licence terms a model ships with go into every model folder made from it."""
    for terms in loaded.terms:
        shutil.copy2(terms, folder / terms.name)


# ---------------------------------------------------------------- budgeted runs

@dataclass(frozen=True)
class LadderOutcome:
    """What `run` needs of a ladder run: the rungs' verdicts and the times."""

    reports: dict[str, Report]
    stage_seconds: dict[str, float]
    wall_seconds: float

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.reports.values())

    def failures(self) -> list[str]:
        return [f"{name}: {f}" for name, r in self.reports.items() for f in r.failures()]


@dataclass
class _Searched:
    """One source model's part of a budgeted run: its recipe, weights, scores, evaluation data, search outcome
    and, when models compete, each chosen structure's bits per byte of calibration text."""

    recipe: Recipe
    loaded: object  # pipeline.model.loading.LoadedModel
    scores: Scores
    data: object  # pipeline.measure.validate.EvalData
    found: object  # pipeline.budget.SearchOutcome
    bits: dict[str, float]


def _budget_stages(recipe: Recipe, info: ModelInfo, tmp: Path, timings: dict, start: float):
    """Per source model (the model, then any candidates): score -> search (per budget it can reach); then for
    each budget the model whose choice has the fewest bits per byte: drop, export, package, validate, report;
    then the Pareto records and, for a ladder, ladder.json. A single budget's model is written like any run's; a
    ladder's rungs go to rungs/<name>/, each candidate's search record to candidates/<key>/."""
    from .ladder import RungSource, ladder, ladder_markdown

    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe.resolved(), sort_keys=False))
    sources, several = recipe.model.sources(), bool(recipe.budget.ladder)
    infos = source_infos(recipe, []) if len(sources) > 1 else {recipe.model.key: info}
    searched = {}
    for spec in sources:
        if len(sources) > 1:
            console.say(f"source model {spec.key}:")
        folder = tmp / "candidates" / spec.key if len(sources) > 1 else tmp
        folder.mkdir(parents=True, exist_ok=True)
        searched[spec.key] = _search_source(recipe.for_source(spec), infos[spec.key], folder, timings,
                                            compare=len(sources) > 1)
    reports, folders, picked = {}, {}, {}
    for name, limits in recipe.budget.rungs():
        keys = [k for k, s in searched.items() if name in s.found.chosen]
        picked[name] = key = min(keys, key=lambda k: searched[k].bits.get(name, 0.0))
        s = searched[key]
        folders[name] = tmp / "rungs" / name if several else tmp
        folders[name].mkdir(parents=True, exist_ok=True)
        if len(sources) > 1:
            console.say(f"rung {name}: {key} (bits per byte of calibration text: "
                        f"{', '.join(f'{k} {searched[k].bits[name]:.4f}' for k in keys)})")
        elif several:
            console.say(f"rung {name}:")
        reports[name] = _rung(s.recipe, s.loaded, s.found, name, limits, folders[name], s.data, dict(timings), start,
                              s.scores, {k: searched[k].bits[name] for k in keys if name in searched[k].bits})
    outcome = reports[name] if not several else LadderOutcome(
        reports, dict(timings), round(time.perf_counter() - start, 1))
    if several:
        record = ladder(recipe, reports, folders, tmp, {n: RungSource(
            k, searched[k].loaded.description, searched[k].found.space.calibration, searched[k].loaded.tokenizer,
            searched[k].data.windows) for n, k in picked.items()})
        record.write(tmp)
        plots = [f"candidates/{k}/pareto.png" for k in searched] if len(sources) > 1 else ["pareto.png"]
        (tmp / "report.md").write_text(ladder_markdown(record, plots))
    variants = {n: (folders[n] / f"onnx-{n}" / "model.onnx") for n in reports}
    _manifest(tmp, recipe, [s.loaded for s in searched.values()], variants, outcome)
    return outcome


def _search_source(recipe: Recipe, info: ModelInfo, folder: Path, timings: dict, compare: bool) -> _Searched:
    """Load one source model, score it and search it for every budget it can reach; its scores, Pareto record
    and sensitivities go to `folder`. With `compare`, each chosen structure's bits per byte of calibration text
    (the search's last selection step's windows) is measured for the choice between models."""
    from .budget import search
    from .measure.pareto import plot_pareto
    from .measure.validate import prepare_eval_data
    from .model.corpus import bits_per_byte

    with stage("load model", timings):
        loaded = load(recipe)
    with stage("score", timings):
        scores = score(loaded.model, loaded.tokenizer, recipe.calibration, loaded.description)
        scores.write(folder)
    console.skipped(STAGES.index("heads") + 1, len(STAGES), "heads", "budgeted runs do not analyse heads")
    console.skipped(STAGES.index("plan") + 1, len(STAGES), "plan", "the budget search chooses what to drop")
    data = prepare_eval_data(loaded.tokenizer, recipe.validate_)
    windows = calibration_windows(loaded.tokenizer, recipe.calibration)
    bits = {}
    with stage("search", timings):
        found = search(recipe, loaded, info, scores, windows, data.windows)
        found.pareto.write(folder)
        found.sensitivities.write(folder)
        plot_pareto(found.pareto, folder / "pareto.png")
        if compare:
            scored = windows[:recipe.budget.search.selection[-1].windows]
            bits = {name: bits_per_byte(found.evaluator.perplexity(found.space.structure(c), scored),
                                        loaded.tokenizer, scored) for name, c in found.chosen.items()}
    return _Searched(recipe, loaded, scores, data, found, bits)


def _rung(recipe: Recipe, loaded, found, name: str, limits, folder: Path, data, timings: dict, start: float,
          scores: Scores, compared: dict[str, float] | None = None) -> Report:
    from .ladder import choice, drop_plan, export_choice, gates_with_floor, measured_footprint, structure_weights
    from .measure.validate import validate
    from .model.calibration import fake_quantized

    c = found.chosen[name]
    with stage("drop", timings):
        planned = drop_plan(found.space, c)
        pruned = drop(loaded.model, planned, loaded.tokenizer, folder / "hf")
        _copy_terms(loaded, folder / "hf")
        planned.write(folder)
    console.skipped(STAGES.index("heal") + 1, len(STAGES), "heal", "budgeted models are not healed")
    with stage("export", timings):
        original_onnx = baseline_onnx(loaded, recipe.export)
    with stage("quantize", timings):
        path = export_choice(pruned, found.space, c, found.evaluator, recipe, loaded.tokenizer, folder / f"onnx-{name}")
        _copy_terms(loaded, path.parent)
    with stage("package", timings):
        packages = package({name: path}, pruned, loaded.tokenizer, recipe.export, folder)
    with stage("validate", timings):
        work = folder / "validation"
        work.mkdir()
        spec = gates_with_floor(recipe.validate_, name, limits.max_perplexity_increase_pct)
        params = {"original": _params_m(loaded.model), "compressed": _params_m(pruned)}
        # parity against the pruned model computing as the file does (its weights, int8 inputs at accuracy
        # level 4): what is left is the export's error
        with fake_quantized(pruned, structure_weights(found.space.structure(c), found.evaluator),
                            int8_inputs=found.evaluator.inputs is not None):
            validation = validate(original_onnx, {name: path}, params, pruned, data, spec, work, original_onnx.parent)
        measured = measured_footprint(recipe, path, work)
        shutil.rmtree(work)
    with stage("report", timings):
        budget = choice(recipe, name, limits, found.space, c, found.kl[name], path, measured, compared)
        budget.write(folder)
        report = Report(name=recipe.name if folder.name != name else f"{recipe.name} / {name}", plan=planned,
                        heal=None, validation=validation, packages=packages, stage_seconds=dict(timings),
                        wall_seconds=round(time.perf_counter() - start, 1), budget=budget)
        write_report(report, scores, folder)
    return report


def _params_m(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def write_report(report: Report, scores: Scores, folder: Path, head_scores: HeadScores | None = None) -> None:
    from .measure.heads_report import plot_heads
    from .measure.report import markdown, plot_importance

    report.write(folder)
    plot_importance(scores, report.plan, folder / "importance.png")
    if head_scores is not None:
        plot_heads(head_scores, report.head_plan, folder / "heads.png")
    (folder / "report.md").write_text(markdown(report, head_scores))


def _manifest(folder: Path, recipe: Recipe, loaded, variants: dict[str, Path], report: Report) -> None:
    """manifest.json; `loaded` is the run's model, or (a budgeted run with candidates) every source model."""
    from .rundir import sha256_json, write_manifest

    models = [{"description": m.description, "sha256": m.source_sha256, "terms": [t.name for t in m.terms]}
              for m in (loaded if isinstance(loaded, list) else [loaded])]
    write_manifest(folder, {"name": recipe.name, "recipe_sha256": sha256_json(recipe.resolved()),
                            "source_model": models[0], **({"candidate_models": models[1:]} if len(models) > 1 else {}),
                            "variants": {name: str(path.relative_to(folder)) for name, path in variants.items()},
                            "passed": report.passed})


# ---------------------------------------------------------------- head analysis alone

def heads(recipe: Recipe, out: Path | None = None) -> Path:
    """`slimformer heads`: the head analysis of the recipe's model into a folder of its own (heads.json,
    heads.png, heads.md); with a head drop in the recipe, the groups it would remove too (head_plan.json)."""
    from .measure.heads_report import heads_section, plot_heads
    from .rundir import new_run_path, staged_folder

    prepared = prepare(recipe)
    model, tokenizer, name = prepared.loaded.model, prepared.loaded.tokenizer, prepared.loaded.description
    final = Path(out) if out is not None else new_run_path(recipe.output.dir, f"{recipe.name}-heads")
    with staged_folder(final) as tmp:
        with stage("heads"):
            head_scores = analyse_heads(model, tokenizer, recipe, name)
            head_plan = None
            if recipe.drop.prunes_heads:
                head_plan = plan_heads(head_scores, recipe.drop, plan(score(model, tokenizer, recipe.calibration, name),
                                                                      recipe.drop))
                head_plan.write(tmp)
        head_scores.write(tmp)
        plot_heads(head_scores, head_plan, tmp / "heads.png")
        text = "\n".join([f"# Attention heads: {recipe.name}", *heads_section(head_scores, head_plan)]) + "\n"
        (tmp / "heads.md").write_text(text)
    print(text + f"\nfolder: {final}")
    return final


# ---------------------------------------------------------------- a finished run on other targets

def check_run(run_dir: Path, targets: list, out: Path | None = None) -> Path:
    """Validate the files a finished run folder ships on `targets`, judged against that run's pruned PyTorch
    model and the host; writes targets.json and targets.md to a new folder (`out`, default beside the run).
    variant_tolerances may name variants this run lacks: one targets file serves runs of several recipes."""
    import json

    from .config.loading import load_recipe
    from .measure.judge import check_targets
    from .measure.report import gates_section, targets_section
    from .measure.validate import prepare_eval_data, write_runner_inputs
    from .model.loading import load_hf_folder
    from .rundir import new_run_path, staged_folder

    run_dir = Path(run_dir)
    if path_problem(run_dir / "manifest.json"):
        raise SlimformerError(f"{run_dir} is not a finished run folder (no manifest.json); pass a folder that "
                              "`slimformer run` wrote, e.g. runs/smollm2-135m-<time>")
    problems = target_problems(targets) + unready_targets(targets)
    if problems:
        raise RecipeError(problems)
    recipe = load_recipe(run_dir / "recipe.yaml")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    variants = {name: run_dir / rel for name, rel in manifest["variants"].items()}
    final = Path(out) if out is not None else new_run_path(run_dir.parent, f"{run_dir.name}-targets")
    with staged_folder(final) as tmp, console.capture(tmp / "targets.log"):
        pruned, tokenizer = load_hf_folder(run_dir / "hf")
        data = prepare_eval_data(tokenizer, recipe.validate_)
        inputs = tmp / "eval_inputs.npz"
        reference = write_runner_inputs(inputs, pruned, data, recipe.validate_.parity_decode_steps, mc=False)
        rows, gates = check_targets(targets, variants, inputs, reference, tmp / "work", recipe.validate_.latency)
        result = TargetsReport(run=str(run_dir), rows=tuple(rows), gates=tuple(gates))
        result.write(tmp)
        lines = [f"# Targets for {run_dir.name}", "", f"**Verdict: {'PASSED' if result.passed else 'FAILED'}**",
                 *targets_section(result.rows), *gates_section(result.gates)]
        (tmp / "targets.md").write_text("\n".join(lines) + "\n")
        shutil.rmtree(tmp / "work")
    print((final / "targets.md").read_text())
    failures = [g.failure() for g in result.gates if not g.passed]
    if failures:
        raise GateError(failures, str(final))
    return final
