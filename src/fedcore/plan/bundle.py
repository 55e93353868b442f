"""PlanBundle: a plan class shipped as hashed source.

A plan class is shipped as Python source, never pickled. :meth:`PlanBundle.from_class`
collects the class's source (from a file or from a notebook cell), the imports it needs and
the helper functions, classes and constants it references from its own module, and writes them
into one ``plan.py``. The local modules or packages the plan names in
``TrainingPlan.helper_modules`` ship beside it, file by file (``helpers.py``,
``mypkg/__init__.py``...); a plan that imports a local module it does not ship is refused
here, before any node sees it (:mod:`fedcore.plan._modules`). Nodes approve and run a plan
by the SHA-256 of exactly the bundle's files as they will run: no normalisation, so two
sources that differ in any character (a trailing blank included) have different hashes.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import inspect
import linecache
import symtable
import sys
import textwrap
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedcore.errors import ConfigurationError, PlanError
from fedcore.plan import _modules
from fedcore.plan.base import TrainingPlan

__all__ = ["PlanBundle"]


_PLAN_FILE = "plan.py"
_HASH_VERSION = b"fedcore-plan-v2"
# Compiled plan sources by the SHA-256 of their bundle: the simulated nodes of a process
# that load one plan compile its source once (a code object is immutable; each node still
# runs it in a module of its own and gets a class of its own). A code object is kept once it
# ran to the end, so a bundle found here has imported what it imports in this process.
_COMPILED: dict[str, types.CodeType] = {}
_COMPILED_MAX = 64
# The source of each plan class inspect found, by (file, qualified name), with the lines of
# the file it was found in (linecache's list: a new one whenever the file changed). Before
# Python 3.13 inspect parses the whole file to find a class, milliseconds for each
# Experiment; a class of an unchanged file is found once per process.
_CLASS_SOURCES: dict[tuple[str, str], tuple[list[str], str]] = {}
_CLASS_SOURCES_MAX = 64


def _field(data: bytes) -> bytes:
    """``data`` with its length in front: no two sequences of fields encode alike."""
    return len(data).to_bytes(8, "big") + data


def _utf8(text: str) -> bytes:
    # surrogatepass: every str has one encoding, so distinct texts give distinct bytes.
    return text.encode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class PlanBundle:
    """A plan as shipped: source files, the entry class name and the backend it needs."""

    files: dict[str, str]
    entry: str
    backend: str
    _loaded: list[type] = field(default_factory=list, repr=False, compare=False)

    @property
    def sha256(self) -> str:
        """SHA-256 over exactly the files the node runs, the entry class and the backend.

        Each file's text is hashed as its UTF-8 bytes, unchanged (what :meth:`load`
        compiles), every field length-prefixed: any change to what runs changes the hash.
        """
        h = hashlib.sha256(_field(_HASH_VERSION) + _field(_utf8(self.entry))
                           + _field(_utf8(self.backend)) + len(self.files).to_bytes(8, "big"))
        for name in sorted(self.files):
            h.update(_field(_utf8(name)) + _field(_utf8(self.files[name])))
        return h.hexdigest()

    @property
    def source(self) -> str:
        """The main file's source, as an administrator reviews it."""
        return self.files[_PLAN_FILE]

    def to_wire(self) -> dict[str, Any]:
        """Plain data for a message or checkpoint."""
        return {"files": dict(self.files), "entry": self.entry, "backend": self.backend,
                "sha256": self.sha256}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> PlanBundle:
        """Rebuild a bundle; refuse it when its declared hash does not match its files."""
        try:
            files, entry, backend = data["files"], data["entry"], data["backend"]
        except (KeyError, TypeError) as exc:
            raise ConfigurationError(f"Malformed plan bundle: missing {exc}.") from exc
        if not (
            isinstance(files, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())
            and _PLAN_FILE in files
            and isinstance(entry, str)
            and isinstance(backend, str)
        ):
            raise ConfigurationError("Malformed plan bundle: expected text files with plan.py.")
        for name in files:
            _modules.check_file_name(name)
            if name != _PLAN_FILE:
                _modules.check_helper_name(name)
        bundle = cls(files=dict(files), entry=entry, backend=backend)
        declared = data.get("sha256")
        if declared is not None and declared != bundle.sha256:
            raise ConfigurationError(
                f"Plan bundle hash mismatch: declared {declared}, computed {bundle.sha256}."
            )
        return bundle

    @classmethod
    def from_class(cls, plan_class: type[TrainingPlan]) -> PlanBundle:
        """Package ``plan_class`` (defined in a file or a notebook cell) as source."""
        if not (isinstance(plan_class, type) and issubclass(plan_class, TrainingPlan)):
            raise ConfigurationError(
                f"Expected a TrainingPlan subclass. Received: {plan_class!r}"
            )
        if not plan_class.backend:
            raise ConfigurationError(
                f"{plan_class.__name__} does not name a backend: subclass a backend's plan, "
                "e.g. fedcore_sklearn.SklearnTrainingPlan or fedcore_torch.TorchTrainingPlan."
            )
        source = _Collector(plan_class).collect()
        files = {**_modules.module_files(tuple(plan_class.helper_modules)), _PLAN_FILE: source}
        missing = _modules.local_imports(files)
        if missing:
            listed = ", ".join(f"{name!r} ({where})" for name, where in sorted(missing.items()))
            names = tuple(sorted({*plan_class.helper_modules,
                                  *(m.split(".")[0] for m in missing)}))
            raise ConfigurationError(
                f"The plan {plan_class.__name__} imports local modules that the nodes do "
                f"not have: {listed}. Ship them with the plan: set `helper_modules = "
                f"{names!r}` on {plan_class.__name__} (every file is then shown to the "
                "nodes' administrators and covered by the plan's hash; name a module "
                "inside a package, e.g. 'pkg.helpers', to ship only that file).")
        return cls(files=files, entry=plan_class.__name__, backend=plan_class.backend)

    @property
    def helper_files(self) -> list[str]:
        """The names of the shipped files besides ``plan.py``."""
        return sorted(name for name in self.files if name != _PLAN_FILE)

    @property
    def ran_before(self) -> bool:
        """Whether this process ran these exact files to the end already (another load).

        Loading such a bundle again imports nothing new (what its code imports is imported
        already), so it takes microseconds: a caller may load it without moving off its
        thread. It still runs the code in a module of its own and returns a class of its own.
        """
        return bool(self._loaded) or self.sha256 in _COMPILED

    def load(self) -> type[TrainingPlan]:
        """Execute the bundle in a fresh module and return its plan class."""
        if self._loaded:
            return self._loaded[0]
        digest = self.sha256
        name = f"fedcore_plan_{digest[:16]}"
        filename = f"<fedcore plan {digest[:16]}>"
        source = self.files[_PLAN_FILE]
        module = types.ModuleType(name)
        module.__file__ = filename
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        sys.modules[name] = module
        try:
            _modules.install(digest, self.files)  # the helper modules, importable from text
            code = _COMPILED.get(digest)
            if code is None:
                code = compile(source, filename, "exec")
                exec(code, module.__dict__)
                if len(_COMPILED) >= _COMPILED_MAX:
                    _COMPILED.pop(next(iter(_COMPILED)), None)
                _COMPILED[digest] = code  # it ran to the end: its imports are done
            else:
                exec(code, module.__dict__)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise PlanError(
                f"The plan's source failed to load: {type(exc).__name__}: {exc}",
                exc_type=type(exc).__name__,
            ) from exc
        plan_class = module.__dict__.get(self.entry)
        if not (isinstance(plan_class, type) and issubclass(plan_class, TrainingPlan)):
            raise PlanError(f"The plan bundle defines no TrainingPlan named {self.entry!r}.")
        self._loaded.append(plan_class)
        return plan_class


class _Collector:
    """Gathers the source of a plan class and of everything it references by global name."""

    def __init__(self, plan_class: type[TrainingPlan]):
        self.root = plan_class
        self.module_name = plan_class.__module__
        self.globals = vars(sys.modules[self.module_name]) if self.module_name in sys.modules \
            else {}
        self.imports: dict[str, str] = {}
        self.constants: dict[str, str] = {}
        self.definitions: dict[str, str] = {}  # name -> source, in dependency order
        self.visiting: set[str] = set()

    def collect(self) -> str:
        self._define(self.root.__name__, self.root)
        parts = ["# Shipped by fedcore. Generated from the researcher's plan class.\n"]
        parts += [line + "\n" for line in self.root.dependencies]
        parts += sorted(set(self.imports.values()), key=lambda s: (not s.startswith("import"), s))
        parts += [f"{v}\n" for v in self.constants.values()]
        parts += [f"\n\n{src}" for src in self.definitions.values()]
        return "".join(parts)

    def _define(self, name: str, obj: Any) -> None:
        if name in self.definitions or name in self.visiting:
            return
        self.visiting.add(name)
        src = _object_source(obj)
        for ref in sorted(_free_names(src)):
            if ref != name:
                self._resolve(ref)
        self.definitions[name] = src
        self.visiting.discard(name)

    def _resolve(self, name: str) -> None:
        if name not in self.globals:
            return  # a builtin, or a local name inside a function
        obj = self.globals[name]
        if isinstance(obj, types.ModuleType):
            mod = obj.__name__
            self.imports[name] = f"import {mod}\n" if mod == name else f"import {mod} as {name}\n"
            return
        module = getattr(obj, "__module__", None)
        if isinstance(obj, (type, types.FunctionType)) and module in (self.module_name,
                                                                      "__main__"):
            self._define(name, obj)
            return
        if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)) and module:
            public = _public_module(obj, module)
            qual = getattr(obj, "__qualname__", name)
            if "." not in qual:
                alias = "" if qual == name else f" as {name}"
                self.imports[name] = f"from {public} import {qual}{alias}\n"
                return
        if _is_literal(obj):
            self.constants[name] = f"{name} = {obj!r}"
            return
        raise ConfigurationError(
            f"The plan {self.root.__name__} uses the global {name!r} "
            f"(a {type(obj).__name__}), which cannot be shipped as source. Define it inside "
            "the plan, pass it through model_args (a scikit-learn plan names such keys in "
            "plan_args), or import it in a module the nodes have."
        )


def _object_source(obj: Any) -> str:
    """Source of a class or function, from its file or from the notebook cell it came from."""
    try:
        return textwrap.dedent(_getsource(obj))
    except (OSError, TypeError):
        pass
    # Notebook classes (Python < 3.13 cannot find them): look for the cell through one of
    # the class's functions, else through the newest interactive cell defining that name.
    candidates: list[tuple[str, int | None]] = []
    for member in vars(obj).values() if isinstance(obj, type) else ():
        func = getattr(member, "__func__", member)
        func = getattr(func, "fget", func)
        code = getattr(func, "__code__", None)
        if code is not None:
            candidates.append((code.co_filename, code.co_firstlineno))
    candidates += [(name, None) for name in reversed(list(linecache.cache))
                   if name.startswith("<") or "ipykernel" in name]
    for filename, line in candidates:
        found = _class_in(filename, obj.__name__, line)
        if found is not None:
            return found
    raise ConfigurationError(
        f"Cannot find the source of {getattr(obj, '__qualname__', obj)!r}. Define the plan in "
        "a file or a notebook cell (not in exec or an interactive prompt), with at least one "
        "method."
    )


def _getsource(obj: Any) -> str:
    """``inspect.getsource(obj)``; a class's is kept per version of its file (above)."""
    file = inspect.getsourcefile(obj) if isinstance(obj, type) else None
    if not file:
        return inspect.getsource(obj)
    linecache.checkcache(file)
    lines = linecache.getlines(file)  # the list inspect reads too, while the file is unchanged
    key = (file, obj.__qualname__)
    kept = _CLASS_SOURCES.get(key)
    if kept is not None and lines and kept[0] is lines:
        return kept[1]
    source = inspect.getsource(obj)
    entry: tuple[Any, ...] = linecache.cache.get(file, ())
    if lines and len(entry) > 2 and entry[2] is lines:  # found in these very lines
        if len(_CLASS_SOURCES) >= _CLASS_SOURCES_MAX:
            _CLASS_SOURCES.pop(next(iter(_CLASS_SOURCES)), None)
        _CLASS_SOURCES[key] = (lines, source)
    return source


def _class_in(filename: str, name: str, line: int | None) -> str | None:
    lines = linecache.getlines(filename)
    if not lines:
        return None
    try:
        tree = ast.parse("".join(lines))
    except SyntaxError:
        return None
    found = None
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == name and (
            line is None or node.lineno <= line <= (node.end_lineno or 0)
        ):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            found = textwrap.dedent("".join(lines[start - 1 : node.end_lineno]))
    return found


def _free_names(src: str) -> set[str]:
    """Global names ``src`` reads: not builtins, not locals of its functions."""
    names: set[str] = set()

    def walk(table: symtable.SymbolTable, top: bool) -> None:
        for sym in table.get_symbols():
            if not sym.is_referenced():
                continue
            if (top and not sym.is_assigned() and not sym.is_imported()) or (
                not top and sym.is_global()
            ):
                names.add(sym.get_name())
        for child in table.get_children():
            walk(child, False)

    walk(symtable.symtable(src, "<plan>", "exec"), True)
    return {n for n in names if not hasattr(builtins, n)}


def _public_module(obj: Any, module: str) -> str:
    """The shortest importable parent module that exposes ``obj`` under the same name."""
    parts = module.split(".")
    name = getattr(obj, "__name__", None)
    for i in range(1, len(parts)):
        candidate = ".".join(parts[:i])
        mod = sys.modules.get(candidate)
        if mod is not None and name and getattr(mod, name, None) is obj:
            return candidate
    return module


def _is_literal(obj: Any) -> bool:
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return True
    if isinstance(obj, (list, tuple, frozenset, set)):
        return all(_is_literal(x) for x in obj)
    if isinstance(obj, dict):
        return all(_is_literal(k) and _is_literal(v) for k, v in obj.items())
    return False
