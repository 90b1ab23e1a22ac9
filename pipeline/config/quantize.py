"""Recipe blocks for the `quantize:` list: one block per `kind`, told apart by that key.

Each entry makes one more variant of the compressed model, exported, validated and reported on its own.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import AfterValidator, Field, model_validator

from .base import NAME_PATTERN, Block


def _check_block_size(value: int) -> int:
    if value < 16 or value & (value - 1):
        raise ValueError(f"block_size must be a power of two >= 16 (16, 32, 64, 128, 256), got {value}; "
                         "use 32 (the default), or 64 for a slightly smaller, less accurate file")
    return value


BlockSize = Annotated[int, AfterValidator(_check_block_size)]


class OnnxInt8Spec(Block):
    """int8 weights: block-wise weight-only (MatMulNBits, 8 bits) or onnxruntime's `quantize_dynamic`."""

    kind: Literal["onnx-int8"] = Field(description="8-bit weights, about 4x smaller than fp32.")
    name: str = Field("int8", pattern=NAME_PATTERN, description="Label of this variant: its folder and report key.")
    method: Literal["weight-only", "dynamic"] = Field(
        "weight-only", description="weight-only: MatMulNBits bits=8 (activations quantised per block of "
        "block_size at accuracy_level 4); SmolLM2-135M perplexity +0.5 %. dynamic: onnxruntime's "
        "quantize_dynamic (MatMulInteger, uint8 weights, activations quantised per tensor at run time); "
        "activation outliers cost SmolLM2-135M about +50 % perplexity.")
    block_size: BlockSize = Field(32, description="weight-only: weights per block along the input dimension "
                                  "(power of two >= 16).")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        4, description="weight-only: MatMulNBits compute type; 4 = int8 (fastest on CPU), 1 = fp32.")
    per_channel: bool = Field(True, description="dynamic: one weight scale per output channel.")
    quantize_lm_head: bool = Field(
        True, description="Quantise the logits projection (the largest matmul, and with tied embeddings the "
        "embedding table that the file would otherwise keep in fp32).")
    quantize_embedding: bool = Field(
        True, description="Quantise the embedding table. weight-only with tied embeddings: the Gather reads the "
        "lm_head's int8 table (stored once); dynamic: a second, uint8 per-tensor copy.")

    @model_validator(mode="after")
    def _fields_match_method(self):
        other = "dynamic" if self.method == "weight-only" else "weight-only"
        fields = {"weight-only": ("per_channel",), "dynamic": ("block_size", "accuracy_level")}[self.method]
        problems = self.misplaced(fields, f"method: {other}", f"method: {other}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class OnnxInt4Spec(Block):
    """onnxruntime `MatMulNBitsQuantizer`: 4-bit block-wise weights, weight-only."""

    kind: Literal["onnx-int4"] = Field(description="4-bit block-wise weight-only quantisation (MatMulNBits).")
    name: str = Field("int4", pattern=NAME_PATTERN, description="Label of this variant: its folder and report key.")
    block_size: BlockSize = Field(32, description="Weights per quantisation block along the input dimension; a "
                                  "power of two >= 16. SmolLM2-135M at 16: perplexity +21 % instead of +24 %, "
                                  "17 MB more.")
    symmetric: bool = Field(True, description="Symmetric blocks (no zero points). false stores a zero point per "
                            "block: SmolLM2-135M perplexity +20 % instead of +24 % for 3.5 MB more (speed not "
                            "yet measured on a quiet machine).")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        4, description="MatMulNBits compute type: 4 = int8 activations per block (fastest on CPU), 1 = fp32, "
        "0 = onnxruntime's default. Below 4 the CPU kernel is slower than int8.")
    quantize_lm_head: bool = Field(
        True, description="Quantise the logits projection (the largest matmul; left fp32 it also keeps a tied "
        "embedding table in fp32: SmolLM2-135M 181 MB instead of 103 MB).")
    lm_head_bits: Literal[4, 8] = Field(
        8, description="Bits of the logits projection and of the embedding table. SmolLM2-135M perplexity: "
        "+24 % at 8 (103 MB file), +36 % at 4 (89 MB); the output layer is the most sensitive one.")
    quantize_embedding: bool = Field(
        True, description="Quantise the embedding table too (GatherBlockQuantized). With tied embeddings it "
        "reads the lm_head's quantised table, so the table is stored once; needs quantize_lm_head.")


class OnnxFp16Spec(Block):
    """onnxruntime's `convert_float_to_float16`: fp16 weights and compute, fp32 logits."""

    kind: Literal["onnx-fp16"] = Field(description="Half-precision weights and compute; for GPUs and "
                                       "fp16-capable mobile CPUs (on x86 onnxruntime casts back to fp32).")
    name: str = Field("fp16", pattern=NAME_PATTERN, description="Label of this variant: its folder and report key.")
    kv_cache: Literal["float16", "float32"] = Field(
        "float16", description="Type of the past/present KV inputs and outputs. float16 halves KV memory; "
        "float32 keeps the fp32 graph's interface (Casts inside the graph).")


QuantSpec = Annotated[Union[OnnxInt8Spec, OnnxInt4Spec, OnnxFp16Spec], Field(discriminator="kind")]
