"""A plan's helper modules: which imports are local, their files, importing them on a node.

A *local* module is one the nodes cannot be expected to have: importable here from a
source file that no installed distribution provides (a sibling ``helpers.py``, a package in
the researcher's project folder). Standard-library modules, installed distributions and
fedcore's own packages are not local. A plan ships its local modules by naming them in
``TrainingPlan.helper_modules``; :func:`module_files` reads their files and
:func:`local_imports` finds the local modules a shipped text imports, so that a plan that
forgets one is refused before it reaches a node.

On the node, :func:`install` makes a bundle's modules importable from its text (an import
hook in front of ``sys.meta_path``): nothing is written to disk, so the plan worker's file
rules need not change.
"""

from __future__ import annotations

import ast
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import linecache
import os
import re
import sys
import sysconfig
import types
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

from fedcore.errors import ConfigurationError

__all__ = ["check_file_name", "check_helper_name", "install", "is_local", "local_imports",
           "module_files", "module_of"]

_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_FILES = 256
_MAX_BYTES = 16 * 1024 * 1024


def check_file_name(name: str) -> None:
    """Refuse a bundle file name that is not ``a/b/c.py`` made of Python identifiers."""
    parts = name.split("/")
    if not (name.endswith(".py") and all(_PART.fullmatch(p) for p in
                                         [*parts[:-1], parts[-1][:-3]])):
        raise ConfigurationError(
            f"Malformed plan bundle: expected file names like 'plan.py' or "
            f"'package/module.py' (identifiers separated by '/'). Received: {name!r}")


def check_helper_name(name: str) -> None:
    """Refuse a helper file that would shadow the stdlib, fedcore or an installed package.

    The bundle's modules are found before the installed ones.
    """
    top = module_of(name)[0].split(".")[0]
    if (top in sys.stdlib_module_names or top in sys.builtin_module_names
            or top.startswith("fedcore") or top in _installed_tops()):
        raise ConfigurationError(
            f"Malformed plan bundle: its file {name!r} would replace the installed module "
            f"{top!r}. A plan ships only its own modules; rename it.")


def module_of(name: str) -> tuple[str, bool]:
    """The module a bundle file defines and whether it is a package (``a/__init__.py``)."""
    parts = name[:-3].split("/")
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


@lru_cache(maxsize=1)
def _installed_tops() -> frozenset[str]:
    return frozenset(importlib.metadata.packages_distributions())


@lru_cache(maxsize=1)
def _installed_folders() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple(os.path.realpath(paths[k]) for k in ("purelib", "platlib", "stdlib",
                                                      "platstdlib") if k in paths)


def _origin(name: str) -> str | None:
    """The source file or package folder of module ``name`` (``None``: none)."""
    module = sys.modules.get(name)
    try:
        spec = module.__spec__ if module is not None else importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        locations = list(getattr(spec, "submodule_search_locations", None) or ())
        return locations[0] if locations else None
    origin = str(spec.origin)
    return os.path.dirname(origin) if spec.submodule_search_locations else origin


def is_local(module: str) -> bool:
    """True when ``module``'s top-level package is researcher code the nodes do not have."""
    top = module.split(".")[0]
    if (not top or top in sys.stdlib_module_names or top in sys.builtin_module_names
            or top.startswith("fedcore")):
        return False
    origin = _origin(top)
    if origin is None or not (origin.endswith(".py") or os.path.isdir(origin)):
        return False  # not importable here (a node may install it), or compiled
    real = os.path.realpath(origin)
    if any(os.path.commonpath([real, f]) == f for f in _installed_folders()):
        return False
    # Last: listing the installed distributions' files costs 0.3 to 1 s, once per process
    # (paid at the first Experiment), and only a module outside the installed folders (an
    # editable install) needs it.
    return top not in _installed_tops()


def module_files(names: Sequence[str]) -> dict[str, str]:
    """The source files of local modules or packages ``names``, keyed by bundle file name.

    A package ships every ``.py`` file under its folder; a module inside a package
    (``"tests._support.plans"``) ships its file and its parents' ``__init__.py``.
    """
    files: dict[str, str] = {}
    for name in names:
        if not (isinstance(name, str) and all(_PART.fullmatch(p) for p in name.split("."))):
            raise ConfigurationError(
                f"Expected helper_modules to list module names such as 'helpers' or "
                f"'mypkg'. Received: {name!r}")
        top = name.split(".")[0]
        if not is_local(top):
            raise ConfigurationError(
                f"helper_modules lists {name!r}, which is not a local module here (it is "
                "not importable from a source file, or it comes from the standard library "
                "or an installed distribution). List only your own modules; the nodes' "
                "administrators install the others.")
        origin = _origin(name)
        if origin is None:
            raise ConfigurationError(f"helper_modules lists {name!r}, which cannot be "
                                     "imported here.")
        root = Path(_origin(top) or origin)
        base = root.parent
        parts = name.split(".")
        for i in range(1, len(parts)):  # the parent packages' __init__.py
            init = base.joinpath(*parts[:i], "__init__.py")
            if init.is_file():
                files[init.relative_to(base).as_posix()] = _read(init)
        if os.path.isdir(origin):
            for path in sorted(Path(origin).rglob("*.py")):
                rel = path.relative_to(base).as_posix()
                if "__pycache__" not in rel:
                    files[rel] = _read(path)
        else:
            files[Path(origin).relative_to(base).as_posix()] = _read(Path(origin))
    if len(files) > _MAX_FILES or sum(len(t) for t in files.values()) > _MAX_BYTES:
        raise ConfigurationError(
            f"The plan's helper modules hold {len(files)} files: ship at most {_MAX_FILES} "
            f"files and {_MAX_BYTES // 2**20} MiB of source (name a module inside a large "
            "package rather than the package).")
    for rel in files:
        check_file_name(rel)
    return files


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", "surrogateescape")
    except OSError as exc:
        raise ConfigurationError(f"Cannot read the helper module {path}: {exc}") from exc


def imported_modules(text: str, package: str = "") -> set[str]:
    """The absolute names of the modules ``text`` imports, relative ones resolved in ``package``.

    A syntax error gives none (loading the plan reports it).
    """
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return set()
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join([*base, *([node.module] if node.module else [])]))
            elif node.module:
                found.add(node.module)
    return found


def local_imports(files: Mapping[str, str]) -> dict[str, str]:
    """Local modules the files import that the files do not provide: module -> its file."""
    shipped = {module_of(name)[0] for name in files if name != "plan.py"}
    missing: dict[str, str] = {}
    for name, text in files.items():
        module, is_pkg = module_of(name)
        package = module if is_pkg else module.rpartition(".")[0]
        for imported in imported_modules(text, package if name != "plan.py" else ""):
            if imported not in shipped and is_local(imported.split(".")[0]):
                missing[imported] = _origin(imported) or "?"
    return missing


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the modules of installed bundles from their text."""

    def __init__(self) -> None:
        self.modules: dict[str, tuple[str, str, bool]] = {}  # name -> (owner, text, is_pkg)

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: types.ModuleType | None = None,
                  ) -> importlib.machinery.ModuleSpec | None:
        found = self.modules.get(fullname)
        if found is None:
            return None
        owner, _, is_pkg = found
        spec = importlib.machinery.ModuleSpec(fullname, self, origin=_filename(owner, fullname),
                                              is_package=is_pkg)
        if is_pkg:
            spec.submodule_search_locations = []
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        owner, text, _ = self.modules[module.__name__]
        filename = _filename(owner, module.__name__)
        module.__file__ = filename
        module.__dict__["__fedcore_bundle__"] = owner
        linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
        exec(compile(text, filename, "exec"), module.__dict__)


def _filename(owner: str, module: str) -> str:
    return f"<fedcore plan {owner[:16]} {module}>"


_FINDER = _Finder()


def install(owner: str, files: Mapping[str, str]) -> Iterable[str]:
    """Make the helper modules of the bundle ``owner`` (its SHA-256) importable.

    A module of the same name imported from another bundle is forgotten, so that this
    bundle's plan imports its own version; one imported from this process's own files (the
    researcher's, in a simulation run in one process) stays. Returns the module names.
    """
    names = []
    for name, text in files.items():
        if name == "plan.py":
            continue
        module, is_pkg = module_of(name)
        _FINDER.modules[module] = (owner, text, is_pkg)
        names.append(module)
    for module in names:
        loaded = sys.modules.get(module)
        previous = getattr(loaded, "__fedcore_bundle__", None)
        if previous is not None and previous != owner:
            del sys.modules[module]
    if names and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    return names
