"""Files written so that a crash at any moment leaves the old version or the new one, whole."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | Path, data: bytes | str, *, durable: bool = True) -> Path:
    """Replace ``path`` with ``data``: temporary file in the same folder, fsync, rename.

    A temporary left by a killed process is named ``.<name>.<random>`` beside the file.
    ``durable=False`` skips the ``fsync``: a reader, or a process killed at any moment,
    still sees the old file or the new one, whole (the rename), but a crash of the machine
    may lose the latest version. For files that nothing outlives (a simulation's
    temporary home folders).
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    done = False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        done = True
    finally:
        if not done:
            Path(tmp).unlink(missing_ok=True)
    return path
