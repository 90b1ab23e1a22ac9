"""Logits of a packaged model's fused export against PyTorch on one held-out window (the evaluation text's, led by
the tokenizer's start tokens): max abs error relative to the logit range, top-1 agreement, perplexity, file size.

    PYTHONPATH=. .venv/bin/python scripts/fused_parity.py gemma3-270m --max-length 2048 --drop 16 17 --int4 \
        --out /tmp/parity
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def compare(model, path: Path, ids: np.ndarray, label: str) -> dict:
    from pipeline.measure.ort_runner import OnnxLM

    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids).long(), use_cache=False).logits.float().numpy()[0]
    lm = OnnxLM(path)
    got = lm.forward(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], lm.empty_past(1))[0][0]

    def perplexity(logits):
        logp = torch.log_softmax(torch.from_numpy(logits[:-1]), -1)
        return float(torch.exp(-logp.gather(-1, torch.from_numpy(ids[0, 1:])[:, None]).mean()))
    err = float(np.abs(got - ref).max())
    return {"label": label, "tokens": int(ids.shape[1]), "max_abs_error": err,
            "logit_range": float(ref.max() - ref.min()), "relative_error": err / float(ref.max() - ref.min()),
            "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
            "perplexity_pytorch": perplexity(ref), "perplexity_onnx": perplexity(got),
            "file_mb": path.stat().st_size / 1e6}


def main() -> None:
    from pydantic import TypeAdapter

    from pipeline.config.quantize import QuantSpec
    from pipeline.export.fused import export_fused
    from pipeline.export.policy import make_quantizer
    from pipeline.model.calibration import fake_quantized
    from pipeline.model.corpus import evaluation_text, token_windows
    from pipeline.model.groups import tied
    from pipeline.model.loading import load_model
    from pipeline.model.prune import drop_sublayers

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a packaged model name")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--tokens", type=int, default=384)
    p.add_argument("--drop", type=int, nargs="*", default=[], help="attention sublayers to drop (a second export)")
    p.add_argument("--int4", action="store_true", help="also a 4-bit file (default onnx-int4 entry, accuracy level 1)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    loaded = load_model("packaged", args.model)
    ids = token_windows(loaded.tokenizer, [evaluation_text()], 1, args.tokens)
    results = []
    for drops in ([], args.drop) if args.drop else ([],):
        model = drop_sublayers(loaded.model, drops, []) if drops else loaded.model
        path = export_fused(model, args.out / f"fp32-drop{len(drops)}", max_length=args.max_length).path
        results.append(compare(model, path, ids, f"fp32, attention {drops or 'none'} dropped"))
        print(json.dumps(results[-1]), flush=True)
    if args.int4:
        spec = TypeAdapter(QuantSpec).validate_python({"kind": "onnx-int4", "accuracy_level": 1})
        quantizer = make_quantizer(spec, tied(loaded.model))
        path = export_fused(loaded.model, args.out / "int4", quantizer, 1, max_length=args.max_length).path
        with fake_quantized(loaded.model, quantizer):
            results.append(compare(loaded.model, path, ids, "int4 against fake-quantised PyTorch"))
        results.append(compare(loaded.model, path, ids, "int4 against fp32 PyTorch"))
        print(json.dumps(results[-2:]), flush=True)
    (args.out / "parity.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
