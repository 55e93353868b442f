"""Every notebook under docs/ runs end to end in a real Jupyter kernel, as a reader runs it.

New notebooks are picked up by the glob. A failing cell fails its notebook's test with the
cell's source and traceback. The notebooks are stored with their outputs, so that readers see
them without running anything (``scripts/execute-tutorials.py`` stores them); the run here
checks that the stored outputs are those of a clean run: the same kinds of output in every
cell, no error and no warning.
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
def test_notebook_is_stored_with_the_outputs_of_one_clean_run(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code if cell.source.strip()]
    assert counts == list(range(1, len(counts) + 1)), (
        f"{path.name}: cells were run out of order or not at all ({counts}): run "
        "scripts/execute-tutorials.py")
    assert any(cell.outputs for cell in code), f"{path.name}: stored without outputs"
    for i, cell in enumerate(code):
        assert not _problems(cell.outputs), (i, _problems(cell.outputs))


def _problems(outputs: list) -> list[str]:
    """Errors, and warnings on stderr (a progress bar on stderr is no problem)."""
    found = [f"{o.get('ename')}: {o.get('evalue')}" for o in outputs
             if o.get("output_type") == "error"]
    found += [o["text"] for o in outputs if o.get("output_type") == "stream"
              and o.get("name") == "stderr" and "Warning" in o.get("text", "")]
    return found


def _kinds(cell) -> list[tuple[str, ...]]:
    """What a reader sees in a cell, by kind: the stream names, the MIME types of results."""
    kinds = set()
    for o in cell.outputs:
        if o.get("output_type") == "stream":
            kinds.add(("stream", o.get("name", "")))
        else:
            kinds.add((o.get("output_type", ""), *sorted(o.get("data", {}))))
    return sorted(kinds)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs(path: Path, tmp_path: Path):
    for extra in _needs(path):
        pytest.importorskip(extra)
    nb = nbformat.read(path, as_version=4)
    stored = [_kinds(cell) for cell in nb.cells if cell.cell_type == "code"]
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
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    # No warning reaches the reader (tqdm's TqdmWarning in a kernel without ipywidgets was
    # one), and what is stored is what a clean run shows now.
    assert [_problems(cell.outputs) for cell in code if _problems(cell.outputs)] == []
    fresh = [_kinds(cell) for cell in code]
    assert fresh == stored, (
        f"{path.name}: the stored outputs are not those of a run now: run "
        "scripts/execute-tutorials.py")


# What in a notebook's text shows that it needs an optional package.
_MARKERS = {"sklearn": ("sklearn",), "torch": ("torch",), "matplotlib": (".plot(",),
            "tensorboard": ("tensorboard=",)}


def _needs(path: Path) -> list[str]:
    """The optional packages a notebook uses (so a missing extra skips, not fails)."""
    text = path.read_text(encoding="utf-8")
    return [name for name, markers in _MARKERS.items() if any(m in text for m in markers)]
