from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tinydb.storages import Storage

from fedcore._files import write_atomic


class AtomicJSONStorage(Storage):
    """TinyDB storage that replaces the file atomically on every write.

    TinyDB's default storage rewrites the file in place, so a crash mid-write leaves a
    truncated or NUL-filled database. Here a write goes to a temporary file in the same
    folder, is flushed to disk and renamed over the old one: readers see the old or the new
    database, never half of one.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path)

    def read(self) -> dict[str, dict[str, Any]] | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        return json.loads(text) if text.strip() else None

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        write_atomic(self.path, json.dumps(data, indent=1, sort_keys=True))

    def close(self) -> None:
        pass


def remove_stale_temporaries(path: Path, age_s: float = 300.0) -> None:
    """Delete temporary files an atomic write of ``path`` left when its process was killed.

    A write takes milliseconds: a temporary older than ``age_s`` belongs to no live writer.
    """
    now = time.time()
    for tmp in path.parent.glob(f".{path.name}.*"):
        try:
            if now - tmp.stat().st_mtime > age_s:
                tmp.unlink()
        except OSError:
            pass
