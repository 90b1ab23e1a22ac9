"""Writing files so that a kill at any moment leaves nothing that looks complete.

`owned_folder` is a hidden temporary folder held under an exclusive lock (flock on the folder itself) for as long
as its process lives; a SIGKILL cannot remove it, so the next writer in the same place removes every such folder
whose lock is free. `write_verified` streams bytes to a file while hashing them and refuses a mismatch, naming
the file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from ..errors import IntegrityError

CHUNK = 1 << 20


@contextmanager
def owned_folder(parent: Path, prefix: str):
    """Yield a new folder `parent/.<prefix>.partial-<id>`, locked while the block runs and removed after it
    (unless the caller renamed it away). Unlocked leftovers of `prefix` (their writer was killed) go first."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(parent, prefix)
    folder = parent / f".{prefix}.partial-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)  # closing releases the lock


def remove_abandoned(parent: Path, prefix: str) -> None:
    for folder in Path(parent).glob(f".{prefix}.partial-*"):
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its writer is alive
        finally:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)


def write_verified(chunks, dest: Path, sha256: str, size: int, name: str) -> None:
    """Write the byte `chunks` to `dest` (fsynced), refusing with IntegrityError, before anything else reads
    the file, when they do not hash to `sha256` or do not add up to `size` bytes."""
    h, written = hashlib.sha256(), 0
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as f:
        for chunk in chunks:
            h.update(chunk)
            written += len(chunk)
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    if written != size or h.hexdigest() != sha256:
        what = (f"truncated: {written} of {size} bytes" if written < size else
                f"{written} bytes, sha256 {h.hexdigest()}" if written != size else f"sha256 {h.hexdigest()}")
        raise IntegrityError(f"{name}: {what}; the version records {size} bytes, sha256 {sha256}. The registry's "
                             "copy is damaged or was tampered with; nothing was kept. Pull another version, and have "
                             "the damaged blob removed from the registry before publishing this one again")


def file_chunks(path: Path):
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            yield block
