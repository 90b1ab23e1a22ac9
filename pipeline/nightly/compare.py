"""Tonight's model beside the version the tag points at, measured in one process on this machine.

The tagged version's ONNX files are pulled (every sha256 checked); both versions are scored by the same runner
on the same held-out tokens (tonight's recipe and tokenizer), their file sizes read, and their decode latency
timed in interleaved rounds. Accuracy is deterministic and cached by file content and tokens; latency never is.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..artifacts import Regression, SideBySide
from ..config.loading import load_recipe
from ..measure.ort_runner import save_inputs
from ..measure.validate import RUNNER, file_mb, interleaved_latency, model_sha256, prepare_eval_data, run_runner
from ..registry.layout import PREFIX
from ..registry.ops import pull
from ..rundir import sha256_file
from ..stagecache import StageCache, cached

# limit -> (figure, how a change is measured: percent of the previous value, or previous minus new)
LIMITS = {"max_perplexity_increase_pct": ("perplexity", "pct"), "max_mc_accuracy_drop": ("mc_accuracy", "drop"),
          "max_file_size_increase_pct": ("file_mb", "pct"), "max_decode_slowdown_pct": ("decode_p50_ms", "pct")}


def side_by_side(run_dir: Path, store, name: str, previous: str, spec, cache: StageCache | None) -> list[SideBySide]:
    """One row per variant that tonight's run and the tagged version both have in ONNX (or those in
    `spec.compare.variants`)."""
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml")
    new = {v: run_dir / rel for v, rel in json.loads((run_dir / "manifest.json").read_text())["variants"].items()}
    manifest = store.manifest(name, previous)[0]
    formats = json.loads(manifest["annotations"][PREFIX + "formats"])
    wanted = spec.compare.variants
    common = [v for v in new if "onnx" in formats.get(v, ()) and (wanted is None or v in wanted)]
    latency = recipe.validate_.latency.model_copy(update={"rounds": spec.compare.latency_rounds})
    with tempfile.TemporaryDirectory(prefix="slimformer-compare-") as tmp:
        work = Path(tmp)
        old = {}
        for v in common:
            folder = pull(f"{name}:{previous}", store, work / f"previous-{v}", variant=v, fmt="onnx")
            old[v] = folder / json.loads((folder / "manifest.json").read_text())["variants"][v]
        data = prepare_eval_data(AutoTokenizer.from_pretrained(run_dir / "hf"), recipe.validate_)
        inputs = work / "inputs.npz"
        save_inputs(inputs, windows=data.windows, mc_items=data.mc_items)
        key = {"data": data.key(), "threads": latency.threads, "runner": sha256_file(RUNNER)}
        scores = {(side, v): _accuracy(path, inputs, work, latency, key, cache, f"{side}-{v}")
                  for side, files in (("previous", old), ("new", new)) for v, path in files.items() if v in common}
        files = {f"{side}-{v}": (old if side == "previous" else new)[v] for side in ("previous", "new") for v in common}
        timing = interleaved_latency(files, latency, work) if files else {}
        rows = []
        for v in common:
            both = {side: {**scores[(side, v)], "file_mb": file_mb((old if side == "previous" else new)[v]),
                           "decode_p50_ms": timing[f"{side}-{v}"]["decode_ms_p50"]} for side in ("previous", "new")}
            rows.append(SideBySide(variant=v, identical=model_sha256(old[v]) == model_sha256(new[v]),
                                   previous=both["previous"], new=both["new"]))
    return rows


def _accuracy(path: Path, inputs: Path, work: Path, latency, key: dict, cache, tag: str) -> dict[str, float]:
    def measure() -> dict[str, float]:
        out = run_runner(path, work / f"{tag}.accuracy.json", ["--perplexity", "--mc"], inputs, latency)
        return {"perplexity": out["perplexity"]["perplexity"], "mc_accuracy": out["multiple_choice"]["accuracy"]}

    with tempfile.TemporaryDirectory(dir=work) as empty:  # the cache copies what a build adds to this folder
        return cached(cache, "compare-accuracy", lambda: {**key, "file": model_sha256(path)}, Path(empty), measure,
                      dict[str, float])


def regressions(rows: list[SideBySide], limits) -> list[Regression]:
    """Every limit a variant crosses. A byte-identical file cannot regress: its differences are noise."""
    found = []
    for row in rows:
        if row.identical:
            continue
        for limit_name, (figure, how) in LIMITS.items():
            limit = getattr(limits, limit_name)
            before, after = row.previous[figure], row.new[figure]
            change = 100 * (after / before - 1) if how == "pct" else before - after
            if limit is not None and change > limit:
                found.append(Regression(variant=row.variant, figure=figure, previous=before, new=after,
                                        change=change, limit_name=limit_name, limit=limit))
    return found
