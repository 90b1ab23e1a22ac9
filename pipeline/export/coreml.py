"""Export a (possibly pruned) causal LM to Core ML .mlpackage files (iOS 18 / macOS 15 target, fp16).

Configured by `pipeline.config.coreml.CoreMLSpec`. Owns the torch wrapper that runs the decoder layers with an explicit causal mask
and one key and one value state per kept attention layer (none for dropped ones; sliding-window layers apply
their window to the mask themselves), the conversion and weight compression calls; returns `CoreMLPackage` records. `describe_package` is the structural check that works
on Linux; numerics need macOS (`predict_parity`).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from functools import cache, partial
from pathlib import Path

from pydantic import BaseModel, ValidationError

from ..artifacts import CoreMLNumerics, CoreMLPackage
from ..config import checks as config_checks
from ..config.coreml import CoreMLSpec
from ..errors import ExportError, ModelError
from ..model.adapters import adapter_for, decoder_layers, get_path, sliding_window
from ..model.loading import info_from_config
from ..model.prune import drop_lists, kept_attention_layers
from ..model.prune_heads import kept_heads

WEIGHTS_DIR = Path("Data/com.apple.CoreML/weights")
# fp32 torch wrapper vs the model it wraps: ~1e-6 relative; a wrong cache slot or position: ~1e-1.
WRAPPER_RTOL = 1e-3
LINUX_REASON = "coremltools cannot run predictions on Linux; numerics not checked on this host"
MASK_CONTRACT = ("additive float16 [1, 1, seq, past+seq]: 0 where a query may attend, -inf elsewhere; "
                 "past = tokens already in the state (0 for the stateless package)")


def export_coreml(model, out_dir: Path, spec: CoreMLSpec | dict) -> list[CoreMLPackage]:
    """Write `model-{variant}.mlpackage` files into `out_dir`: stateful and/or stateless, each uncompressed (fp16)
    and once per compression. The stateless package is a no-cache full-sequence model (no KV inputs/outputs).
    Refuses with ExportError before any work when the spec cannot be honoured; `model` is not modified."""
    spec, problems = _validated(spec)
    problems += coreml_problems(model, spec) if spec is not None else []
    if problems:
        raise ExportError("Core ML export refused:\n" + "\n".join(f"  - {p}" for p in problems))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    packages = []
    for stateful in [flag for flag, wanted in ((True, spec.stateful), (False, spec.stateless)) if wanted]:
        base = _convert(model, spec.context_length, stateful)
        name = "stateful" if stateful else "stateless"
        packages.append(_save(base, model, out_dir, f"{name}-fp16", spec.context_length))
        for compression in spec.compression:
            packages.append(_save(_compress(base, compression), model, out_dir, f"{name}-{compression.suffix}",
                                  spec.context_length))
    return packages


def _validated(spec) -> tuple[CoreMLSpec | None, list[str]]:
    """Re-validate (a dict, or a spec built with model_construct) so bad parameters become ExportError lines."""
    try:
        data = spec.model_dump(warnings=False) if isinstance(spec, BaseModel) else spec
        return CoreMLSpec.model_validate(data), []
    except ValidationError as e:
        return None, [f"coreml.{'.'.join(map(str, err['loc'])) or '(block)'}: {err['msg']}" for err in e.errors()]


def coreml_problems(model, spec: CoreMLSpec) -> list[str]:
    """Everything about `model` that stops `export_coreml(model, _, spec)`, each saying what to change (the
    recipe checks give the same answers up front; this guards direct calls)."""
    try:
        info = info_from_config(model.config)
    except ModelError as e:
        return [str(e)]
    problems = []
    if spec.stateful and not kept_attention_layers(model):
        problems.append(f"every attention layer is dropped ({drop_lists(model)['attention']}), so a stateful package "
                        "has no KV state to keep; set coreml.stateful: false and coreml.stateless: true, or keep "
                        "at least one attention layer in the drop plan")
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in ("eager", "sdpa"):
        problems.append(f"attention implementation {impl!r} cannot be traced for Core ML; load the model with "
                        "attn_implementation='sdpa' or 'eager'")
    return problems + config_checks.coreml_problems(spec, info)


def causal_mask(past: int, seq: int):
    """The mask input for `seq` new tokens after `past` cached ones (numpy float16, see MASK_CONTRACT)."""
    import numpy as np

    mask = np.zeros((seq, past + seq), np.float16)
    mask[np.triu_indices(seq, k=past + 1, m=past + seq)] = -np.inf
    return mask[None, None]


@cache
def _decoder_class() -> type:
    """The torch wrapper class, built on first use so that importing this module does not import torch."""
    import torch

    class CoreMLDecoder(torch.nn.Module):
        """Runs the decoder layers with an explicit additive mask; stands in for the transformers Cache.

        Stateful: buffers `key_cache_{slot}` / `value_cache_{slot}` [1, kv_heads, context, head_dim], one pair per
        kept attention module (slot = its renumbered layer_idx). `update` writes new keys/values at past..end by
        slice assignment and returns the first `end` rows (Apple's pattern); coremltools turns the buffers into states.
        """

        def __init__(self, model, context_length: int | None):
            super().__init__()
            ad = adapter_for(model.config)
            self.embed, self.rope_inputs = get_path(model, ad.embed), partial(ad.rope_inputs, model)
            self.layers = torch.nn.ModuleList(decoder_layers(model))
            self.windows = [sliding_window(layer, model.config) for layer in self.layers]
            self.norm, self.lm_head = get_path(model, ad.final_norm), get_path(model, ad.lm_head)
            dtype = next(model.parameters()).dtype
            self.state_names, self._past = [], 0
            for attn in (getattr(layer, ad.attention) for layer in self.layers):
                if attn is None or context_length is None:
                    continue
                kv_heads = getattr(attn, ad.k_proj).out_features // attn.head_dim  # per layer: heads may be pruned
                for kind in ("key", "value"):
                    self.state_names.append(f"{kind}_cache_{attn.layer_idx}")
                    self.register_buffer(self.state_names[-1],
                                         torch.zeros(1, kv_heads, context_length, attn.head_dim, dtype=dtype))

        def update(self, key, value, layer_idx, cache_kwargs=None):
            end = self._past + key.shape[-2]
            caches = getattr(self, f"key_cache_{layer_idx}"), getattr(self, f"value_cache_{layer_idx}")
            for cache_, new in zip(caches, (key, value)):
                cache_[:, :, self._past:end, :] = new
            return tuple(cache_[:, :, :end, :] for cache_ in caches)

        def reset_states(self):
            for name in self.state_names:
                getattr(self, name).zero_()

        def forward(self, input_ids, causal_mask):
            end = causal_mask.shape[-1]
            self._past = end - input_ids.shape[-1]
            hidden = self.embed(input_ids)
            positions = torch.arange(self._past, end).unsqueeze(0)
            rope = self.rope_inputs(hidden, positions)
            cache_ = self if self.state_names else None
            masks = {None: causal_mask}
            for layer, window in zip(self.layers, self.windows):
                if window not in masks:  # a sliding layer also hides keys `window` or more tokens back
                    too_far = positions[0, :, None] - torch.arange(end)[None, :] >= window
                    masks[window] = causal_mask.masked_fill(too_far, float("-inf"))
                out = layer(hidden, attention_mask=masks[window], position_ids=positions, past_key_values=cache_,
                            use_cache=cache_ is not None, **rope)
                hidden = out[0] if isinstance(out, tuple) else out
            return self.lm_head(self.norm(hidden))

    return CoreMLDecoder


def _traced_wrapper(model, context_length: int, stateful: bool):
    """(jit-traced wrapper, its state names), after checking the traced wrapper against `model` itself."""
    import warnings

    import torch

    wrapper = _decoder_class()(model, context_length if stateful else None).eval()
    seq = min(2, context_length)
    past = min(1, context_length - seq) if stateful else 0  # trace with a cache offset so none gets baked in
    example = (torch.full((1, seq), 3, dtype=torch.long), _torch_mask(past, seq, wrapper))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        _check_wrapper(traced, wrapper, model, context_length)
    wrapper.reset_states()
    return traced, list(wrapper.state_names)


def _torch_mask(past: int, seq: int, like):
    import torch

    return torch.from_numpy(causal_mask(past, seq)).to(next(like.parameters()).dtype)


def _check_wrapper(traced, wrapper, model, context_length: int) -> None:
    """Prefill then decode token by token through the traced wrapper; logits must match the model's own."""
    import torch

    n = min(6, context_length)
    ids = (torch.arange(n) * 7 + 3).remainder(model.config.vocab_size).unsqueeze(0)
    want = model(input_ids=ids, use_cache=False).logits
    wrapper.reset_states()
    if wrapper.state_names:
        cuts = [0, max(1, n // 2), *range(max(1, n // 2) + 1, n + 1)]
        got = torch.cat([traced(ids[:, a:b], _torch_mask(a, b - a, wrapper)) for a, b in zip(cuts, cuts[1:])], 1)
    else:
        got = traced(ids, _torch_mask(0, n, wrapper))
    diff = float((got - want).abs().max())
    if not diff <= WRAPPER_RTOL * max(1.0, float(want.abs().max())):
        raise ExportError(f"the traced Core ML wrapper differs from the model by up to {diff:.3g} in logits on a "
                          f"prefill+decode check; the wrapper does not fit this {model.config.model_type} model's "
                          "layers, so nothing was converted (a bug to report, not a recipe problem)")


def _convert(model, context_length: int, stateful: bool):
    import coremltools as ct
    import numpy as np

    traced, state_names = _traced_wrapper(model, context_length, stateful)
    seq = ct.RangeDim(1, context_length, default=1)
    end = ct.RangeDim(1, context_length, default=1) if stateful else seq
    shapes = {name: tuple(getattr(traced, name).shape) for name in state_names}
    try:
        return ct.convert(
            traced, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
            compute_precision=ct.precision.FLOAT16, skip_model_load=True,
            inputs=[ct.TensorType(name="input_ids", shape=(1, seq), dtype=np.int32),
                    ct.TensorType(name="causal_mask", shape=(1, 1, seq, end), dtype=np.float16)],
            outputs=[ct.TensorType(name="logits", dtype=np.float16)],
            states=[ct.StateType(wrapped_type=ct.TensorType(shape=shapes[n], dtype=np.float16), name=n)
                    for n in state_names] or None,
        )
    except Exception as e:
        raise ExportError(f"coremltools could not convert this {model.config.model_type} model "
                          f"({'stateful' if stateful else 'stateless'}): {e}. Check the installed versions "
                          "(coremltools 9.0 with numpy < 2.4).") from e


def _compress(mlmodel, compression):
    import coremltools.optimize.coreml as cto

    if compression.kind == "palettize":
        op = cto.OpPalettizerConfig(mode=compression.mode, nbits=compression.nbits, granularity="per_tensor")
        return cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=op))
    if compression.kind == "linear-int8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
    else:
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                         block_size=compression.block_size)
    return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op))


def _save(mlmodel, model, out_dir: Path, variant: str, context_length: int) -> CoreMLPackage:
    import shutil

    path = out_dir / f"model-{variant}.mlpackage"
    shutil.rmtree(path, ignore_errors=True)
    mlmodel.user_defined_metadata.update({
        "slimformer.variant": variant, "slimformer.context_length": str(context_length),
        "slimformer.kept_attention_layers": json.dumps(kept_attention_layers(model)),
        "slimformer.dropped": json.dumps(drop_lists(model)), "slimformer.causal_mask": MASK_CONTRACT,
        "slimformer.kept_heads": json.dumps(kept_heads(model)),
    })
    mlmodel.input_description["causal_mask"] = MASK_CONTRACT
    mlmodel.save(str(path))
    found = describe_package(path)
    return CoreMLPackage(path=path, variant=variant, stateful=bool(found["states"]), kv_states=len(found["states"]),
                         **{k: found[k] for k in ("inputs", "outputs", "states", "op_counts", "weight_bytes")})


def describe_package(path: Path) -> dict:
    """Structure of a saved .mlpackage read from its spec (no prediction, works on Linux): inputs, outputs and
    states with shapes, dtypes, MIL op counts, weight bytes on disk, and the metadata slimformer wrote."""
    import coremltools as ct

    path = Path(path)
    spec = ct.utils.load_spec(str(path))
    desc = spec.description
    arrays = {f.name: f.type.multiArrayType for f in [*desc.input, *desc.output]}
    arrays.update({s.name: s.type.stateType.arrayType for s in desc.state})
    dtype_name = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name
    return {
        "inputs": {f.name: _shape(arrays[f.name]) for f in desc.input},
        "outputs": {f.name: _shape(arrays[f.name]) for f in desc.output},
        "states": {s.name: list(arrays[s.name].shape) for s in desc.state},
        "dtypes": {name: dtype_name(a.dataType).lower() for name, a in arrays.items()},
        "op_counts": _op_counts(spec),
        "weight_bytes": sum(f.stat().st_size for f in (path / WEIGHTS_DIR).glob("*") if f.is_file()),
        "metadata": dict(desc.metadata.userDefined),
    }


def _shape(array) -> list:
    ranges = array.shapeRange.sizeRanges
    if not ranges:
        return list(array.shape)
    return [r.lowerBound if r.lowerBound == r.upperBound else f"{r.lowerBound}..{r.upperBound}" for r in ranges]


def _op_counts(spec) -> dict[str, int]:
    counts = Counter()

    def walk(block):
        for op in block.operations:
            counts[op.type] += 1
            for inner in op.blocks:
                walk(inner)

    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            walk(block)
    return dict(counts.most_common())


def predict_parity(package: CoreMLPackage | Path, model, ids) -> CoreMLNumerics:
    """Core ML logits vs PyTorch on token ids `ids` (stateful: prefill half, then decode one token at a time).
    Only macOS can run Core ML; elsewhere returns {'checked': False, 'reason': ...}."""
    if sys.platform != "darwin":
        return CoreMLNumerics(checked=False, reason=LINUX_REASON)
    return _predict_parity_macos(Path(getattr(package, "path", package)), model, ids)


def _predict_parity_macos(path: Path, model, ids) -> CoreMLNumerics:
    import coremltools as ct
    import numpy as np
    import torch

    ids = np.asarray(ids, dtype=np.int32).reshape(1, -1)
    n = ids.shape[1]
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids).long(), use_cache=False).logits[0].float().numpy()
    mlmodel = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)
    if describe_package(path)["states"]:
        state, half = mlmodel.make_state(), max(1, n // 2)
        cuts = [0, half, *range(half + 1, n + 1)]
        got = np.concatenate([mlmodel.predict({"input_ids": ids[:, a:b], "causal_mask": causal_mask(a, b - a)},
                                              state=state)["logits"][0] for a, b in zip(cuts, cuts[1:])])
    else:
        got = mlmodel.predict({"input_ids": ids, "causal_mask": causal_mask(0, n)})["logits"][0]
    diff = np.abs(got.astype(np.float32) - want)
    return CoreMLNumerics(checked=True, tokens=n, max_abs_logit_error=float(diff.max()),
                          mean_abs_logit_error=float(diff.mean()),
                          top1_agreement=float((got.argmax(-1) == want.argmax(-1)).mean()))
