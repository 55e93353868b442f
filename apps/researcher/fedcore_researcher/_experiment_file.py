"""Experiment files: a TOML description or a Python file, turned into an ``Experiment``.

A TOML file names a plan class and the experiment's settings; a Python file defines a
module-level ``experiment`` or a function ``make_experiment()`` that returns one (or yields
one, to clean up after the run: a simulated federation, for instance).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import inspect
import sys
import tomllib
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedcore import Experiment, TrainingPlan, plugins
from fedcore.aggregators import Aggregator
from fedcore.errors import ConfigurationError, FedcoreError
from fedcore.privacy.spec import PrivacySpec
from fedcore.researcher import strategies
from fedcore.secagg import SecureAggregation

MINIMAL_TOML = """\
  plan = "plans.py:Plan"              # a file next to this one, or "package.module:Class"
  tags = ["diabetes"]                 # the datasets to train on
  federation = "ws://0.0.0.0:8765"    # or pass --federation URL
  rounds = 5                          # or pass --rounds N"""

# key -> (accepted types, what it is)
KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "plan": (str, '"plans.py:ClassName" or "package.module:ClassName"'),
    "tags": ((list, str), "a list of dataset tags"),
    "federation": (str, "a URL: ws://HOST:PORT, wss://..., mqtt://BROKER/NAME"),
    "rounds": (int, "the total number of rounds"),
    "name": (str, "a name for the progress bar and the checkpoints"),
    "nodes": (list, "the node ids to wait for and train on"),
    "seed": (int, "the seed of model initialisation and data splits"),
    "test_ratio": ((float, int), "the fraction of each node's data held out"),
    "timeout": ((float, int), "seconds a round waits for the nodes"),
    "connect_timeout": ((float, int), "seconds to wait for the nodes to connect"),
    "evaluate_global": (bool, "evaluate the global model on each node"),
    "evaluate_local": (bool, "evaluate the nodes' updates"),
    "checkpoint_dir": (str, "a folder receiving one checkpoint per round"),
    "identity": (str, "the researcher's key file"),
    "enrolled": (str, "the nodes.toml of enrolled nodes"),
    "model_args": (dict, "a table of the plan's model arguments"),
    "training_args": (dict, "a table of training arguments"),
    "aggregator": ((str, dict), 'a name ("fedavg") or a table with name and parameters'),
    "strategy": ((str, dict), 'a name ("AllNodes", "Fraction") or a table with name and '
                 'parameters'),
    "secagg": ((str, dict), 'a scheme name ("masking", "joye-libert") or a table with name '
               'and parameters'),
    "privacy": (dict, 'a table: mechanism = "update" or "dp-sgd", clip, noise_multiplier, '
                'delta'),
}
REQUIRED = ("plan", "tags")
_PATHS = ("checkpoint_dir", "identity", "enrolled")  # relative to the TOML file's folder
_PASSED = ("name", "nodes", "seed", "test_ratio", "timeout", "connect_timeout",
           "evaluate_global", "evaluate_local", "identity", "enrolled", "model_args",
           "training_args")


def read_toml(path: Path) -> dict[str, Any]:
    """The checked content of a TOML experiment file (paths resolved, nothing imported)."""
    try:
        with open(path, "rb") as f:
            desc = tomllib.load(f)
    except OSError as exc:
        raise ConfigurationError(f"Cannot read {path}: {exc.strerror or exc}.") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path} is not valid TOML: {exc}.") from exc
    for key in desc:
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigurationError(f"{path}: unknown key {key!r}.{hint} Keys: "
                                     f"{', '.join(KEYS)}. See `fedcore run --help`.")
    for key in REQUIRED:
        if key not in desc:
            raise ConfigurationError(
                f"{path}: missing key {key!r} ({KEYS[key][1]}). A minimal experiment "
                f"file:\n\n{MINIMAL_TOML}\n\nSee `fedcore run --help` for every key.")
    for key, value in desc.items():
        types, what = KEYS[key]
        if not isinstance(value, types) or (isinstance(value, bool) and types is int):
            raise ConfigurationError(f"{path}: {key} should be {what}. Received: {value!r} "
                                     f"({type(value).__name__}).")
    if isinstance(desc["tags"], str):
        desc["tags"] = [desc["tags"]]
    base = path.resolve().parent
    for key in _PATHS:
        if key in desc:
            desc[key] = str(resolve(base, desc[key]))
    return desc


def resolve(base: Path, value: str) -> Path:
    """``value`` with ``~`` expanded, relative to ``base`` unless absolute."""
    given = Path(value).expanduser()
    return given if given.is_absolute() else base / given


def aggregator_from(value: str | dict[str, Any], where: str) -> Aggregator:
    """An aggregator from its registry name, or a table ``{name = ..., param = ...}``."""
    return _plugin_from("aggregators", "aggregator", "fedavg", value, where,
                        errors=(TypeError,))  # type: ignore[no-any-return]


def strategy_from(value: str | dict[str, Any], where: str) -> strategies.Strategy:
    """A strategy of :mod:`fedcore.researcher.strategies` from ``{name = "Fraction", ...}``."""
    known = {n: getattr(strategies, n) for n in strategies.__all__ if n != "Strategy"}
    params = dict(value) if isinstance(value, dict) else {}
    name = params.pop("name", None) if isinstance(value, dict) else value
    if name is None:
        raise ConfigurationError(f'{where}: the [strategy] table needs name = "AllNodes" (or '
                                 f"another of {', '.join(known)}).")
    if name not in known:
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigurationError(f"{where}: unknown strategy {name!r}.{hint} Expected "
                                 f"[strategy] name = one of {', '.join(known)}.")
    try:
        return known[name](**params)  # type: ignore[no-any-return]
    except TypeError as exc:
        raise ConfigurationError(f"{where}: strategy {name} does not take these parameters "
                                 f"({exc}). It takes: {_signature(known[name])}.") from exc


def secagg_from(value: str | dict[str, Any], where: str) -> SecureAggregation:
    """A secure-aggregation scheme from its registry name, or ``{name = ..., param = ...}``."""
    return _plugin_from("secagg", "secagg", "masking", value, where,
                        errors=(TypeError, ValueError, ConfigurationError))  # type: ignore[no-any-return]


def _plugin_from(group: str, table: str, example: str, value: str | dict[str, Any],
                 where: str, *, errors: tuple[type[Exception], ...]) -> Any:
    """A plug-in of ``group`` built from its name, or from a ``[table]`` of name and params."""
    params = dict(value) if isinstance(value, dict) else {}
    name = params.pop("name", None) if isinstance(value, dict) else value
    if not isinstance(name, str):
        raise ConfigurationError(f'{where}: the [{table}] table needs name = "{example}" (or '
                                 f"another of {', '.join(plugins.available(group))}).")
    try:
        cls = plugins.load(group, name)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}: {table}: {exc}") from exc
    try:
        return cls(**params)
    except errors as exc:
        raise ConfigurationError(f"{where}: {table} {name!r} does not take these "
                                 f"parameters ({exc}). It takes: "
                                 f"{_signature(cls)}.") from exc


def privacy_from(table: dict[str, Any], where: str) -> dict[str, Any]:
    """The ``[privacy]`` table, checked as ``Experiment(privacy=...)`` checks it."""
    try:
        spec = PrivacySpec.parse(table)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}: [privacy]: {exc}") from exc
    return {} if spec is None else spec.to_dict()


def _signature(cls: type) -> str:
    try:
        return str(inspect.signature(cls))
    except (TypeError, ValueError):
        return "see its documentation"


def load_plan(spec: str, base: Path, where: str) -> type[TrainingPlan]:
    """The class named by ``"file.py:Class"`` (relative to ``base``) or ``"module:Class"``."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigurationError(f"{where}: plan should be \"plans.py:ClassName\" or "
                                 f"\"package.module:ClassName\". Received: {spec!r}")
    if target.endswith(".py") or "/" in target or "\\" in target:
        file = resolve(base, target)
        if not file.is_file():
            raise ConfigurationError(f"{where}: plan file {file} not found.")
        module = import_file(file, f"fedcore_plans_{_identifier(file.stem)}")
    else:
        module = _user_code(f"import {target}", lambda: _import(target, base))
    plan = getattr(module, attr, None)
    if not (isinstance(plan, type) and issubclass(plan, TrainingPlan)):
        found = sorted(n for n, v in vars(module).items()
                       if isinstance(v, type) and issubclass(v, TrainingPlan)
                       and v.__module__ == module.__name__)
        raise ConfigurationError(f"{where}: {target} has no TrainingPlan class {attr!r}. "
                                 f"Plan classes there: {', '.join(found) or 'none'}.")
    return plan


def _import(name: str, base: Path) -> Any:
    sys.path.insert(0, str(base))
    try:
        return importlib.import_module(name)
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(base))


def _identifier(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def import_file(file: Path, name: str) -> Any:
    """Import a Python file as module ``name`` (kept in ``sys.modules``: plans ship source)."""
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ConfigurationError(f"Cannot import {file}: not a Python file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(file.parent))  # its siblings import as in `python FILE`
    try:
        _user_code(f"importing {file}", lambda: spec.loader.exec_module(module))  # type: ignore[union-attr]
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(file.parent))
    return module


def _user_code(what: str, call: Callable[[], Any]) -> Any:
    """Run the researcher's code; its exceptions become one readable line (where, what)."""
    try:
        return call()
    except (FedcoreError, KeyboardInterrupt):
        raise
    except Exception as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        mine = [f for f in frames if "importlib" not in f.filename
                and "fedcore_researcher" not in f.filename]
        at = f" ({mine[-1].filename}, line {mine[-1].lineno})" if mine else ""
        if isinstance(exc, SyntaxError):  # its message names the file and line already
            at = ""
        raise ConfigurationError(f"{what} failed: {type(exc).__name__}: {exc}{at}") from exc


def from_toml(path: Path, *, federation: str | None, rounds: int | None) -> Experiment:
    """Build the experiment a TOML file describes (command-line values win)."""
    desc = read_toml(path)
    if federation is None and "federation" not in desc:
        raise ConfigurationError(f"{path}: no federation: add federation = \"ws://HOST:PORT\" "
                                 "or pass --federation URL.")
    where = str(path)
    aggregator = aggregator_from(desc.get("aggregator", "fedavg"), where)
    strategy = strategy_from(desc["strategy"], where) if "strategy" in desc else None
    secagg = secagg_from(desc["secagg"], where) if "secagg" in desc else None
    privacy = privacy_from(desc["privacy"], where) if "privacy" in desc else None
    plan = load_plan(desc["plan"], path.resolve().parent, where)
    kwargs = {k: desc[k] for k in _PASSED if k in desc}
    try:
        return Experiment(plan, tags=desc["tags"], federation=federation or desc["federation"],
                          aggregator=aggregator, strategy=strategy, secagg=secagg,
                          privacy=privacy,
                          round_limit=rounds if rounds is not None else desc.get("rounds"),
                          checkpoint_dir=desc.get("checkpoint_dir"), **kwargs)
    except ConfigurationError as exc:  # settings that do not go together, e.g. secagg
        raise ConfigurationError(f"{where}: {exc}") from exc  # with a robust aggregator


@contextlib.contextmanager
def from_python(path: Path) -> Iterator[Experiment]:
    """The experiment of a Python file: ``experiment``, or ``make_experiment()``'s result.

    A generator ``make_experiment()`` is resumed after the run, so that its ``with`` blocks
    (a simulated federation, say) close.
    """
    module = import_file(path, f"fedcore_experiment_{_identifier(path.stem)}")
    make = getattr(module, "make_experiment", None)
    given = getattr(module, "experiment", None)
    if make is not None and given is not None:
        raise ConfigurationError(f"{path} defines both `experiment` and `make_experiment`: "
                                 "keep one.")
    if make is None and given is None:
        raise ConfigurationError(
            f"{path} defines neither `experiment` (an Experiment) nor `make_experiment()`. "
            "Add, for example:\n\n  def make_experiment():\n      return fedcore.Experiment("
            "Plan, tags=[...], federation=..., round_limit=5)")
    if make is not None and not callable(make):
        raise ConfigurationError(f"{path}: make_experiment should be a function. Received: "
                                 f"{type(make).__name__}")
    made = _user_code(f"{path}: make_experiment()", make) if make is not None else given
    gen = made if inspect.isgenerator(made) else None
    exp = _user_code(f"{path}: make_experiment()", lambda: next(gen)) if gen else made
    if not isinstance(exp, Experiment):
        raise ConfigurationError(
            f"{path}: expected {'make_experiment() to return' if make else '`experiment` to be'}"
            f" a fedcore.Experiment. Received: {type(exp).__name__}")
    try:
        yield exp
    finally:
        if gen is not None:
            with contextlib.suppress(StopIteration):
                next(gen)


@contextlib.contextmanager
def open_experiment(file: str, *, federation: str | None = None, rounds: int | None = None
                    ) -> Iterator[Experiment]:
    """The experiment of a TOML or Python file, closed on the way out."""
    path = Path(file)
    if not path.is_file():
        raise ConfigurationError(f"No experiment file at {path}" + (
            " (it is a folder)." if path.is_dir() else "."))
    if path.suffix == ".py":
        with from_python(path) as exp:
            try:
                if federation is not None:
                    exp.federation = federation
                if rounds is not None:
                    exp.round_limit = rounds
                yield exp
            finally:
                exp.close()
        return
    if path.suffix != ".toml":
        raise ConfigurationError(f"Expected a .toml or .py experiment file. Received: {path}")
    exp = from_toml(path, federation=federation, rounds=rounds)
    try:
        yield exp
    finally:
        exp.close()
