"""Where a simulation keeps its hospitals' home folders when the caller names no folder.

Every simulated node writes its home as a deployed node does: ``config.toml`` and
``db.json`` replaced atomically (``fsync``), the audit log's database records ``fsync``-ed,
its dataset file. On a disk, those ``fsync`` calls made most of the time it took to set up
a federation (three per node: 0.25 s of wall time for 10 nodes on a loaded machine, against
0.06 s of CPU), for folders that are deleted when the federation closes and would not
outlive a crash of the machine anyway. So a temporary root goes to a folder in memory
(``/dev/shm`` on Linux), where the same writes and ``fsync`` calls return at once, when:

- ``TMPDIR`` is not set (if it is, the temporary root goes there, as for any temporary
  folder);
- ``/dev/shm`` is a folder this process may write to;
- it has room to spare: at least 1 GiB free beyond four times the bytes the nodes' data
  will take (``size_hint``), since files in memory take memory.

Otherwise, and everywhere else, the root is an ordinary temporary folder
(:func:`tempfile.mkdtemp`). A root the caller names is used as it is.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["scratch_root"]

_MEMORY = Path("/dev/shm")
_SPARE = 1 << 30  # bytes left free in memory, beyond the data's own share


def scratch_root(size_hint: int = 0, *, memory: Path = _MEMORY) -> Path:
    """A new temporary folder for simulated homes; in memory when it has room (see above)."""
    if "TMPDIR" not in os.environ and _has_room(memory, max(0, int(size_hint))):
        try:
            return Path(tempfile.mkdtemp(prefix="fedcore-", dir=memory))
        except OSError:  # full, or taken away meanwhile: a folder on disk does as well
            pass
    return Path(tempfile.mkdtemp(prefix="fedcore-"))


def _has_room(folder: Path, size_hint: int) -> bool:
    try:
        if not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
            return False
        return shutil.disk_usage(folder).free >= _SPARE + 4 * size_hint
    except OSError:
        return False
