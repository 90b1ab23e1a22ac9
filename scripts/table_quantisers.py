"""How much each quantiser of the tied embedding / logits table costs, alone: every other weight stays as loaded.

    .venv/bin/python scripts/table_quantisers.py [RECIPE] [--windows 6] [--bits 4] [--block 32]

Loads the recipe's model (default: the bench-budget recipe, the packaged SmolLM2-135M), rounds only the table
with each quantiser, and prints held-out perplexity in PyTorch on the recipe's first held-out windows (the
validate split, never used for calibration). GPTQ's Hessian is the final hidden state over the recipe's
calibration windows: the input of the logits projection the table also is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.config.loading import load_recipe  # noqa: E402
from pipeline.export import weights  # noqa: E402
from pipeline.measure.ort_runner import perplexity  # noqa: E402
from pipeline.measure.torch_lm import TorchLM  # noqa: E402
from pipeline.measure.validate import prepare_eval_data  # noqa: E402
from pipeline.model.calibration import fake_quantized, input_hessians  # noqa: E402
from pipeline.model.structure import TABLE  # noqa: E402
from pipeline.stages import calibration_windows, prepare  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?", default=str(ROOT / "recipes" / "smollm2-135m-bench-budget.yaml"))
    ap.add_argument("--windows", type=int, default=6, help="held-out windows scored")
    ap.add_argument("--bits", type=int, default=4, choices=[4, 8])
    ap.add_argument("--block", type=int, default=32)
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    loaded = prepare(recipe).loaded
    model, bits, block = loaded.model, args.bits, args.block
    heldout = prepare_eval_data(loaded.tokenizer, recipe.validate_).windows[:args.windows]
    hessian = input_hessians(model, calibration_windows(loaded.tokenizer, recipe.calibration))[TABLE]
    quantisers = {
        "rtn symmetric (Q4_0's rule)": lambda w: weights.rtn(w, bits, block, "symmetric"),
        "rtn offset (Q4_1's rule)": lambda w: weights.rtn(w, bits, block, "offset"),
        "hqq": lambda w: weights.hqq(w, bits, block),
        "gptq symmetric": lambda w: weights.gptq(w, hessian, bits, block, "symmetric"),
        "gptq offset": lambda w: weights.gptq(w, hessian, bits, block, "offset"),
    }
    reference = perplexity(TorchLM(model), heldout)["perplexity"]
    print(f"| table, {bits}-bit blocks of {block} | held-out perplexity | vs as loaded |\n|---|---:|---:|")
    print(f"| as loaded | {reference:.3f} | |")
    for label, quantise in quantisers.items():
        with fake_quantized(model, lambda name, parts, params: quantise(np.concatenate(parts)), {TABLE}):
            ppl = perplexity(TorchLM(model), heldout)["perplexity"]
        print(f"| {label} | {ppl:.3f} | {100 * (ppl / reference - 1):+.1f} % |", flush=True)


if __name__ == "__main__":
    main()
