"""The aggregator conformance suite: the same tests for every aggregator.

Subclass :class:`AggregatorConformance` in a test module (its name must start with ``Test``)
and give it an ``aggregator`` fixture: a freshly constructed instance. Every test runs rounds
on known updates (a float32 vector, a float64 matrix and an int64 counter per node) and
checks what a user of the aggregator relies on: the result equals a numpy reference
(:meth:`AggregatorConformance.reference`, the sample-weighted mean unless overridden), keeps
the global model's layout, does not depend on the order of the updates where
``order_independent`` says so, the constructor is the configuration (``get_params`` and a
clone built from it), the ``state_dict`` survives a checkpoint, ``sum_only`` aggregators fold
a secure sum through ``add_sum`` as they fold the same updates one by one, and a round
without updates is an error. A known gap is declared, never skipped::

    class TestNoisyMean(AggregatorConformance):
        @pytest.fixture
        def aggregator(self):
            return NoisyMean(sigma=0.1, seed=0)

        @pytest.mark.xfail(reason="noise: the result is the mean only in expectation",
                           strict=True)
        def test_result_equals_the_reference(self, aggregator):
            super().test_result_equals_the_reference(aggregator)
"""

from __future__ import annotations

import inspect
import tracemalloc
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pytest

from fedcore.aggregators.base import Aggregator
from fedcore.errors import ConfigurationError
from fedcore.params import ParameterSet
from fedcore.secagg.local import through_the_wire

__all__ = ["AggregatorConformance", "Update", "weighted_mean"]


class Update(NamedTuple):
    """One node's contribution to a round, as :meth:`Aggregator.add` receives it."""

    node: str
    params: ParameterSet
    weight: float
    extras: Mapping[str, Any] | None = None


def weighted_mean(global_params: ParameterSet, updates: Sequence[Update]) -> ParameterSet:
    """The sample-weighted mean of ``updates`` in each parameter's dtype (integers rounded)."""
    total = sum(u.weight for u in updates)
    out = {}
    for k, ref in global_params.items():
        mean = sum(u.weight * np.asarray(u.params[k], np.float64) for u in updates) / total
        out[k] = _cast(np.asarray(mean), ref.dtype)
    return ParameterSet(out)


def _weighted_sum(terms: Sequence[tuple[float, Mapping[str, Any]]]) -> ParameterSet:
    """``sum(weight * params)`` in float64, key by key (a secure sum as schemes reveal it)."""
    keys = list(terms[0][1])
    out = {}
    for k in keys:
        acc = np.zeros(np.shape(terms[0][1][k]), np.float64)
        for weight, params in terms:
            acc += weight * np.asarray(params[k], np.float64)
        out[k] = acc
    return ParameterSet(out)


def _cast(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return (np.rint(value) if dtype.kind in "iub" else value).astype(dtype)


class AggregatorConformance:
    """Tests every aggregator passes. Subclasses provide the ``aggregator`` fixture."""

    #: Nodes per round.
    n_nodes: int = 5
    #: Values of the float32 vector of every update.
    size: int = 100
    #: Tolerances of the comparisons with :meth:`reference` and between two rounds.
    rtol: float = 1e-6
    atol: float = 1e-9
    #: Whether the result is the same whatever the order of :meth:`Aggregator.add` calls.
    order_independent: bool = True
    #: Peak memory of a streaming round's ``add`` calls, in models, besides one update.
    streaming_models: float = 4.0

    @pytest.fixture
    def aggregator(self) -> Aggregator:
        """A freshly constructed aggregator; subclasses override this fixture."""
        raise NotImplementedError("Give the conformance subclass an `aggregator` fixture.")

    # --- hooks for subclasses ----------------------------------------------------------------

    def global_params(self, seed: int = 0) -> ParameterSet:
        """The global model a round starts from."""
        rng = np.random.default_rng(seed)
        return ParameterSet({"w": rng.standard_normal(self.size).astype(np.float32),
                             "m": rng.uniform(-1, 1, (3, 4)),
                             "count": np.array(3, np.int64)})

    def extras(self, aggregator: Aggregator, node: str, params: ParameterSet,
               rng: np.random.Generator) -> Mapping[str, Any] | None:
        """What the node's side of the algorithm sends besides its update (default: none).

        Called after :meth:`Aggregator.start`; SCAFFOLD, say, needs a control-variate delta.
        """
        return None

    def updates(self, aggregator: Aggregator, global_params: ParameterSet,
                seed: int = 1) -> list[Update]:
        """:attr:`n_nodes` updates near ``global_params`` with distinct integer weights."""
        rng = np.random.default_rng(seed)
        out = []
        for i in range(self.n_nodes):
            node = f"node-{i:02d}"
            params = ParameterSet({
                k: (np.asarray(v + rng.integers(0, 5)) if v.dtype.kind in "iub" else
                    (v + rng.normal(0, 0.5, v.shape)).astype(v.dtype))
                for k, v in global_params.items()})
            out.append(Update(node, params, float(rng.integers(1, 200)),
                              self.extras(aggregator, node, params, rng)))
        return out

    def reference(self, aggregator: Aggregator, global_params: ParameterSet,
                  updates: Sequence[Update]) -> ParameterSet:
        """The result expected from a fresh aggregator, with numpy: the weighted mean."""
        return weighted_mean(global_params, updates)

    # --- helpers ------------------------------------------------------------------------------

    @staticmethod
    def clone(aggregator: Aggregator) -> Aggregator:
        """A new, unfitted aggregator with the same configuration (as ``sklearn.clone``)."""
        return type(aggregator)(**aggregator.get_params())

    def run_round(self, aggregator: Aggregator, global_params: ParameterSet, round: int = 1,
                  seed: int = 1, order: Sequence[int] | None = None) -> ParameterSet:
        """One round: start, add the updates of :meth:`updates` (in ``order``), result."""
        aggregator.start(global_params, round)
        updates = self.updates(aggregator, global_params, seed)
        for i in order if order is not None else range(len(updates)):
            u = updates[i]
            aggregator.add(u.params, u.weight, u.node, u.extras)
        return aggregator.result()

    def assert_close(self, got: ParameterSet, want: ParameterSet) -> None:
        """Same keys, shapes and dtypes, and values within :attr:`rtol` / :attr:`atol`."""
        assert list(got) == list(want), (list(got), list(want))
        for k in want:
            a, b = np.asarray(got[k]), np.asarray(want[k])
            assert a.shape == b.shape and a.dtype == b.dtype, (k, a.shape, a.dtype, b.dtype)
            np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64),
                                       rtol=self.rtol, atol=self.atol, err_msg=k)

    # --- the suite ----------------------------------------------------------------------------

    def test_declares_its_capabilities(self, aggregator: Aggregator) -> None:
        """It is an Aggregator with a name and boolean ``streaming`` and ``sum_only``."""
        assert isinstance(aggregator, Aggregator)
        assert isinstance(type(aggregator).name, str) and type(aggregator).name
        assert isinstance(aggregator.streaming, bool) and isinstance(aggregator.sum_only, bool)

    def test_result_equals_the_reference(self, aggregator: Aggregator) -> None:
        """A round's result equals :meth:`reference` (the weighted mean by default)."""
        global_params = self.global_params()
        aggregator.start(global_params, 1)
        updates = self.updates(aggregator, global_params)
        for u in updates:
            aggregator.add(u.params, u.weight, u.node, u.extras)
        self.assert_close(aggregator.result(), self.reference(aggregator, global_params,
                                                              updates))

    def test_result_keeps_the_layout_and_a_second_call_returns_the_same(
            self, aggregator: Aggregator) -> None:
        """The result has the global model's keys, shapes and dtypes; ``result()`` is idempotent."""
        global_params = self.global_params()
        result = self.run_round(aggregator, global_params)
        assert isinstance(result, ParameterSet)
        global_params.check_layout(result, what="the aggregated model")
        assert {k: v.dtype for k, v in result.items()} == \
            {k: v.dtype for k, v in global_params.items()}
        assert aggregator.result().equal(result)

    def test_the_order_of_the_updates_does_not_matter(self, aggregator: Aggregator) -> None:
        """Updates added in reverse order give the same result (``order_independent``)."""
        if not self.order_independent:
            pytest.skip(f"{type(self).__name__}.order_independent is False")
        global_params = self.global_params()
        forward = self.run_round(self.clone(aggregator), global_params)
        backward = self.run_round(aggregator, global_params,
                                  order=list(range(self.n_nodes))[::-1])
        self.assert_close(backward, forward)

    def test_the_constructor_is_the_configuration(self, aggregator: Aggregator) -> None:
        """``get_params()`` returns every constructor argument; a clone built from it is equal."""
        params = aggregator.get_params()
        wanted = [name for name, p in inspect.signature(type(aggregator).__init__)
                  .parameters.items() if name != "self"
                  and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        assert sorted(params) == sorted(wanted), (
            "get_params() must return every constructor argument, kept under its own name "
            f"as an attribute. Expected {sorted(wanted)}, received {sorted(params)}.")
        clone = self.clone(aggregator)
        assert type(clone) is type(aggregator)
        assert repr(clone.get_params()) == repr(params)
        assert repr(clone) == repr(aggregator)
        assert repr(through_the_wire(params)) == repr(params)  # checkpoints carry them

    def test_a_clone_aggregates_like_the_original(self, aggregator: Aggregator) -> None:
        """An aggregator rebuilt from ``get_params()`` gives the same round result."""
        global_params = self.global_params()
        clone = self.clone(aggregator)
        self.assert_close(self.run_round(clone, global_params),
                          self.run_round(aggregator, global_params))

    def test_the_state_survives_a_checkpoint(self, aggregator: Aggregator) -> None:
        """``state_dict()``, through the wire codec, restores a clone that continues alike."""
        global_params = self.global_params()
        first = self.run_round(aggregator, global_params, round=1)
        state = aggregator.state_dict()
        assert isinstance(state, dict)
        restored = self.clone(aggregator)
        restored.load_state_dict(through_the_wire(state))  # as Experiment.save/load do
        second = self.run_round(aggregator, first, round=2, seed=2)
        self.assert_close(self.run_round(restored, first, round=2, seed=2), second)

    def test_round_options_cross_the_wire(self, aggregator: Aggregator) -> None:
        """``round_options()`` is a dict that the wire codec carries to the nodes."""
        aggregator.start(self.global_params(), 1)
        options = aggregator.round_options()
        assert isinstance(options, dict)
        assert sorted(through_the_wire(options)) == sorted(options)

    def test_add_sum_folds_a_secure_sum_like_the_updates_one_by_one(
            self, aggregator: Aggregator) -> None:
        """``sum_only``: ``add_sum`` of the sums equals adding each update; else it refuses."""
        global_params = self.global_params()
        clone = self.clone(aggregator)
        clone.start(global_params, 1)
        updates = self.updates(clone, global_params)
        if not aggregator.sum_only:
            with pytest.raises(ConfigurationError):
                clone.add_sum(ParameterSet(updates[0].params), updates[0].weight,
                              [updates[0].node])
            return
        expected = self.run_round(aggregator, global_params)
        total = sum(u.weight for u in updates)
        sums = _weighted_sum([(u.weight, u.params) for u in updates])
        extras = {name: _weighted_sum([(u.weight, (u.extras or {})[name]) for u in updates])
                  for name in (updates[0].extras or {})}
        clone.add_sum(sums, total, [u.node for u in updates], extras or None)
        self.assert_close(clone.result(), expected)

    def test_a_round_without_updates_is_an_error(self, aggregator: Aggregator) -> None:
        """``result()`` before any ``add`` raises ConfigurationError."""
        aggregator.start(self.global_params(), 1)
        with pytest.raises(ConfigurationError):
            aggregator.result()

    def test_a_non_positive_weight_is_refused(self, aggregator: Aggregator) -> None:
        """A weight of 0 raises ConfigurationError."""
        global_params = self.global_params()
        aggregator.start(global_params, 1)
        u = self.updates(aggregator, global_params)[0]
        with pytest.raises(ConfigurationError):
            aggregator.add(u.params, 0.0, u.node, u.extras)

    def test_an_update_of_another_layout_is_refused(self, aggregator: Aggregator) -> None:
        """An update shaped unlike the global model raises ValueError."""
        global_params = self.global_params()
        aggregator.start(global_params, 1)
        u = self.updates(aggregator, global_params)[0]
        wrong = ParameterSet({**u.params, "w": np.zeros(self.size + 1, np.float32)})
        with pytest.raises(ValueError):  # ConfigurationError is one
            aggregator.add(wrong, u.weight, u.node, u.extras)

    def test_a_streaming_round_holds_a_few_models_whatever_the_nodes(
            self, aggregator: Aggregator) -> None:
        """``streaming``: adding 12 updates holds :attr:`streaming_models` models at most."""
        if not aggregator.streaming:
            pytest.skip(f"{type(aggregator).__name__} declares streaming = False")
        size = 1 << 17  # float64 values: 1 MiB per model
        global_params = ParameterSet({"w": np.zeros(size)})
        aggregator.start(global_params, 1)
        rng = np.random.default_rng(0)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for i in range(12):
                params = ParameterSet({"w": rng.standard_normal(size)})
                extras = self.extras(aggregator, f"node-{i:02d}", params, rng)
                aggregator.add(params, 1.0, f"node-{i:02d}", extras)
                del params, extras
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        one = size * 8
        bound = (self.streaming_models + 2) * one  # + the update and its extras
        assert peak <= bound, (f"Peak {peak / one:.1f} models while adding 12 updates; a "
                               f"streaming aggregator holds at most "
                               f"{self.streaming_models:g} besides the update.")
