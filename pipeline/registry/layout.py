"""What a published version is: one OCI image manifest whose layers are a run folder's files, uncompressed.

Each layer's digest is the file's sha256; its annotations give the file's path in the run folder (the standard
title annotation, so the stock `oras pull` writes every file back where it was), the variant and format the file
belongs to, and its sha256. The manifest's annotations carry the version, the recipe and source model hashes and
every variant's key figures; its config blob is the `PublishedVersion` record. Nothing here talks to a store.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..artifacts import PublishedVersion, Report, VariantFigures
from ..errors import RegistryError, SlimformerError
from ..rundir import sha256_file

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.slimformer.version.v1+json"
TITLE = "org.opencontainers.image.title"
PREFIX = "dev.slimformer."
FORMATS = ("onnx", "ort", "genai", "coreml", "hf")
# A version: the run's UTC creation time, then the first 8 hex digits of its manifest.json's sha256.
VERSION_PATTERN = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")
TAG_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")  # the OCI distribution spec's tag rule
NAME_PATTERN = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")  # one OCI repository path component
MEDIA_TYPES = {".onnx": "application/vnd.slimformer.onnx.v1", ".onnx_data": "application/vnd.slimformer.onnx-data.v1",
               ".data": "application/vnd.slimformer.onnx-data.v1", ".ort": "application/vnd.slimformer.ort.v1",
               ".safetensors": "application/vnd.slimformer.safetensors.v1", ".json": "application/json",
               ".md": "text/markdown", ".yaml": "application/yaml", ".png": "image/png", ".log": "text/plain",
               ".txt": "text/plain", ".jinja": "text/plain", ".config": "text/plain"}
BINARY = "application/octet-stream"


@dataclass(frozen=True)
class Layer:
    """One file of a version: its path in the run folder, sha256, size, media type, variant and format (both
    None for run-level files such as report.json)."""

    path: str
    sha256: str
    size: int
    media_type: str
    variant: str | None
    format: str | None

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256}"

    def descriptor(self) -> dict:
        notes = {TITLE: self.path, PREFIX + "sha256": self.sha256}
        if self.variant is not None:
            notes.update({PREFIX + "variant": self.variant, PREFIX + "format": self.format})
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, "annotations": notes}

    @classmethod
    def from_descriptor(cls, d: dict) -> Layer:
        notes = d.get("annotations") or {}
        if TITLE not in notes or not d.get("digest", "").startswith("sha256:"):
            raise RegistryError(f"layer {d.get('digest')} has no file path (title annotation) or no sha256 digest: "
                                "this is not a version slimformer published")
        return cls(path=notes[TITLE], sha256=d["digest"].removeprefix("sha256:"), size=int(d["size"]),
                   media_type=d["mediaType"], variant=notes.get(PREFIX + "variant"),
                   format=notes.get(PREFIX + "format"))


def classify(path: str) -> tuple[str | None, str | None]:
    """(variant, format) of a run folder file, from the folder it lies in: onnx/ and hf/ are the compressed
    variant, onnx-<v>/, ort-<v>/ and genai-<v>/ are variant v, coreml/model-<v>.mlpackage is Core ML variant v.
    Top-level files (report.json, manifest.json...) belong to the whole run: (None, None)."""
    top, _, rest = path.partition("/")
    if not rest:
        return None, None
    if top in ("onnx", "hf"):
        return "compressed", top
    if top == "coreml":
        package = rest.split("/")[0]
        return package.removeprefix("model-").removesuffix(".mlpackage"), "coreml"
    for fmt in ("onnx", "ort", "genai"):
        if top.startswith(fmt + "-"):
            return top[len(fmt) + 1:], fmt
    return None, top


def media_type(path: str) -> str:
    return MEDIA_TYPES.get(Path(path).suffix, BINARY)


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise RegistryError(f"name '{name}' cannot be a registry name: use lower-case letters, digits and single "
                            "'.', '_' or '-' between them (an OCI repository name), e.g. smollm2-135m; rename the "
                            "recipe's `name`")
    return name


def check_tag(tag: str) -> str:
    if not TAG_PATTERN.match(tag) or VERSION_PATTERN.match(tag):
        raise RegistryError(f"tag '{tag}' is not usable: a tag is 1-128 letters, digits, '.', '_' or '-' (not "
                            "starting with '.' or '-'), and must not look like a version (<UTC time>-<hash>)")
    return tag


def run_layers(run_dir: Path) -> tuple[list[Layer], dict]:
    """Every file of a finished run folder as a layer (manifest.json included), each checked against the run's
    manifest.json: a file missing or changed since the run wrote it is refused, named."""
    run_dir = Path(run_dir)
    path = run_dir / "manifest.json"
    if not path.is_file() or not (run_dir / "report.json").is_file():
        raise SlimformerError(f"{run_dir} is not a finished run folder (no manifest.json or report.json); pass a "
                              "folder that `slimformer run` wrote, e.g. runs/smollm2-135m-<time>")
    manifest = json.loads(path.read_text())
    layers, problems = [], []
    for rel, entry in sorted(manifest["files"].items()):
        file = run_dir / rel
        if not file.is_file():
            problems.append(f"{rel}: listed in manifest.json but missing")
            continue
        size, found = file.stat().st_size, sha256_file(file)
        if size != entry["bytes"] or found != entry["sha256"]:
            problems.append(f"{rel}: {size} bytes, sha256 {found[:12]}...; manifest.json says {entry['bytes']} "
                            f"bytes, sha256 {entry['sha256'][:12]}...")
            continue
        layers.append(Layer(rel, found, size, media_type(rel), *classify(rel)))
    if problems:
        raise SlimformerError(f"{run_dir} changed since its run finished; refusing to publish it:\n"
                              + "\n".join(f"  - {p}" for p in problems))
    layers.append(Layer("manifest.json", sha256_file(path), path.stat().st_size, "application/json", None, None))
    return layers, manifest


def version_name(run_dir: Path, manifest: dict) -> str:
    stamp = manifest["created_utc"][:19].replace("-", "").replace(":", "") + "Z"
    return f"{stamp}-{sha256_file(Path(run_dir) / 'manifest.json')[:8]}"


def figures(report: Report) -> dict[str, VariantFigures]:
    """Key figures of every validated variant: accuracy, size, KV per token, decode ms on the host and targets."""
    out = {}
    for name, m in report.validation.models.items():
        if name == "original":
            continue
        decode = {"host": round(m.decode_p50_ms, 3)}
        decode.update({row.target: round(row.decode_p50_ms, 3) for row in report.validation.targets
                       if row.variant == name and row.decode_p50_ms is not None})
        out[name] = VariantFigures(perplexity=m.perplexity, mc_accuracy=m.mc_accuracy, file_mb=m.file_mb,
                                   kv_kb_per_token=m.kv_kb_per_token, decode_ms=decode)
    return out


def describe_version(run_dir: Path, layers: list[Layer], manifest: dict) -> PublishedVersion:
    report = Report.read(run_dir)
    formats = {}
    for layer in layers:
        if layer.variant is not None:
            formats.setdefault(layer.variant, set()).add(layer.format)
    return PublishedVersion(
        name=check_name(manifest["name"]), version=version_name(run_dir, manifest),
        created_utc=manifest["created_utc"], recipe_sha256=manifest["recipe_sha256"],
        source_model=manifest["source_model"]["description"], source_sha256=manifest["source_model"]["sha256"],
        passed=bool(manifest.get("passed", report.passed)), formats={v: tuple(sorted(f)) for v, f in formats.items()},
        figures=figures(report), files=len(layers), bytes=sum(layer.size for layer in layers))


def image_manifest(info: PublishedVersion, layers: list[Layer], config: bytes) -> dict:
    """The OCI image manifest of a version. Annotation values are strings: structured ones are JSON."""
    notes = {TITLE: info.name, "org.opencontainers.image.version": info.version,
             "org.opencontainers.image.created": info.created_utc, PREFIX + "recipe.sha256": info.recipe_sha256,
             PREFIX + "source.sha256": info.source_sha256, PREFIX + "source": info.source_model,
             PREFIX + "passed": str(info.passed).lower(),
             PREFIX + "figures": json.dumps({v: asdict(f) for v, f in info.figures.items()}, sort_keys=True),
             PREFIX + "formats": json.dumps(info.formats, sort_keys=True)}
    return {"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                       "size": len(config)},
            "layers": [layer.descriptor() for layer in layers], "annotations": notes}


def config_blob(info: PublishedVersion) -> bytes:
    return json.dumps(info.to_json(), sort_keys=True, indent=1).encode()


def select(manifest: dict, variant: str, fmt: str) -> list[Layer]:
    """The layers a pull of (variant, format) writes: that variant's files in that format, plus the run-level
    files (manifest.json, report.json, ...). Raises naming what the version has when the pair is absent."""
    layers = [Layer.from_descriptor(d) for d in manifest.get("layers", [])]
    chosen = [layer for layer in layers if layer.variant == variant and layer.format == fmt]
    if not chosen:
        have = sorted({f"{layer.variant} ({layer.format})" for layer in layers if layer.variant is not None})
        raise RegistryError(f"this version has no variant '{variant}' in format '{fmt}'; it has: "
                            f"{', '.join(have) or 'none'}. Pick one with --variant and --format")
    return chosen + [layer for layer in layers if layer.variant is None and "/" not in layer.path]
