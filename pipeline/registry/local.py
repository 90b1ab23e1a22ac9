"""The embedded registry: a local folder holding one OCI image layout per name (no server needed).

`REGISTRY/<name>/` has `oci-layout`, `index.json` (one entry per tag, its name in the
org.opencontainers.image.ref.name annotation) and `blobs/sha256/<hex>`, so the stock CLI reads it as is
(`oras pull --oci-layout REGISTRY/<name>:<tag>`), and `oras cp --from-oci-layout` copies a version to any
OCI registry. Blobs are written to a locked temporary folder, checked and renamed into place; index.json is
replaced atomically under a lock, and only after every blob and the manifest are stored.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

from .files import file_chunks, owned_folder, write_verified
from .layout import MANIFEST_TYPE
from ..errors import IntegrityError, RegistryError

REF_NAME = "org.opencontainers.image.ref.name"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"


class LocalStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.location = str(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise RegistryError(f"registry {self.root} is a file; give a folder (created if missing) or "
                                "oci://host[:port]/repository")

    def where(self, name: str, ref: str) -> str:
        return f"{self.root / name}:{ref}"

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(d.name for d in self.root.iterdir() if (d / "oci-layout").is_file())

    def tags(self, name: str) -> list[str]:
        return [m["annotations"][REF_NAME] for m in self._index(name)["manifests"]]

    def manifest(self, name: str, ref: str) -> tuple[dict, str] | None:
        """(manifest, digest) that `ref` names, None when absent; the manifest blob is checked against its digest."""
        entry = next((m for m in self._index(name)["manifests"] if m["annotations"][REF_NAME] == ref), None)
        if entry is None:
            return None
        path = self._blob(name, entry["digest"])
        data = b"".join(self.blob_chunks(name, entry["digest"]))
        if "sha256:" + hashlib.sha256(data).hexdigest() != entry["digest"]:
            raise IntegrityError(f"{path}: the manifest of {name}:{ref} does not hash to {entry['digest']}; "
                                 "the registry folder is damaged")
        return json.loads(data), entry["digest"]

    def has_blob(self, name: str, digest: str) -> bool:
        return self._blob(name, digest).is_file()

    def blob_chunks(self, name: str, digest: str):
        path = self._blob(name, digest)
        if not path.is_file():
            raise RegistryError(f"{path} is missing: the registry folder lost a blob of {name}")
        return file_chunks(path)

    def put_blob(self, name: str, source: Path, digest: str, size: int, media_type: str) -> None:
        self._put(name, file_chunks(source), digest, size, str(source))

    def put_manifest(self, name: str, manifest: dict, tags: list[str]) -> str:
        """Store the manifest, then point every tag at it in one atomic replace of index.json."""
        data = json.dumps(manifest, sort_keys=True).encode()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self._put(name, [data], digest, len(data), "manifest")
        with self._locked(name):
            index = self._index(name)
            kept = [m for m in index["manifests"] if m["annotations"][REF_NAME] not in tags]
            index["manifests"] = kept + [{"mediaType": MANIFEST_TYPE, "digest": digest, "size": len(data),
                                          "annotations": {REF_NAME: tag}} for tag in tags]
            tmp = self.root / name / f".index.json.{os.getpid()}"
            tmp.write_text(json.dumps(index, indent=1))
            os.replace(tmp, self.root / name / "index.json")
        return digest

    # ---------------------------------------------------------------- inside one layout

    def _blob(self, name: str, digest: str) -> Path:
        return self.root / name / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def _index(self, name: str) -> dict:
        path = self.root / name / "index.json"
        if not path.is_file():
            return {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": []}
        return json.loads(path.read_text())

    def _put(self, name: str, chunks, digest: str, size: int, label: str) -> None:
        final = self._blob(name, digest)
        if final.is_file():
            return  # content-addressed: the same bytes are already there
        self._init(name)
        with owned_folder(self.root / name, "incoming") as tmp:
            part = tmp / "blob"
            write_verified(chunks, part, digest.removeprefix("sha256:"), size, label)
            os.replace(part, final)

    def _init(self, name: str) -> None:
        layout = self.root / name
        (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        if not (layout / "oci-layout").is_file():
            (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))

    @contextmanager
    def _locked(self, name: str):
        self._init(name)
        with open(self.root / name / ".index.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
