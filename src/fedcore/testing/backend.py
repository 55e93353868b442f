"""The backend conformance suite: the same tests for every training-plan backend.

Subclass :class:`BackendConformance` in a test module (its name must start with ``Test``)
and set ``plan_class`` to a small plan of the backend, and ``failing_plan_class`` to the
same plan whose training raises ``RuntimeError(FAILURE)``. Both must be defined at the top
level of a module (plans are shipped to nodes as source, and one test imports them in a
fresh process). The default data is a small 3-class problem with 8 features; override
:meth:`BackendConformance.arrays` to change it. A known gap is declared, never skipped::

    class TestMyBackend(BackendConformance):
        plan_class = TinyPlan
        failing_plan_class = FailingTinyPlan

        @pytest.mark.xfail(reason="the model keeps random state outside its weights",
                           strict=True)
        def test_training_is_reproducible(self):
            super().test_training_is_reproducible()

:func:`check_signature_parity` compares the public API of several backends' plan classes
(the parity test in the style of Keras' backend-consistency test).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
import pytest

from fedcore.data import ArrayDataset
from fedcore.errors import ConfigurationError, RoundError
from fedcore.params import ParameterSet
from fedcore.plan import TrainingPlan
from fedcore.plan.metrics import evaluate

__all__ = ["FAILURE", "BackendConformance", "check_signature_parity", "public_api"]

#: The message a ``failing_plan_class`` raises inside training.
FAILURE = "conformance: this plan fails inside training"


class BackendConformance:
    """Tests every backend's training plan passes. Subclasses set the two plan classes."""

    #: A small plan of the backend (3 classes, 8 features by default).
    plan_class: ClassVar[type[TrainingPlan]]
    #: The same plan, raising ``RuntimeError(FAILURE)`` inside :meth:`TrainingPlan.fit`.
    failing_plan_class: ClassVar[type[TrainingPlan]]
    model_args: ClassVar[dict[str, Any]] = {}
    training_args: ClassVar[dict[str, Any]] = {"epochs": 2, "batch_size": 8, "lr": 0.1}
    #: Seconds the fresh process of :meth:`test_parameter_names_are_stable_across_processes`
    #: may take (it imports the framework).
    subprocess_timeout: float = 180.0

    # --- data and plans ----------------------------------------------------------------------

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(X, y)`` to train and evaluate on: 60 samples, 8 features, 3 classes."""
        rng = np.random.default_rng(0)
        y = np.arange(60) % 3
        X = rng.normal(size=(60, 8)) + y[:, None] * 0.5
        return X, y

    def dataset(self) -> ArrayDataset:
        """The node's dataset."""
        return ArrayDataset(*self.arrays())

    def data_info(self) -> dict[str, Any]:
        """The federation's merged metadata, as the Experiment sends it."""
        return dict(self.dataset().metadata())

    def make_plan(self, seed: int = 0, plan_class: type[TrainingPlan] | None = None
                  ) -> TrainingPlan:
        """A built plan."""
        plan = (plan_class or self.plan_class)(self.model_args, self.training_args,
                                               self.data_info())
        plan.build(seed=seed)
        return plan

    # --- the suite ---------------------------------------------------------------------------

    def test_parameters_round_trip_exactly(self) -> None:
        """Read, loaded into another build and read again: same names, dtypes, values."""
        source = self.make_plan(seed=0)
        sent = source.get_parameters().copy()
        assert len(sent) > 0
        target = self.make_plan(seed=1)
        target.set_parameters(sent)
        got = target.get_parameters()
        assert list(got) == list(sent)
        for name, array in sent.items():
            assert got[name].dtype == array.dtype, name
            assert got[name].shape == array.shape, name
        assert got.equal(sent)

    def test_set_then_get_is_the_identity(self) -> None:
        """Arbitrary values (read-only, as received in a frame) come back bit for bit."""
        plan = self.make_plan(seed=0)
        rng = np.random.default_rng(7)
        values = {}
        for name, array in plan.get_parameters().items():
            if array.dtype.kind == "f":
                new = rng.normal(size=array.shape).astype(array.dtype)
            else:
                new = rng.integers(0, 100, size=array.shape).astype(array.dtype)
            new.flags.writeable = False
            values[name] = new
        received = ParameterSet(values)
        before = received.copy()
        plan.set_parameters(received)
        assert plan.get_parameters().equal(received)
        plan.fit(self.dataset(), seed=0)
        assert received.equal(before)  # training never writes the received arrays

    def test_set_parameters_keeps_its_own_copy(self) -> None:
        """Arrays changed after ``set_parameters`` (the caller owns them) leave the model as is."""
        plan = self.make_plan(seed=0)
        sent = ParameterSet((name, (np.array(array) + 1).astype(array.dtype))
                            for name, array in plan.get_parameters().items())
        expected = sent.copy()
        plan.set_parameters(sent)
        for array in sent.values():
            array[...] = 0
        assert plan.get_parameters().equal(expected)

    def test_training_is_reproducible(self) -> None:
        """The same seed gives identical parameters; another seed, different ones."""
        results = []
        for seed in (3, 3, 4):
            plan = self.make_plan(seed=0)
            plan.fit(self.dataset(), seed=seed)
            results.append(plan.get_parameters().copy())
        assert results[0].equal(results[1])
        assert not results[0].equal(results[2])

    def test_evaluation_returns_the_standard_metrics(self) -> None:
        """``predict`` + :func:`fedcore.plan.metrics.evaluate` give the task's standard metrics."""
        plan = self.make_plan(seed=0)
        plan.fit(self.dataset(), seed=0)
        y_true, y_pred = plan.predict(self.dataset())
        assert isinstance(y_true, np.ndarray) and isinstance(y_pred, np.ndarray)
        assert len(y_true) == len(y_pred) == len(self.dataset())
        metrics = evaluate(plan.task, y_true, y_pred)
        expected = evaluate(plan.task, y_true, y_true)
        assert set(metrics) == set(expected)
        assert all(np.isfinite(v) for v in metrics.values())

    def test_a_plan_raising_in_training_is_a_plan_failure(self) -> None:
        """A real node round reports the exception as the plan's failure, and keeps serving."""
        from fedcore import Experiment, simulate

        X, y = self.arrays()
        with simulate.from_arrays(X, y, n_nodes=2, tags=["conformance"]) as fed:
            exp = Experiment(self.failing_plan_class, tags=["conformance"], federation=fed.url,
                             progress=False, model_args=self.model_args,
                             training_args=self.training_args, evaluate_global=False,
                             evaluate_local=False)
            with pytest.raises(RoundError, match=re.escape(FAILURE)):
                exp.run_once()  # every node failed: the round fails, and says why
            rows = exp.history
            assert len(rows) == 2
            assert set(rows["status"]) == {"failed"}
            assert set(rows["error_kind"]) == {"plan"}
            assert all("RuntimeError" in e and FAILURE in e for e in rows["error"])
            healthy = Experiment(self.plan_class, tags=["conformance"], federation=fed.url,
                                 progress=False, model_args=self.model_args,
                                 training_args=self.training_args)
            assert set(healthy.run_once()["status"]) == {"ok"}

    def test_parameter_names_are_stable_across_processes(self) -> None:
        """A plan built in a fresh process names its parameters as this one does."""
        module = self.plan_class.__module__
        path = os.path.dirname(os.path.abspath(inspect.getfile(self.plan_class)))
        script = textwrap.dedent(f"""
            import importlib, json, sys
            sys.path.insert(0, {path!r})
            cls = getattr(importlib.import_module({module!r}), {self.plan_class.__name__!r})
            info = json.loads(sys.stdin.read())
            plan = cls(info["model_args"], info["training_args"], info["data_info"])
            plan.build(seed=0)
            print(json.dumps(list(plan.get_parameters())))
        """)
        here = self.make_plan(seed=0)
        self.make_plan(seed=1)  # a second model in this process must not rename anything
        payload = json.dumps({"model_args": self.model_args,
                              "training_args": self.training_args,
                              "data_info": self.data_info()}, default=_jsonable)
        result = subprocess.run([sys.executable, "-c", script], input=payload,
                                capture_output=True, text=True, timeout=self.subprocess_timeout)
        assert result.returncode == 0, result.stderr[-3000:]
        names = json.loads(result.stdout.strip().splitlines()[-1])
        assert names == list(here.get_parameters())
        assert names == list(self.make_plan(seed=2).get_parameters())

    def test_local_parameters_stay_on_the_node_and_come_back(self, tmp_path: Any) -> None:
        """Local parameters (here the last array: part of a head) stay and come back.

        They are left out of every reply, kept in the node's state and restored the next
        round, whatever the request sends.
        """
        from fedcore.aggregators._local import LocalState
        from fedcore.node.executor import run_round
        from fedcore.plan.personal import STATE, LocalParameters
        from fedcore.wire.messages import TrainRequest

        names = list(self.make_plan(seed=0).get_parameters())
        local = names[-1:]
        plan_class = type(f"Local{self.plan_class.__name__}", (self.plan_class,),
                          {"local_parameters": tuple(local)})
        initial = self.make_plan(seed=0, plan_class=plan_class).get_parameters().copy()
        sent = ParameterSet((n, a) for n, a in initial.items() if n not in local)
        kept: list[ParameterSet] = []
        for rnd in (1, 2, 3):
            state = LocalState(tmp_path, "experiment", "dataset", rnd)
            if kept:  # the round starts from what the node kept, not from the request
                fresh = self.make_plan(seed=5, plan_class=plan_class)
                start = LocalParameters(plan_class, state).start(fresh, sent)
                assert ParameterSet((n, start[n]) for n in local).equal(kept[-1])
            request = TrainRequest(plan={}, params=sent, dataset_id="dataset",
                                   model_args=self.model_args,
                                   training_args=self.training_args,
                                   data_info=self.data_info(), test_ratio=0.25, seed=1)
            reply, _ = run_round(plan_class, request, self.dataset(), "node", rnd, {}, None,
                                 state)
            assert list(reply.params) == [n for n in names if n not in local]
            saved = LocalState(tmp_path, "experiment", "dataset", rnd + 1).load(STATE)
            assert saved is not None and list(saved["params"]) == local
            kept.append(saved["params"])
            sent = reply.params
        assert not kept[0].equal(ParameterSet((n, initial[n]) for n in local))  # trained

    @pytest.mark.parametrize("change", ["name", "shape"])
    def test_mismatched_parameters_name_the_first_mismatch(self, change: str) -> None:
        """Parameters of another model are refused with an error naming the mismatch."""
        plan = self.make_plan(seed=0)
        params = plan.get_parameters().copy()
        first = next(iter(params))
        if change == "name":
            bad = ParameterSet(((f"{first}_renamed" if k == first else k), v)
                               for k, v in params.items())
        else:
            bad = ParameterSet((k, np.zeros(v.shape + (2,), v.dtype) if k == first else v)
                               for k, v in params.items())
        with pytest.raises((ValueError, ConfigurationError), match=re.escape(repr(first))):
            plan.set_parameters(bad)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON: {type(value).__name__}")


# --- signature parity -------------------------------------------------------------------------


def public_api(base: type = TrainingPlan) -> list[str]:
    """The public methods and properties ``base`` defines (what every backend offers)."""
    return sorted(name for name, value in vars(base).items()
                  if not name.startswith("_") and (callable(value) or isinstance(
                      value, property)) and not isinstance(value, type))


def _signature(cls: type, name: str) -> str | None:
    """The parameters of ``cls.name`` (names, kinds, defaults; no annotations)."""
    value = inspect.getattr_static(cls, name, None)
    if value is None:
        return None
    if isinstance(value, property):
        return "<property>"
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    if not callable(value):
        return f"<attribute {type(value).__name__}>"
    sig = inspect.signature(value)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def check_signature_parity(classes: Mapping[str, type], hooks: Iterable[str] = (),
                           deliberate: Mapping[tuple[str, str], str] | None = None
                           ) -> list[str]:
    """The differences between backends' plan classes; an empty list when they agree.

    Compares :func:`public_api` of :class:`~fedcore.plan.TrainingPlan` and the ``hooks``
    the backends document (``init_model``...). ``deliberate`` maps ``(backend, method)``
    to the reason the backend differs (lacks the method or has another signature); each
    must be a real difference, so a stale entry is reported too.
    """
    deliberate = dict(deliberate or {})
    problems: list[str] = []
    for name in [*public_api(), *hooks]:
        sigs = {backend: _signature(cls, name) for backend, cls in classes.items()}
        reference = _signature(TrainingPlan, name)
        if reference is None:  # a hook: the signature most backends share is the reference
            counts: dict[str, int] = {}
            for s in sigs.values():
                if s is not None:
                    counts[s] = counts.get(s, 0) + 1
            reference = max(counts, key=lambda s: counts[s]) if counts else None
        for backend, sig in sigs.items():
            differs = sig != reference
            reason = deliberate.pop((backend, name), None)
            if differs and not reason:
                problems.append(f"{backend}.{name}{sig or ' is missing'}; "
                                f"expected {name}{reference}")
            elif reason and not differs:
                problems.append(f"{backend}.{name} is listed as a deliberate difference "
                                f"({reason}) but matches")
    problems += [f"{b}.{n} is listed as a deliberate difference but was not compared"
                 for b, n in deliberate]
    return problems

