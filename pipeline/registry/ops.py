"""publish, pull and the version listing, on any store.

publish: every file of the run is checked against its manifest.json, uploaded unless the store has it, then the
manifest is stored under the version, and only then are the moving tags (latest, --tag) pointed at it. A kill at
any point before that leaves the previous version and every tag as they were. pull: only the requested variant
and format (plus the run-level files), each blob hashed as it streams into a locked temporary folder that is
renamed to the destination only when every file matched its sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path, PurePosixPath

from .. import console
from ..artifacts import PublishedVersion
from ..errors import IntegrityError, RegistryError, SlimformerError
from .files import owned_folder, write_verified
from .layout import (VERSION_PATTERN, check_name, check_tag, config_blob, describe_version, image_manifest,
                     run_layers, select)

DEFAULT_TAG = "latest"


def publish(run_dir: Path, store, tags: list[str] = ()) -> PublishedVersion:
    """Publish a finished run folder as a new immutable version; point `latest` and `tags` at it."""
    run_dir = Path(run_dir)
    layers, run_manifest = run_layers(run_dir)
    info = describe_version(run_dir, layers, run_manifest)
    moving = list(dict.fromkeys([DEFAULT_TAG, *(check_tag(t) for t in tags)]))
    config = config_blob(info)
    manifest = image_manifest(info, layers, config)
    name, version = info.name, info.version
    existing = store.manifest(name, version)
    if existing is not None:
        if (existing[0]["layers"], existing[0]["config"]) != (manifest["layers"], manifest["config"]):
            raise RegistryError(f"{store.where(name, version)} exists with other content; versions are immutable")
        console.say(f"{store.where(name, version)} is already published; moving {', '.join(moving)}")
    else:
        _upload(store, name, run_dir, layers, config, manifest)
        store.put_manifest(name, manifest, [version])
    store.put_manifest(name, manifest, moving)
    console.say(f"published {store.where(name, version)} ({info.files} files, {info.bytes / 1e6:.1f} MB); "
                f"{', '.join(moving)} -> {version}")
    return info


def _upload(store, name: str, run_dir: Path, layers, config: bytes, manifest: dict) -> None:
    missing = [layer for layer in layers if not store.has_blob(name, layer.digest)]
    console.say(f"uploading {len(missing)} of {len(layers)} files "
                f"({sum(layer.size for layer in missing) / 1e6:.1f} MB; the rest are there already)")
    bar = console.progress(total=sum(layer.size for layer in missing), unit="B", unit_scale=True, desc="upload")
    for layer in missing:
        store.put_blob(name, run_dir / layer.path, layer.digest, layer.size, layer.media_type)
        bar.update(layer.size)
    bar.close()
    with tempfile.TemporaryDirectory(prefix="slimformer-config-") as tmp:
        path = Path(tmp) / "config.json"
        path.write_bytes(config)
        store.put_blob(name, path, manifest["config"]["digest"], len(config), manifest["config"]["mediaType"])


def parse_ref(ref: str) -> tuple[str, str]:
    """NAME[:VERSION|:TAG] -> (name, version or tag); no tag means latest."""
    name, _, tag = ref.partition(":")
    return check_name(name), tag or DEFAULT_TAG


def pull(ref: str, store, dest: Path, variant: str = "compressed", fmt: str = "onnx") -> Path:
    """Pull one variant in one format of NAME[:VERSION|:TAG] into the new folder `dest`; every file's sha256 is
    checked as it arrives. A damaged file is refused (IntegrityError naming it) and nothing is left behind."""
    name, tag = parse_ref(ref)
    dest = Path(dest)
    if dest.exists():
        raise SlimformerError(f"{dest} exists; pull into a new folder (pulls never overwrite)")
    found = store.manifest(name, tag)
    if found is None:
        known = store.tags(name)
        raise RegistryError(f"{store.where(name, tag)} not found; "
                            + (f"{name} has: {', '.join(known)}" if known else f"the registry has no '{name}'"))
    manifest = found[0]
    layers = select(manifest, variant, fmt)
    version = manifest.get("annotations", {}).get("org.opencontainers.image.version", tag)
    console.say(f"pulling {store.where(name, version)} ({variant}, {fmt}): {len(layers)} files, "
                f"{sum(layer.size for layer in layers) / 1e6:.1f} MB")
    with owned_folder(dest.parent, dest.name) as tmp:
        bar = console.progress(total=sum(layer.size for layer in layers), unit="B", unit_scale=True, desc="pull")
        for layer in layers:
            write_verified(store.blob_chunks(name, layer.digest), tmp / _safe(layer.path), layer.sha256,
                           layer.size, layer.path)
            bar.update(layer.size)
        bar.close()
        _match_run_manifest(tmp, layers)
        os.rename(tmp, dest)
    console.say(f"pulled into {dest}; every file matched its sha256")
    return dest


def _safe(path: str) -> PurePosixPath:
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise IntegrityError(f"layer path '{path}' leaves the destination folder; refusing this version")
    return p


def _match_run_manifest(folder: Path, layers) -> None:
    """The pulled files against the run's own manifest.json (pulled too): the chain from the run to the phone."""
    run = json.loads((folder / "manifest.json").read_text())["files"]
    for layer in layers:
        entry = run.get(layer.path)
        if layer.path != "manifest.json" and (entry is None or entry["sha256"] != layer.sha256):
            raise IntegrityError(f"{layer.path}: sha256 {layer.sha256} is not what the run's manifest.json "
                                 f"records ({entry['sha256'] if entry else 'not listed'})")


def versions(store, name: str) -> list[PublishedVersion]:
    """Every version of `name`, oldest first, each with the moving tags that point at it now."""
    check_name(name)
    tags = store.tags(name)
    pointing = {}
    for tag in (t for t in tags if not VERSION_PATTERN.match(t)):
        manifest = store.manifest(name, tag)[0]
        pointing.setdefault(manifest["annotations"]["org.opencontainers.image.version"], []).append(tag)
    out = []
    for version in sorted(t for t in tags if VERSION_PATTERN.match(t)):
        manifest = store.manifest(name, version)[0]
        config = manifest["config"]
        blob = b"".join(store.blob_chunks(name, config["digest"]))
        if "sha256:" + hashlib.sha256(blob).hexdigest() != config["digest"]:
            raise IntegrityError(f"{store.where(name, version)}: its config blob does not match its digest")
        info = PublishedVersion.from_json(json.loads(blob))
        out.append(dataclasses.replace(info, tags=tuple(sorted(pointing.get(version, [])))))
    return out


def version_table(name: str, found: list[PublishedVersion]) -> str:
    lines = [f"{name}: {len(found)} version(s)", "",
             "| version | tags | variant | formats | perplexity | MC accuracy | file MB | KV KB/token | decode ms/token |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for info in found:
        for variant in sorted(info.formats, key=lambda v: (v != "compressed", v)):
            f = info.figures.get(variant)
            figures = ("| | | | |" if f is None else
                       f"| {f.perplexity:.3f} | {f.mc_accuracy:.3f} | {f.file_mb:.1f} | {f.kv_kb_per_token:.1f} | "
                       + ", ".join(f"{where} {ms:.2f}" for where, ms in f.decode_ms.items()) + " |")
            lines.append(f"| {info.version} | {' '.join(info.tags)} | {variant} | {' '.join(info.formats[variant])} "
                         + figures)
    return "\n".join(lines)


def names_table(store) -> str:
    lines = [f"{store.location}:"]
    for name in store.names():
        tags = store.tags(name)
        count = sum(1 for t in tags if VERSION_PATTERN.match(t))
        moving = sorted(t for t in tags if not VERSION_PATTERN.match(t))
        lines.append(f"  {name}: {count} version(s); tags: {', '.join(moving) or 'none'}")
    return "\n".join(lines) if len(lines) > 1 else f"{store.location}: no names published yet"
