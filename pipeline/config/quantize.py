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


class _BlockWiseSpec(Block):
    """What the 8- and 4-bit block-wise kinds share: the algorithm for weights off the source's grid, reuse of
    the source GGUF's blocks, and mixed precision. Everything but `form` (and its symmetric/asymmetric choice)
    needs `export.graph: fused`, which writes the quantised weights itself."""

    block_size: BlockSize = Field(32, description="Weights per quantisation block along the input dimension; a "
                                  "power of two >= 16 (GGUF blocks are 32).")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        4, description="MatMulNBits compute type: 4 = int8 activations per block (fastest on CPU), 1 = fp32, "
        "0 = onnxruntime's default. Below 4 the CPU kernel is slower than int8.")
    algorithm: Literal["rtn", "hqq", "gptq"] = Field(
        "rtn", description="For weights not taken from the source's blocks: rtn (round to nearest), hqq (scale and "
        "offset per block fitted by half-quadratic optimisation; form offset) or gptq (error feedback through a "
        "Hessian of calibration inputs; each block's range clipped where that lowers the input-weighted error). "
        "See docs/results.md for the measured comparison.")
    form: Literal["symmetric", "asymmetric", "offset"] = Field(
        "symmetric", description="Block grid: symmetric (GGUF Q4_0/Q8_0: a scale per block), asymmetric (scale and "
        "integer zero point), offset (GGUF Q4_1: scale and an fp16 minimum per block, added back exactly by the "
        "fused graph). hqq always uses offset.")
    source_blocks: bool = Field(
        True, description="When the model came from a GGUF with Q4_0, Q4_1 or Q8_0 tensors (the packaged SmolLM2), "
        "every tensor the pipeline left unchanged keeps the GGUF's own blocks exactly (and their bit width); the "
        "rest use `algorithm`. No effect for other sources.")
    eight_bit_groups: int = Field(
        0, ge=0, description="Mixed precision: this many linear groups (a layer's qkv, o, gate_up or down), the most "
        "sensitive by measured KL divergence on calibration text, stay at 8 bits.")

    @model_validator(mode="after")
    def _hqq_is_offset(self):
        if self.algorithm == "hqq" and self.form != "offset" and "form" in self.model_fields_set:
            raise ValueError("algorithm hqq fits an offset per block; set form: offset or leave form out")
        return self

    @property
    def grid(self) -> str:
        return "offset" if self.algorithm == "hqq" else self.form


class OnnxInt4Spec(_BlockWiseSpec):
    """4-bit block-wise weights (MatMulNBits), weight-only."""

    kind: Literal["onnx-int4"] = Field(description="4-bit block-wise weight-only quantisation (MatMulNBits).")
    name: str = Field("int4", pattern=NAME_PATTERN, description="Label of this variant: its folder and report key.")
    quantize_lm_head: bool = Field(
        True, description="Quantise the logits projection (the largest matmul; left fp32 it also keeps a tied "
        "embedding table in fp32: SmolLM2-135M 181 MB instead of 103 MB).")
    lm_head_bits: Literal[4, 8] = Field(
        8, description="Bits of the logits projection and of the embedding table (when not taken from the source's "
        "blocks). The output layer is the most sensitive one.")
    quantize_embedding: bool = Field(
        True, description="Quantise the embedding table too (GatherBlockQuantized). With tied embeddings it "
        "reads the lm_head's quantised table, so the table is stored once; needs quantize_lm_head.")


class OnnxInt8Spec(_BlockWiseSpec):
    """int8 weights: block-wise weight-only (MatMulNBits, 8 bits) or onnxruntime's `quantize_dynamic`."""

    kind: Literal["onnx-int8"] = Field(description="8-bit weights, about 4x smaller than fp32.")
    name: str = Field("int8", pattern=NAME_PATTERN, description="Label of this variant: its folder and report key.")
    method: Literal["weight-only", "dynamic"] = Field(
        "weight-only", description="weight-only: MatMulNBits bits=8 (activations quantised per block of "
        "block_size at accuracy_level 4); SmolLM2-135M perplexity +0.5 %. dynamic: onnxruntime's "
        "quantize_dynamic (MatMulInteger, uint8 weights, activations quantised per tensor at run time); "
        "activation outliers cost SmolLM2-135M about +50 % perplexity (optimum graph only).")
    per_channel: bool = Field(True, description="dynamic: one weight scale per output channel.")
    quantize_lm_head: bool = Field(
        True, description="Quantise the logits projection (the largest matmul, and with tied embeddings the "
        "embedding table that the file would otherwise keep in fp32).")
    quantize_embedding: bool = Field(
        True, description="Quantise the embedding table. weight-only with tied embeddings: the Gather reads the "
        "lm_head's int8 table (stored once); dynamic: a second, uint8 per-tensor copy.")
    source_blocks: bool = Field(
        False, description="fused graph: tensors the pipeline left unchanged keep the source GGUF's own blocks "
        "(SmolLM2's are 4-bit Q4_1: a 4-bit file, not an 8-bit one); off by default for int8.")

    @model_validator(mode="after")
    def _fields_match_method(self):
        other = "dynamic" if self.method == "weight-only" else "weight-only"
        fields = {"weight-only": ("per_channel",), "dynamic": ("block_size", "accuracy_level", "algorithm", "form",
                                                               "source_blocks", "eight_bit_groups")}[self.method]
        problems = self.misplaced(fields, f"method: {other}", f"method: {other}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class OnnxFp16Spec(Block):
    """onnxruntime's `convert_float_to_float16`: fp16 weights and compute, fp32 logits."""

    kind: Literal["onnx-fp16"] = Field(description="Half-precision weights and compute; for GPUs and "
                                       "fp16-capable mobile CPUs (on x86 onnxruntime casts back to fp32).")
    name: str = Field("fp16", pattern=NAME_PATTERN, description="Label of this variant: its folder and report key.")
    kv_cache: Literal["float16", "float32"] = Field(
        "float16", description="Type of the past/present KV inputs and outputs. float16 halves KV memory; "
        "float32 keeps the fp32 graph's interface (Casts inside the graph).")


QuantSpec = Annotated[Union[OnnxInt8Spec, OnnxInt4Spec, OnnxFp16Spec], Field(discriminator="kind")]
