"""Versioned artifacts: publish a finished run folder to a registry, pull one variant and format back, list versions.

A registry is a local folder (`local.LocalStore`, OCI image layouts, no server) or an OCI registry
(`oci.OciStore`, `oci://host[:port]/repository`, through the ORAS SDK). Both offer the same small interface:
names, tags, manifest, has_blob, blob_chunks, put_blob, put_manifest. `ops` holds publish, pull and the
version listing on top of it; `layout` says what a version is.
"""

from __future__ import annotations

from pathlib import Path


def open_store(location: str | Path):
    """The store behind `location`: oci://host[:port]/repository, else a local folder (created on publish)."""
    if str(location).startswith("oci://"):
        from .oci import OciStore

        return OciStore(str(location))
    from .local import LocalStore

    return LocalStore(Path(location))
