"""The stage order, owned here and nowhere else:

recipe -> model -> scores -> plan -> pruned model -> ONNX export -> validation report -> run folder.
Each stage is a function with typed input and output; `run` chains them inside a staged folder that
is renamed into place only when every stage has finished.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from .artifacts import DropPlan, Scores
from .errors import GateError
from .recipe import CalibrationSpec, Recipe, check_against_model

# Encoded by onnxruntime-genai's tokenizer and by the Hugging Face one; both must give the same ids.
GENAI_CHECK_TEXT = "Hello, world!  It's 2026; caf\u00e9 prices rose 3.5%\n\tand then\u2014fell."
STAGES = ("load model", "score", "plan", "drop", "heal", "export", "quantize", "package", "validate", "report")


@contextmanager
def _stage(name: str):
    index = STAGES.index(name) + 1
    print(f"[{index}/{len(STAGES)}] {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"[{index}/{len(STAGES)}] {name} done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def load(recipe: Recipe):
    """The model and tokenizer the recipe names, checked against the recipe's drop counts."""
    from .adapters import decoder_layers
    from .models import load_model

    loaded = load_model(recipe.model.source, name=recipe.model.name, path=recipe.model.path)
    check_against_model(recipe, num_layers=len(decoder_layers(loaded.model)))
    return loaded


def score(model, tokenizer, spec: CalibrationSpec, name: str) -> Scores:
    from .corpus import calibration_texts, token_windows
    from .scoring import score_model

    windows = token_windows(tokenizer, calibration_texts(spec.files), spec.samples, spec.seq_len)
    return score_model(model, windows, batch_size=spec.batch_size, name=name)


def plan(scores: Scores, recipe: Recipe) -> DropPlan:
    from .plan import plan_drop

    d = recipe.drop
    return plan_drop(scores, joint=d.joint, attention=d.attention, mlp=d.mlp, blocks=d.blocks)


def drop(model, drop_plan: DropPlan, tokenizer, folder: Path):
    """The pruned model (a new object), also saved as a Hugging Face folder that reloads identically."""
    from .prune import drop_sublayers

    pruned = drop_sublayers(model, list(drop_plan.attention), list(drop_plan.mlp))
    pruned.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return pruned


def heal(pruned, original, tokenizer, recipe: Recipe, data, folder: Path):
    """(healed model, summary): the pruned model fine-tuned by the recipe's heal block, saved over `folder/hf`,
    its loss curve in `folder`, and held-out perplexity / accuracy before and after (PyTorch, same data)."""
    from .heal import heal as train, heal_windows, write_curve
    from .rundir import sha256_file
    from .sweep import accuracy_figures

    spec = recipe.heal
    windows = heal_windows(tokenizer, spec, recipe.calibration.files)
    before = accuracy_figures(pruned, data)
    result = train(pruned, original, windows, spec)
    after = accuracy_figures(result.model, data)
    write_curve(result, folder)
    result.model.save_pretrained(folder / "hf")  # replaces the unhealed weights: export reads the healed ones
    summary = {"objective": spec.objective, "train": spec.train, "steps": result.steps,
               "stopped_by": result.stopped_by, "seconds": result.seconds, "device": result.device,
               "trainable_params": result.trainable_params, "windows": int(len(windows)),
               "tokens_seen": result.steps * spec.batch_size * spec.seq_len,
               "first_loss": result.curve[0]["loss"], "last_loss": result.curve[-1]["loss"],
               "before": before, "after": after, "weights_sha256": sha256_file(folder / "hf" / "model.safetensors")}
    print(f"heal: perplexity {before['perplexity']:.3f} -> {after['perplexity']:.3f}, multiple choice "
          f"{before['mc_accuracy']:.3f} -> {after['mc_accuracy']:.3f}", file=sys.stderr, flush=True)
    return result.model, summary


def evaluation_files(recipe: Recipe) -> list[Path]:
    """Every file evaluation reads (held-out text and distractors), packaged defaults included."""
    from .corpus import default_files

    v = recipe.validate_
    split = default_files() if v.files is None or v.distractor_files is None else {}
    return [*(v.files if v.files is not None else split["evaluation"]),
            *(v.distractor_files if v.distractor_files is not None else split["distractor"])]


def export(model, tokenizer, folder: Path, opset: int):
    from .export_onnx import export_onnx

    result = export_onnx(model, folder, opset=opset)
    tokenizer.save_pretrained(folder)
    return result


def quantize(fp32: Path, specs, folder: Path) -> dict[str, Path]:
    """One folder per quantised variant (`onnx-<name>/`), with the fp32 folder's config and tokenizer files."""
    from .quantize import quantize_onnx

    variants = {}
    for spec in specs:
        out = folder / f"onnx-{spec.name}"
        variants[spec.name] = quantize_onnx(fp32, out, spec).path
        for extra in fp32.parent.iterdir():
            if extra.suffix != ".onnx" and not extra.name.endswith(".onnx_data"):
                shutil.copy2(extra, out / extra.name)
    return variants


def package(variants: dict[str, Path], pruned, tokenizer, spec, folder: Path) -> dict:
    """Mobile deliverables: .ort files and onnxruntime-genai folders per ONNX variant, Core ML packages."""
    from .mobile import genai_tokenizer_problem, ort_parity, to_ort_format, write_genai_folder

    out = {"ort": {}, "genai": {}, "coreml": []}
    for name, path in variants.items():
        if spec.ort_format:
            ort = to_ort_format(path, folder / f"ort-{name}")
            parity = ort_parity(path, ort.path, [tokenizer(GENAI_CHECK_TEXT, add_special_tokens=False)["input_ids"]])
            out["ort"][name] = {**ort.to_json(), "bytes": ort.path.stat().st_size, "parity_vs_onnx": parity}
        if spec.genai:
            genai = write_genai_folder(path, pruned.config, tokenizer, folder / f"genai-{name}")
            # Apps may tokenise on their own, so a tokenizer genai misreads is reported, not fatal.
            out["genai"][name] = {"path": str(genai),
                                  "tokenizer_problem": genai_tokenizer_problem(genai, tokenizer, GENAI_CHECK_TEXT)}
    if spec.coreml is not None:
        from .coreml_export import export_coreml, predict_parity

        for pkg in export_coreml(pruned, folder / "coreml", spec.coreml):
            out["coreml"].append({**pkg.to_json(), "numerics": predict_parity(pkg, pruned, [[1, 2, 3, 4]])})
    return out


def baseline_onnx(loaded, opset: int) -> Path:
    """The undropped model's ONNX, exported once per source model and cached (it never changes)."""
    from .assets import home
    from .export_onnx import export_onnx
    from .rundir import staged_folder

    folder = home() / "baselines" / f"{loaded.source_sha256[:16]}-opset{opset}"
    if not (folder / "model.onnx").exists():
        with staged_folder(folder) as tmp:
            export_onnx(loaded.model, tmp, opset=opset)
    return folder / "model.onnx"


def run(recipe: Recipe) -> Path:
    """Run every stage; return the finished run folder. Raises GateError (after writing) if a gate fails."""
    from .corpus import check_disjoint
    from .report import markdown, plot_importance
    from .rundir import new_run_path, sha256_json, staged_folder, write_manifest
    from .validate import gate_failures, prepare_eval_data, validate

    check_against_model(recipe)  # missing files fail before any download or model load
    held_out = evaluation_files(recipe)
    check_disjoint(recipe.calibration.files, held_out)
    if recipe.heal is not None:
        check_disjoint(recipe.heal.files or recipe.calibration.files, held_out, role="healing")
    with _stage("load model"):
        loaded = load(recipe)
    final = new_run_path(recipe.output.dir, recipe.name)
    with staged_folder(final) as tmp:
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe.resolved(), sort_keys=False))
        with _stage("score"):
            scores = score(loaded.model, loaded.tokenizer, recipe.calibration, loaded.description)
            scores.write(tmp)
        with _stage("plan"):
            drop_plan = plan(scores, recipe)
            drop_plan.write(tmp)
        with _stage("drop"):
            pruned = drop(loaded.model, drop_plan, loaded.tokenizer, tmp / "hf")
        healing = None
        with _stage("heal"):
            data = prepare_eval_data(loaded.tokenizer, recipe.validate_)
            if recipe.heal is not None:
                pruned, healing = heal(pruned, loaded.model, loaded.tokenizer, recipe, data, tmp)
        with _stage("export"):
            exported = export(pruned, loaded.tokenizer, tmp / "onnx", recipe.export.opset)
            original_onnx = baseline_onnx(loaded, recipe.export.opset)
        with _stage("quantize"):
            variants = {"compressed": exported.path, **quantize(exported.path, recipe.quantize, tmp)}
        with _stage("package"):
            packages = package(variants, pruned, loaded.tokenizer, recipe.export, tmp)
        with _stage("validate"):
            work = tmp / "validation"
            work.mkdir()
            validation = validate(original_onnx, variants, loaded.model, pruned, data, recipe.validate_, work,
                                  recipe.validate_.variant_gates)
        with _stage("report"):
            (tmp / "report.json").write_text(json.dumps({"plan": drop_plan.to_json(), "heal": healing, **validation,
                                                         "packages": packages}, indent=2))
            plot_importance(scores, drop_plan, tmp / "importance.png")
            (tmp / "report.md").write_text(markdown(recipe.name, drop_plan, validation, packages, healing))
            write_manifest(tmp, {"recipe_sha256": sha256_json(recipe.resolved()),
                                 "source_model": {"description": loaded.description,
                                                  "sha256": loaded.source_sha256},
                                 "variants": {name: str(path.relative_to(tmp)) for name, path in variants.items()},
                                 "passed": validation["passed"]})
    print((final / "report.md").read_text())
    failures = gate_failures(validation)
    if failures:
        raise GateError(failures, str(final))
    return final


def load_targets(path: Path) -> list:
    """The `targets:` list of a YAML file (the same entries as a recipe's validate.targets)."""
    from pydantic import TypeAdapter, ValidationError

    from .errors import RecipeError
    from .recipe import _describe, _resolve_paths
    from .targets import Target, target_problems, unready_targets

    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"file not found: {path}"], str(path))
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("targets"), list):
        raise RecipeError(["expected a top-level `targets:` list (entries as in a recipe's validate.targets)"],
                          str(path))
    data = _resolve_paths({"validate": data}, path.parent)["validate"]
    try:
        targets = TypeAdapter(list[Target]).validate_python(data["targets"])
    except ValidationError as e:
        raise RecipeError([f"targets.{_describe(err)}" for err in e.errors()], str(path)) from None
    problems = target_problems(targets) + unready_targets(targets)
    if problems:
        raise RecipeError(problems, str(path))
    return targets


def check_run_on_targets(run_dir: Path, targets: list, out: Path | None = None) -> Path:
    """Validate the files a finished run folder ships on `targets`, judged against that run's pruned PyTorch
    model and the host; writes targets.json and targets.md to a new folder (`out`, default beside the run).
    variant_tolerances may name variants this run lacks: one targets file serves runs of several recipes."""
    from .errors import SlimformerError
    from .models import load_hf_folder
    from .recipe import load_recipe
    from .report import gates_section, targets_section
    from .rundir import new_run_path, staged_folder
    from .validate import check_targets, gate_failures, prepare_eval_data, write_runner_inputs

    run_dir = Path(run_dir)
    if not (run_dir / "manifest.json").is_file():
        raise SlimformerError(f"{run_dir} is not a finished run folder (no manifest.json); pass a folder that "
                              "`slimformer run` wrote, e.g. runs/smollm2-135m-<time>")
    recipe = load_recipe(run_dir / "recipe.yaml")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    variants = {name: run_dir / rel for name, rel in manifest["variants"].items()}
    final = Path(out) if out is not None else new_run_path(run_dir.parent, f"{run_dir.name}-targets")
    with staged_folder(final) as tmp:
        pruned, tokenizer = load_hf_folder(run_dir / "hf")
        data = prepare_eval_data(tokenizer, recipe.validate_)
        inputs = tmp / "eval_inputs.npz"
        reference = write_runner_inputs(inputs, pruned, data, recipe.validate_.parity_decode_steps, mc=False)
        result = check_targets(targets, variants, inputs, reference, tmp / "work", recipe.validate_.latency)
        result["passed"] = all(g["passed"] for g in result["gates"])
        (tmp / "targets.json").write_text(json.dumps({"run": str(run_dir), **result}, indent=2))
        lines = [f"# Targets for {run_dir.name}", "", f"**Verdict: {'PASSED' if result['passed'] else 'FAILED'}**",
                 *targets_section(result["rows"]), *gates_section(result["gates"])]
        (tmp / "targets.md").write_text("\n".join(lines) + "\n")
        shutil.rmtree(tmp / "work")
    print((final / "targets.md").read_text())
    failures = gate_failures(result)
    if failures:
        raise GateError(failures, str(final))
    return final
