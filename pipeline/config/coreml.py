"""Recipe block `export.coreml`: which Core ML packages to write and which weight compressions to apply."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from .base import Block


class LinearInt8(Block):
    kind: Literal["linear-int8"] = Field("linear-int8", description="Symmetric int8 weights, one scale per output channel.")

    @property
    def suffix(self) -> str:
        return "int8"


class LinearInt4(Block):
    kind: Literal["linear-int4"] = Field("linear-int4", description="Symmetric int4 weights, one scale per block.")
    block_size: int = Field(32, ge=1, le=4096, description="Input channels that share one scale; must divide the "
                            "input width of every weight matrix (else coremltools skips that layer).")

    @property
    def suffix(self) -> str:
        return f"int4-b{self.block_size}"


class Palettize(Block):
    kind: Literal["palettize"] = Field("palettize", description="Weights replaced by indices into a per-tensor lookup table.")
    nbits: Literal[1, 2, 3, 4, 6, 8] = Field(4, description="Bits per index (lookup-table size 2**nbits).")
    mode: Literal["uniform", "kmeans"] = Field("uniform", description="uniform: evenly spaced table (about 1 s); "
                                               "kmeans: clustered table (needs scikit-learn, slow).")

    @property
    def suffix(self) -> str:
        return f"pal{self.nbits}-{self.mode}"


CoreMLCompression = Annotated[Union[LinearInt8, LinearInt4, Palettize], Field(discriminator="kind")]


class CoreMLSpec(Block):
    stateful: bool = Field(True, description="Write a package whose KV cache is Core ML state (iOS 18+): one key and "
                           "one value state per kept attention layer; prefill and decode with one model.")
    stateless: bool = Field(False, description="Also write a package without cache: the whole sequence in, logits "
                            "for every position out.")
    context_length: int = Field(512, ge=1, description="Most tokens a package takes: KV state length and the upper "
                                "bound of the flexible sequence length.")
    compression: list[CoreMLCompression] = Field(default_factory=list, description="Weight compressions; each adds "
                                                 "its own package per variant, beside the uncompressed fp16 one.")

    @model_validator(mode="after")
    def _something_distinct_to_write(self):
        if not (self.stateful or self.stateless):
            raise ValueError("stateful and stateless are both false, so there is nothing to export; set one true")
        suffixes = [c.suffix for c in self.compression]
        if len(set(suffixes)) < len(suffixes):
            raise ValueError(f"compression lists the same setting twice ({suffixes}); list each once")
        return self
