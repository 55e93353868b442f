"""The core imports no ML framework (DESIGN: a test blocks them and imports every module)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_core_modules_import_without_ml_frameworks():
    script = textwrap.dedent(
        """
        import importlib, importlib.abc, pkgutil, sys

        BLOCKED = ("torch", "tensorflow", "jax", "sklearn", "keras")

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {name}")
                return None

        sys.meta_path.insert(0, Block())
        import fedcore
        names = [m.name for m in pkgutil.walk_packages(fedcore.__path__, "fedcore.")]
        for name in names:
            importlib.import_module(name)
        import fedcore_transport.inprocess
        leaked = [n for n in BLOCKED if n in sys.modules]
        assert not leaked, leaked
        print(len(names))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 15  # every core module was really imported


def test_missing_backend_names_the_extra_to_install():
    script = textwrap.dedent(
        """
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch":
                    raise ImportError("No module named 'torch'")
                return None

        sys.meta_path.insert(0, Block())
        from fedcore import plugins
        from fedcore.errors import ConfigurationError
        try:
            plugins.load("backends", "torch")
        except ConfigurationError as exc:
            print(exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert 'pip install -c constraints.txt ".[torch]"' in out.stdout, out.stdout + out.stderr


def _python(script: str) -> list[str]:
    """The lines a fresh interpreter prints running ``script`` (dedented); it must succeed."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


def test_a_node_reaches_its_connection_without_the_researcher_side_or_pandas(tmp_path):
    # What `fedcore-node start` does before it dials: the CLI, the home, its datasets, the
    # transport. Importing the simulator, the researcher side or pandas there cost every node
    # process ~0.2 s of CPU (~1 s on a loaded machine) before it could connect.
    from fedcore_node.cli import main

    csv = tmp_path / "cohort.csv"
    csv.write_text("x0,x1,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(20)))
    home = str(tmp_path / "home")
    for argv in (["init", "--id", "site-a"],
                 ["dataset", "add", "--name", "c", "--tags", "t", "--path", str(csv)]):
        assert main(["--home", home, *argv]) == 0
    lines = _python(
        f"""
        import sys
        from fedcore_node.cli import _open, main
        from fedcore.transport import open_transport

        assert main(["--home", {home!r}, "status", "--json"]) == 0
        node = _open({home!r})
        node.datasets.list()
        open_transport("ws://127.0.0.1:9", role="node", identity=node.node_id)
        unused = ("pandas", "fedcore.simulate", "fedcore.researcher", "sklearn", "torch")
        print(sorted(n for n in unused if n in sys.modules))
        """
    )
    assert lines[-1] == "[]"


def test_a_plan_worker_starts_without_the_node_loop_or_pandas():
    # A plan worker's start is part of the first round after a node starts: it imports the
    # round's executor and the dataset registry, not the node's message loop, the researcher
    # side or pandas (a CSV dataset's worker imports pandas when it opens the file).
    lines = _python(
        """
        import sys
        import fedcore.node._sandbox
        unused = ("pandas", "fedcore.node.node", "fedcore.researcher", "fedcore.simulate",
                  "asyncio")
        print(sorted(n for n in unused if n in sys.modules))
        """
    )
    assert lines[-1] == "[]"


def test_fedcores_submodules_are_attributes_after_import_fedcore():
    # Names load on first use, and so do submodules: `import fedcore` then
    # `fedcore.plugins.register(...)` (docs/plugins.md) works as it did with eager imports.
    lines = _python(
        """
        import sys
        import fedcore
        assert "fedcore.plugins" not in sys.modules and "pandas" not in sys.modules
        print(fedcore.plugins.register.__module__, fedcore.secagg.PairwiseMasking.__name__)
        try:
            fedcore.no_such_module
        except AttributeError as exc:
            print(exc)
        """
    )
    assert lines == [
        "fedcore.plugins PairwiseMasking",
        "module 'fedcore' has no attribute 'no_such_module'"]
