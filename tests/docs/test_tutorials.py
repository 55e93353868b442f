"""Every notebook under docs/ runs end to end in a real Jupyter kernel, as a reader runs it.

New notebooks are picked up by the glob. A failing cell fails its notebook's test with the
cell's source and traceback. The notebooks are stored without outputs, so diffs show code.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from nbclient.exceptions import CellExecutionError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "docs").rglob("*.ipynb"))
CELL_TIMEOUT_S = 120  # as tests/test_notebook.py: the first cell also starts fedcore's loop
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colours of IPython's tracebacks
IDS = [str(p.relative_to(ROOT / "docs")) for p in NOTEBOOKS]


def test_the_tutorials_are_found():
    names = {p.name for p in NOTEBOOKS}
    assert {"01-simulation-quickstart.ipynb", "02-torch-and-biomedical-data.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_stored_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{path.name}: clear the outputs of cells {dirty} before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs(path: Path, tmp_path: Path):
    for extra in _needs(path):
        pytest.importorskip(extra)
    nb = nbformat.read(path, as_version=4)
    # The kernel works in a scratch folder, so that a notebook writes nothing into the
    # checkout.
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    failure = None
    try:
        client.execute()
    except CellExecutionError as exc:
        failure = ANSI.sub("", str(exc))  # the cell's source and its traceback
    failed = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
              and any(o.get("output_type") == "error" for o in cell.outputs)]
    if failure is not None or failed:
        pytest.fail(f"{path.name}: cell {failed} failed.\n{failure}", pytrace=False)


# What in a notebook's text shows that it needs an optional package.
_MARKERS = {"sklearn": ("sklearn",), "torch": ("torch",), "matplotlib": (".plot(",),
            "tensorboard": ("tensorboard=",)}


def _needs(path: Path) -> list[str]:
    """The optional packages a notebook uses (so a missing extra skips, not fails)."""
    text = path.read_text(encoding="utf-8")
    return [name for name, markers in _MARKERS.items() if any(m in text for m in markers)]
