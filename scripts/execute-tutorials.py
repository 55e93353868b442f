"""Run every notebook under docs/ in a real Jupyter kernel and store it with its outputs.

    .venv/bin/python scripts/execute-tutorials.py [NOTEBOOK ...]

Readers see the outputs on GitHub or in the docs without running anything; the test suite
(tests/docs/test_tutorials.py) runs each notebook again and checks that the stored outputs
are those of a clean run (same cells, same kinds of output, no error, no warning). Run this
after changing a notebook or an output it shows.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]
CELL_TIMEOUT_S = 120


def execute(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as scratch:  # the notebook writes nothing here
        nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                resources={"metadata": {"path": scratch}}).execute()
    nbformat.validate(nb)
    nbformat.write(nb, path)
    print(f"stored {path.relative_to(ROOT)} with its outputs")


def main(argv: list[str]) -> int:
    paths = [Path(a).resolve() for a in argv] or sorted((ROOT / "docs").rglob("*.ipynb"))
    for path in paths:
        execute(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
