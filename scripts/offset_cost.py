"""What the exact Q4_1 offsets cost in decode time, and what else separates our 4-bit file from another one.

    .venv/bin/python scripts/offset_cost.py RUN/genai-int4 OTHER_GENAI_FOLDER [--rounds 3]

Writes two timing-only variants of RUN's fused 4-bit graph into a temporary folder and times them through
onnxruntime-genai beside the shipped file and OTHER (for example the genai model builder's int4 folder), in
interleaved rounds: "no offsets" drops every per-block offset correction (ReduceSum of the input per block,
MatMul with the offsets, Add); "no offsets, 4-bit table" also rounds the 8-bit embedding / logits table to
symmetric 4-bit. Both compute wrong logits on purpose: they bound what a faster offset form could gain.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.bench.peer_timing import TimingSpec, interleaved  # noqa: E402
from pipeline.export.weights import BlockQuant, rtn  # noqa: E402


def without_offsets(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every Add(MatMulNBits, MatMul(block sums, offsets)) replaced by the MatMulNBits output; dead nodes pruned."""
    g = model.graph
    made_by = {o: n for n in g.node for o in n.output}
    for add in [n for n in g.node if n.op_type == "Add"]:
        a, b = (made_by.get(i) for i in add.input)
        if a is not None and b is not None and (a.op_type, b.op_type) == ("MatMulNBits", "MatMul"):
            for n in g.node:
                for k, name in enumerate(n.input):
                    if name == add.output[0]:
                        n.input[k] = add.input[0]
    needed, kept = {o.name for o in g.output}, []
    for n in reversed(g.node):
        if set(n.output) & needed:
            kept.append(n)
            needed.update(i for i in n.input if i)
    initializers = [t for t in g.initializer if t.name in needed]
    del g.node[:], g.initializer[:]
    g.node.extend(kept[::-1])
    g.initializer.extend(initializers)
    return model


def four_bit_table(model: onnx.ModelProto) -> onnx.ModelProto:
    """The 8-bit tied table (embed.q8, embed.scales_fp16) re-rounded to symmetric 4-bit blocks of 32."""
    init = {t.name: t for t in model.graph.initializer}
    codes = numpy_helper.to_array(init["embed.q8"])  # 8 bits: one code a byte, so packed == unpacked
    scales = numpy_helper.to_array(init["embed.scales_fp16"]).astype(np.float32)
    rows, blocks, block = codes.shape
    table = BlockQuant(codes.reshape(rows, -1), scales, None, None, 8, block, blocks * block).dequantize()
    q = rtn(table, 4, block, "symmetric")
    init["embed.q8"].CopyFrom(numpy_helper.from_array(q.packed(), "embed.q8"))
    init["embed.scales_fp16"].CopyFrom(numpy_helper.from_array(q.scales.astype(np.float16), "embed.scales_fp16"))
    for n in model.graph.node:
        if "embed.q8" in n.input:
            next(a for a in n.attribute if a.name == "bits").i = 4
    return model


def variant(shipped: Path, out: Path, *edits) -> Path:
    shutil.copytree(shipped, out, ignore=shutil.ignore_patterns("model.onnx*"))
    model = onnx.load(str(shipped / "model.onnx"))
    for edit in edits:
        model = edit(model)
    onnx.save(model, str(out / "model.onnx"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shipped", type=Path, help="a fused 4-bit genai folder with GGUF Q4_1 offsets")
    p.add_argument("other", type=Path, help="another genai folder timed beside it")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="offset-cost-") as tmp:
        tmp = Path(tmp)
        paths = {"other": args.other, "shipped (exact Q4_1 offsets)": args.shipped,
                 "no offsets": variant(args.shipped, tmp / "no-offsets", without_offsets),
                 "no offsets, 4-bit table": variant(args.shipped, tmp / "four-bit", without_offsets, four_bit_table)}
        times = interleaved({label: ("genai", folder) for label, folder in paths.items()},
                            TimingSpec(repeats=2, rounds=args.rounds), None, tmp)
    ms = {label: t["decode_ms_per_token"] for label, t in times.items()}
    print("| file | decode ms/token (median of rounds) | vs other |\n|---|---:|---:|")
    for label, value in ms.items():
        print(f"| {label} | {value:.2f} | {value / ms['other']:.3f}x |")


if __name__ == "__main__":
    main()
