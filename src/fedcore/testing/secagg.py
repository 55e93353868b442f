"""The secure-aggregation conformance suite: the same tests for every scheme.

Subclass :class:`SecureAggregationConformance` in a test module (its name must start with
``Test``) and give it a ``scheme`` fixture: a configured
:class:`~fedcore.secagg.base.SecureAggregation`. Every test runs a round in memory
(:mod:`fedcore.secagg.local`: every message goes through the wire codec, as on a network)
and checks what a researcher relies on: the unprotected sum equals the plain weighted sum
within the scheme's own ``error_bound``, nodes that drop out are recovered where
``tolerates_dropout`` says so and are a clear :class:`~fedcore.errors.SecureAggregationError`
(never a wrong sum) where not, ``wire_params`` rebuild the scheme on a node, and malformed or
out-of-order messages raise :class:`~fedcore.errors.ProtocolError`. A scheme that is not
installed (no ``fedcore.secagg`` entry point yet) is registered under its ``name`` for the
test, as nodes look schemes up by name. Slow schemes shrink the rounds::

    class TestMyScheme(SecureAggregationConformance):
        n_nodes, size = 3, 4
        floors = NodeFloors(min_key_bits=256)  # the nodes' terms: small keys, for tests

        @pytest.fixture
        def scheme(self):
            return MyScheme(key_size=256)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import pytest

from fedcore import plugins
from fedcore.errors import ConfigurationError, ProtocolError, SecureAggregationError
from fedcore.params import ParameterSet
from fedcore.secagg.base import (
    NodeSession,
    ResearcherSession,
    SecureAggregation,
    SecureSum,
    open_node_session,
)
from fedcore.secagg.context import NodeFloors
from fedcore.secagg.local import context_for, open_sessions, run_round, through_the_wire

__all__ = ["Round", "SecureAggregationConformance"]


class Round(NamedTuple):
    """Inputs of one round: node ids, updates, weights, extras and the global model."""

    nodes: list[str]
    updates: dict[str, ParameterSet]
    weights: dict[str, float]
    extras: dict[str, dict[str, ParameterSet]]
    reference: ParameterSet


class SecureAggregationConformance:
    """Tests every secure-aggregation scheme passes. Subclasses provide ``scheme``."""

    #: Nodes per round (at least 3: one may drop out).
    n_nodes: int = 4
    #: The nodes' terms (a node's safe defaults; a scheme tested with small keys lowers
    #: ``min_key_bits``).
    floors: NodeFloors = NodeFloors()
    #: Values of each update's float32 vector.
    size: int = 50

    @pytest.fixture
    def scheme(self) -> SecureAggregation:
        """A configured scheme; subclasses override this fixture."""
        raise NotImplementedError("Give the conformance subclass a `scheme` fixture.")

    @pytest.fixture(autouse=True)
    def _findable_by_name(self, scheme: SecureAggregation) -> Iterator[None]:
        """Nodes open sessions by the scheme's name: register it for the test if need be."""
        try:
            found = plugins.load("secagg", scheme.name)
        except ConfigurationError:
            found = None
        if found is type(scheme):
            yield
            return
        with plugins.registered("secagg", scheme.name, type(scheme)):
            yield

    # --- helpers ------------------------------------------------------------------------------

    def _first_node(self, scheme: SecureAggregation, seed: int
                    ) -> tuple[Round, ResearcherSession, str, dict[str, Any], NodeSession]:
        """A round set up in memory: its researcher session, first node, options, session."""
        r = self.make_round(seed=seed)
        researcher, sessions = open_sessions(scheme, r.nodes, reference=r.reference,
                                             weights_hint=r.weights, floors=self.floors)
        node = researcher.participants[0]
        options = through_the_wire(researcher.train_options(node))
        return r, researcher, node, options, sessions.get(node) or open_node_session(
            node, options, context_for(self.floors))

    def make_round(self, seed: int = 0) -> Round:
        """Inputs of a round among :attr:`n_nodes` nodes.

        Updates of a float32 vector, a float64 matrix and an int64 counter, integer weights,
        one extra per node, and a global model that sets a clipping range of 8.
        """
        rng = np.random.default_rng(seed)
        nodes = [f"node-{i:02d}" for i in range(self.n_nodes)]
        updates, weights, extras = {}, {}, {}
        for node in nodes:
            updates[node] = ParameterSet({
                "w": rng.uniform(-2, 2, self.size).astype(np.float32),
                "m": rng.uniform(-2, 2, (2, 3)),
                "count": np.array(int(rng.integers(0, 4))),
            })
            weights[node] = float(rng.integers(1, 50))
            extras[node] = {"control": ParameterSet({"c": rng.uniform(-1, 1, 3)})}
        first = updates[nodes[0]]
        reference = ParameterSet({k: np.full_like(v, 2) for k, v in first.items()})
        return Round(nodes, updates, weights, extras, reference)

    def run(self, scheme: SecureAggregation, r: Round, **lost: Any) -> SecureSum:
        """A whole round of ``scheme`` on ``r`` through the wire codec.

        ``lost`` names the nodes lost at each stage, as :func:`fedcore.secagg.local.run_round`.
        """
        return run_round(scheme, r.updates, r.weights, extras=r.extras, reference=r.reference,
                         weights_hint=r.weights, floors=self.floors, **lost).result

    @staticmethod
    def check_sum(result: SecureSum, r: Round, nodes: list[str]) -> None:
        """``result`` is the weighted sum over ``nodes`` within the scheme's error bound."""
        sums, total, extras, report = result
        assert total == pytest.approx(sum(r.weights[n] for n in nodes), rel=1e-12)
        slack = sum(r.weights[n] * 4.0 for n in nodes) * 2.0 ** -50  # float64 rounding
        bound = report.get("error_bound", {})
        for k in r.reference:
            want = sum(r.weights[n] * np.asarray(r.updates[n][k], np.float64) for n in nodes)
            got = np.asarray(sums[k])
            assert got.shape == np.shape(want), (k, got.shape)
            err = float(np.max(np.abs(got - want)))
            assert err <= bound.get("params", 0.0) + slack, (k, err)
        want_c = sum(r.weights[n] * r.extras[n]["control"]["c"] for n in nodes)
        err = float(np.max(np.abs(np.asarray(extras["control"]["c"]) - want_c)))
        assert err <= bound.get("extras", 0.0) + slack, ("extras", err)

    # --- the suite ----------------------------------------------------------------------------

    def test_declares_its_capabilities(self, scheme: SecureAggregation) -> None:
        """It is a SecureAggregation with a name and a boolean ``tolerates_dropout``."""
        assert isinstance(scheme, SecureAggregation)
        assert isinstance(type(scheme).name, str) and type(scheme).name
        assert isinstance(scheme.tolerates_dropout, bool)

    def test_a_round_sums_like_the_plain_weighted_sum(self, scheme: SecureAggregation) -> None:
        """The unprotected sum of a full round equals the weighted sum, extras included."""
        r = self.make_round()
        result = self.run(scheme, r)
        self.check_sum(result, r, r.nodes)
        assert result.report["scheme"] == scheme.name
        assert sorted(result.report["survivors"]) == r.nodes

    def test_a_node_lost_while_training_is_recovered_or_a_clear_error(
            self, scheme: SecureAggregation) -> None:
        """``tolerates_dropout``: the others' sum; else SecureAggregationError naming it."""
        r = self.make_round(seed=1)
        lost = r.nodes[1]
        if scheme.tolerates_dropout:
            result = self.run(scheme, r, lost_before_protect=[lost])
            self.check_sum(result, r, [n for n in r.nodes if n != lost])
            assert lost in result.report["dropped"]
        else:
            with pytest.raises(SecureAggregationError) as info:
                self.run(scheme, r, lost_before_protect=[lost])
            assert lost in info.value.failures

    def test_the_constructor_is_the_configuration(self, scheme: SecureAggregation) -> None:
        """``get_params()`` rebuilds an equal scheme; ``wire_params()`` survive the codec."""
        params = scheme.get_params()
        clone = type(scheme)(**params)
        assert repr(clone) == repr(scheme)
        wire = scheme.wire_params()
        on_node = type(scheme)(**through_the_wire(wire))
        assert repr(on_node.wire_params()) == repr(wire)

    def test_a_malformed_payload_is_a_protocol_error(self, scheme: SecureAggregation) -> None:
        """A payload without its fields, or from another session, raises ProtocolError."""
        r = self.make_round(seed=2)
        researcher, _ = open_sessions(scheme, r.nodes, reference=r.reference,
                                      weights_hint=r.weights, floors=self.floors)
        node = researcher.participants[0]
        with pytest.raises(ProtocolError):
            researcher.add_protected(node, {"session": researcher.session_id, "node": node})
        with pytest.raises(ProtocolError):
            researcher.add_protected(node, {"session": "0" * 32, "node": node})
        with pytest.raises(ProtocolError):
            researcher.add_protected(node, "not a map")  # type: ignore[arg-type]

    def test_an_update_from_outside_the_round_is_refused(
            self, scheme: SecureAggregation) -> None:
        """A payload from a node that is not in the round raises ProtocolError."""
        r, researcher, node, options, session = self._first_node(scheme, seed=3)
        payload = through_the_wire(session.protect(r.updates[node], r.weights[node], options))
        with pytest.raises(ProtocolError):
            researcher.add_protected("stranger", payload)

    def test_the_node_session_refuses_unknown_or_foreign_messages(
            self, scheme: SecureAggregation) -> None:
        """Unknown phases, another session's messages and unmasking first: ProtocolError."""
        r, _, node, _, session = self._first_node(scheme, seed=4)
        header = {"session": session.session_id, "round": session.round}
        with pytest.raises(ProtocolError):
            session.answer("bogus", header)
        with pytest.raises(ProtocolError):
            session.answer("unmask", {**header, "session": "0" * 32})
        with pytest.raises(ProtocolError):  # nothing protected yet: nothing to unmask
            session.answer("unmask", {**header, "survivors": r.nodes})
        with pytest.raises(ProtocolError):
            open_node_session(node, {"scheme": scheme.name})  # no session, no params

    def test_a_round_without_any_update_is_an_error(self, scheme: SecureAggregation) -> None:
        """No payload arrived: SecureAggregationError, never an empty sum."""
        r = self.make_round(seed=5)
        researcher, _ = open_sessions(scheme, r.nodes, reference=r.reference,
                                      weights_hint=r.weights, floors=self.floors)
        for node in researcher.participants:
            researcher.train_options(node)
        with pytest.raises(SecureAggregationError):
            researcher.unmask_requests()
            researcher.unprotect_sum()

    def test_node_ids_must_be_unique_and_non_empty(self, scheme: SecureAggregation) -> None:
        """A round over no nodes or duplicated ids is a ConfigurationError at once."""
        with pytest.raises(ConfigurationError):
            scheme.researcher_session(1, [])
        with pytest.raises(ConfigurationError):
            scheme.researcher_session(1, ["a", "a", "b"])
