"""The documentation's examples run, and the demo shows what the README says it shows.

Every fenced ```python block of README.md and docs/*.md runs in a fresh interpreter (this
one's, so the dev environment) from a file of its own, unless the line before the fence is
``<!-- not-run -->``. Blocks run from a file rather than ``python -c`` because plans are
shipped as source, which fedcore reads back from the file that defined them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = "<!-- not-run -->"
BLOCK_TIMEOUT_S = 120
FENCE = re.compile(r"^(?P<indent> *)```(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    runnable: bool

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced block whose info string is ``python``, with whether it is runnable."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, info = i, match["info"].strip().split()
        closing = re.compile(rf"^{match['indent']}```\s*$")
        i += 1
        body: list[str] = []
        while i < len(lines) and not closing.match(lines[i]):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{path}:{start + 1}: unclosed code fence")
        i += 1
        if info[:1] == ["python"]:
            previous = next((ln.strip() for ln in reversed(lines[:start]) if ln.strip()), "")
            code = "\n".join(ln[len(match["indent"]):] for ln in body) + "\n"
            blocks.append(Block(path, start + 1, code, runnable=previous != NOT_RUN))
    return blocks


ALL_BLOCKS = [b for path in DOCS for b in fenced_blocks(path)]
RUNNABLE = [b for b in ALL_BLOCKS if b.runnable]


def run_python(script: Path, *args: str, cwd: Path, timeout: float
               ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "MPLBACKEND": "Agg"}
    try:
        return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{script.name} ran longer than {timeout} s.\nstdout:\n{exc.stdout}\n"
                    f"stderr:\n{exc.stderr}")


def test_docs_have_runnable_examples():
    # Guards against a parser change (or a renamed folder) silently running nothing.
    assert (ROOT / "README.md") in {b.path for b in RUNNABLE}
    assert len(RUNNABLE) >= 5, [b.id for b in ALL_BLOCKS]


def test_fence_parser_honours_not_run_marker(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nprint(1)\n```\n\n<!-- not-run -->\n```python\n"
                    "nope(\n```\n\n```bash\nls\n```\n  ```python\n  x = 1\n  ```\n")
    found = [(b.line, b.code, b.runnable) for b in fenced_blocks(page)]
    assert found == [(3, "print(1)\n", True), (8, "nope(\n", False), (15, "x = 1\n", True)]


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_doc_block_runs(block: Block, tmp_path: Path):
    script = tmp_path / f"{block.path.stem}_line{block.line}.py"
    script.write_text(block.code, encoding="utf-8")
    result = run_python(script, cwd=tmp_path, timeout=BLOCK_TIMEOUT_S)
    assert result.returncode == 0, (
        f"The example at {block.id} failed (exit {result.returncode}).\n"
        f"--- code ---\n{block.code}\n--- stdout ---\n{result.stdout}\n"
        f"--- stderr ---\n{result.stderr}"
    )


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if not b.runnable],
                         ids=[b.id for b in ALL_BLOCKS if not b.runnable])
def test_not_run_block_still_parses(block: Block):
    compile(block.code, block.id, "exec")


def _accuracy(label: str, output: str) -> float:
    match = re.search(rf"^{label} accuracy:\s+([0-9.]+)\s*$", output, re.MULTILINE)
    assert match, f"No '{label} accuracy:' line in the demo's output:\n{output}"
    return float(match[1])


def test_demo_federated_accuracy_matches_centralized(tmp_path):
    result = run_python(ROOT / "examples" / "demo_breast_cancer.py", cwd=tmp_path,
                        timeout=BLOCK_TIMEOUT_S)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    federated = _accuracy("federated", result.stdout)
    centralized = _accuracy("centralized", result.stdout)
    assert centralized > 0.9, result.stdout
    assert abs(federated - centralized) <= 0.02, (
        f"federated {federated:.4f} vs centralized {centralized:.4f}\n{result.stdout}")
    # The per-round progress the README promises: a table row for each of the 10 rounds.
    assert re.search(r"^\s+10\s+3\s+0\.\d{4}", result.stdout, re.MULTILINE), result.stdout


def test_torch_example_learns(tmp_path):
    result = run_python(ROOT / "examples" / "torch_digits.py", "--rounds", "5", cwd=tmp_path,
                        timeout=BLOCK_TIMEOUT_S)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert _accuracy("federated", result.stdout) > 0.6, result.stdout


def test_personalised_example_beats_fedavg_on_label_skewed_hospitals(tmp_path):
    """20 hospitals, Dirichlet(0.1): FedPer and fine-tuning beat FedAvg on local test splits."""
    import json

    result = run_python(ROOT / "examples" / "personalised_digits.py", "--rounds", "5",
                        cwd=tmp_path, timeout=4 * BLOCK_TIMEOUT_S)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(0.0 < v <= 1.0 for v in scores.values()), scores
    assert scores["fedper"] > scores["fedavg"] + 0.1, scores
    assert scores["fedavg+fine-tune"] > scores["fedavg"] + 0.1, scores
