"""Run one secure-aggregation round in memory: the reference order of the phases.

Every message between the researcher and the nodes is encoded and decoded with
:mod:`fedcore.wire.codec` on the way, exactly as a transport would carry it, so what works here is
wire-safe. Nodes can be lost at each stage to see how a scheme copes with drop-outs. Useful
in tests, notebooks and benchmarks; rounds over a network follow the same order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedcore.params import ParameterSet
from fedcore.secagg.base import (
    NodeSession,
    ResearcherSession,
    SecureAggregation,
    SecureSum,
    open_node_session,
)
from fedcore.secagg.context import EphemeralSigner, NodeContext, NodeFloors
from fedcore.wire import codec
from fedcore.wire.messages import Checkpoint, Envelope

__all__ = ["LocalRound", "context_for", "open_sessions", "run_round", "through_the_wire"]


def through_the_wire(message: Mapping[str, Any]) -> dict[str, Any]:
    """``message`` after a trip through the wire codec (arrays come back read-only)."""
    frame = codec.encode(Envelope(body=Checkpoint(state=dict(message))))
    state: dict[str, Any] = codec.decode(frame).body.state  # type: ignore[attr-defined]
    return state


@dataclass
class LocalRound:
    """What :func:`run_round` returns: the sum, and seconds spent by each side."""

    result: SecureSum
    #: node -> seconds its ``protect`` took.
    protect_s: dict[str, float] = field(default_factory=dict)
    #: seconds of the researcher's work after the payloads: unmask replies and unprotect_sum.
    unprotect_s: float = 0.0


def open_sessions(scheme: SecureAggregation, nodes: list[str], *, round: int = 1,
                  reference: ParameterSet | None = None,
                  weights_hint: Mapping[str, float] | None = None,
                  lost_at_setup: Collection[str] = (), wire: bool = True,
                  floors: NodeFloors | None = None,
                  ) -> tuple[ResearcherSession, dict[str, NodeSession]]:
    """A round's researcher session and node sessions, through the setup and share phases.

    ``lost_at_setup`` nodes never answer the setup; ``wire=False`` skips the codec round
    trips (to time the schemes' own work). Every node takes part on the terms of ``floors``
    (default: a node's safe defaults) with an identity key of its own, kept across rounds.
    """
    def trip(message: Mapping[str, Any]) -> dict[str, Any]:
        return through_the_wire(message) if wire else dict(message)

    researcher = scheme.researcher_session(round, nodes, weights_hint=weights_hint,
                                           reference=reference)
    sessions: dict[str, NodeSession] = {}
    for node, msg in researcher.setup_requests().items():
        if node in lost_at_setup:
            continue
        msg = trip(msg)
        sessions[node] = open_node_session(node, msg, context_for(floors, node))
        researcher.add_setup(node, trip(sessions[node].answer("setup", msg)))
    for node, msg in researcher.share_requests().items():
        researcher.add_shares(node, trip(sessions[node].answer("share_keys", trip(msg))))
    return researcher, sessions


def run_round(scheme: SecureAggregation, updates: Mapping[str, ParameterSet],
              weights: Mapping[str, float], *,
              extras: Mapping[str, Mapping[str, ParameterSet]] | None = None,
              round: int = 1, reference: ParameterSet | None = None,
              weights_hint: Mapping[str, float] | None = None,
              lost_at_setup: Collection[str] = (), lost_before_protect: Collection[str] = (),
              lost_before_unmask: Collection[str] = (),
              on_payload: Callable[[str, dict[str, Any]], None] | None = None,
              floors: NodeFloors | None = None) -> LocalRound:
    """One round among the nodes of ``updates``; returns the researcher's secure sum.

    ``lost_at_setup`` nodes never answer the setup, ``lost_before_protect`` ones answer the
    setup phases and vanish while training, ``lost_before_unmask`` ones send their protected
    update and vanish before unmasking. ``on_payload(node, payload)`` sees each protected
    payload as the researcher received it. ``floors`` are the nodes' terms (see
    :func:`open_sessions`). Errors of the scheme propagate unchanged.
    """
    wire = through_the_wire
    researcher, sessions = open_sessions(scheme, list(updates), round=round,
                                         reference=reference, weights_hint=weights_hint,
                                         lost_at_setup=lost_at_setup, floors=floors)
    protect_s: dict[str, float] = {}
    for node in researcher.participants:
        options = wire(researcher.train_options(node))
        if node in lost_before_protect:
            continue
        if node not in sessions:  # schemes without a setup phase open the session here
            sessions[node] = open_node_session(node, options, context_for(floors, node))
        start = time.perf_counter()
        payload = sessions[node].protect(updates[node], weights[node], options,
                                         (extras or {}).get(node))
        protect_s[node] = time.perf_counter() - start
        payload = wire(payload)
        if on_payload is not None:
            on_payload(node, payload)
        researcher.add_protected(node, payload)
    requests = {node: wire(msg) for node, msg in researcher.unmask_requests().items()}
    replies = {node: wire(sessions[node].answer("unmask", msg))
               for node, msg in requests.items() if node not in lost_before_unmask}
    start = time.perf_counter()
    for node, reply in replies.items():
        researcher.add_unmask(node, reply)
    result = researcher.unprotect_sum()
    return LocalRound(result, protect_s, time.perf_counter() - start)


#: Identity keys of the nodes simulated here, by node id: made once per process and kept
#: across rounds, as a node keeps its ``identity.key``.
_identities: dict[str, EphemeralSigner] = {}


def context_for(floors: NodeFloors | None = None, node: str = "") -> NodeContext:
    """A node's terms in memory: ``floors``, the identity key of ``node``, no peer list."""
    signer = _identities.setdefault(node, EphemeralSigner()) if node else EphemeralSigner()
    return NodeContext(floors=floors or NodeFloors(), signer=signer)
