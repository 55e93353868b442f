"""The install lines of docs/deployment.md ("Installing") work as written, offline: the
documented `python -m pip wheel --no-deps . -w dist` builds a wheel (from a copy of the
tracked files, without build isolation so that nothing is downloaded), whose metadata
offers the documented extras and the commands, and which installs into a fresh virtual
environment where `fedcore` and `fedcore-node` run from the wheel, not from this tree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "deployment.md"
EXTRAS = {"net", "sklearn", "torch", "tf", "jax", "dp", "gui", "images", "plot", "tensorboard",
          "secagg-fast"}


def _installing() -> str:
    found = re.search(r"## Installing\n(.*?)\n## ", DOC.read_text(), re.S)
    assert found, "docs/deployment.md lost its Installing section"
    return found.group(1)


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"$ {' '.join(map(str, args))}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the repository's files, as a fresh checkout has them."""
    source = tmp_path_factory.mktemp("checkout")
    files = _run("git", "ls-files", "-co", "--exclude-standard", cwd=ROOT).stdout.split("\n")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    return source


@pytest.fixture(scope="module")
def wheel(checkout) -> Path:
    """The wheel the documented command builds, from a copy of the tracked files."""
    section = _installing()
    assert "python -m pip wheel --no-deps . -w dist" in section
    source = checkout
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", ".",
         "-w", "dist", cwd=source)
    [built] = (source / "dist").glob("fedcore-*.whl")
    assert built.name in section, f"the docs name another wheel than {built.name}"
    return built


def test_the_documented_install_lines_use_the_constraints_and_no_index_name():
    section = _installing()
    lines = [ln for ln in section.splitlines() if "pip install" in ln]
    assert lines and all("-c constraints.txt" in ln for ln in lines)
    assert all('"fedcore[' not in ln or "@ file://" in ln for ln in lines), \
        "a bare fedcore[...] install finds no package: fedcore is not on PyPI"
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    stale = [p.name for p in pages if 'pip install "fedcore[net,sklearn]"' in p.read_text()]
    assert not stale, f"the install line that finds no package is still in {stale}"


def test_the_wheel_offers_the_extras_and_the_commands(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(n for n in names
                                   if n.endswith(".dist-info/entry_points.txt"))).decode()
    extras = set(re.findall(r"^Provides-Extra: (\S+)", meta, re.M))
    assert EXTRAS <= extras, EXTRAS - extras
    assert re.search(r"^Requires-Dist: websockets.*extra == \"net\"", meta, re.M)
    assert "fedcore = fedcore_researcher.cli:main" in entry_points
    assert "fedcore-node = fedcore_node._launch:main" in entry_points
    for group in ("fedcore.backends", "fedcore.transports", "fedcore.aggregators",
                  "fedcore.secagg"):
        assert f"[{group}]" in entry_points
    for module in ("fedcore/__init__.py", "fedcore_node/cli.py", "fedcore_node/_init.py",
                   "fedcore_researcher/_plans.py", "fedcore_transport/mqtt.py"):
        assert module in names, module
    assert any(n.startswith("fedcore_node/gui/templates/") for n in names)


@pytest.mark.parametrize("how", ["wheel", "checkout"])
def test_an_install_runs_its_commands(how, request, tmp_path):
    """`pip install ... WHEEL` and `pip install ... .` (in the checkout), as documented."""
    assert {"wheel": "dist/fedcore-", "checkout": '".[net,sklearn]"'}[how] in _installing()
    target = request.getfixturevalue(how)
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    # The dependencies come from this environment's site-packages (nothing is downloaded);
    # fedcore itself only from the wheel (this environment's editable install is not seen).
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                     cwd=tmp_path).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
         "--no-index", "--no-build-isolation", target, cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = _run(python, "-c", "import fedcore, fedcore_node; print(fedcore.__file__); "
                 "print(fedcore_node.__file__)", cwd=tmp_path, env=env).stdout.split()
    assert all(Path(w).is_relative_to(venv) for w in where), where
    version = _run(venv / "bin" / "fedcore", "--version", cwd=tmp_path, env=env).stdout
    assert version.strip() == "fedcore 0.1.0"
    init = _run(venv / "bin" / "fedcore-node", "--home", tmp_path / "home", "init", "--id",
                "site-a", cwd=tmp_path, env=env).stdout
    assert init.strip().splitlines()[-1].startswith("fedcore enroll site-a ")
