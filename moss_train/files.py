"""Small file helpers every layer uses (bottom layer: imports nothing of moss_train)."""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The file's sha256 hex digest, read in chunks (shards and checkpoints are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
