"""A node's secure-aggregation sessions: one per round, from setup to unmasking.

The researcher opens a session with a ``setup`` exchange; the node keeps it, bound to what
it protects (:class:`Binding`: the researcher's verified key, the experiment and the round;
the session itself holds its scheme and members), until the round's ``unmask`` exchange,
until an exchange of it fails, or until newer sessions push it out. A setup that fails
leaves nothing behind. A training (or statistics) request is protected only by a session
the node holds under the same binding, whose setup exchanges are done
(:meth:`SecaggSessions.session_for`); only schemes without a setup phase (the identity) open
theirs with the request. Key material never leaves the session objects except as the
scheme's encrypted shares.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedcore import plugins
from fedcore.errors import ConfigurationError, FedcoreError, ProtocolError
from fedcore.params import ParameterSet
from fedcore.secagg import NodeContext, NodeSession, open_node_session
from fedcore.wire.messages import SecaggReply, SecaggRequest

log = logging.getLogger("fedcore.node")
_KEEP = 16  # sessions kept: a few concurrent experiments, each with one round in flight
#: Sessions holding a precomputed mask (one uint64 vector each) not yet used by protect; a
#: round whose training failed leaves one behind until newer rounds push it out.
_PREPARED = 4


@dataclass(frozen=True)
class Binding:
    """What a session is bound to besides its scheme and members, from what the node verified.

    ``researcher`` is the fingerprint of the key that signed the request (in-process, where
    nothing is signed, the sender's name), ``experiment`` and ``round`` the envelope's.
    """

    researcher: str
    experiment: str
    round: int

    def describe(self) -> str:
        """For messages: who, which experiment and round."""
        return (f"researcher key {self.researcher}, experiment {self.experiment!r}, "
                f"round {self.round}")


class SecaggSessions:
    """The sessions of one node, by session id (the newest :data:`_KEEP`).

    ``context(binding)`` gives the node's terms for a new session (floors from its policy,
    identity key, peer list); it raises ``ConfigurationError`` while the policy is invalid.
    """

    def __init__(self, node_id: str, context: Callable[[Binding], NodeContext] | None = None):
        self.node_id = node_id
        self._context = context or (lambda binding: NodeContext(experiment=binding.experiment))
        self._sessions: OrderedDict[str, tuple[NodeSession, Binding]] = OrderedDict()
        self._lock = threading.Lock()  # protect() runs in the training thread
        self._prepared: OrderedDict[str, NodeSession] = OrderedDict()

    def _held(self, sid: str, binding: Binding) -> NodeSession | None:
        """The session ``sid`` if held; ``ProtocolError`` when bound to something else."""
        with self._lock:
            held = self._sessions.get(sid)
        if held is None:
            return None
        session, bound = held
        if bound != binding:
            raise ProtocolError(
                f"Secure-aggregation session {sid!r} was set up for {bound.describe()}; this "
                f"request comes from {binding.describe()}: refused.")
        return session

    def _drop(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)
            prepared = self._prepared.pop(sid, None)
        if prepared is not None:
            prepared.discard()

    def answer(self, request: SecaggRequest, binding: Binding) -> SecaggReply:
        """Run one exchange; ``setup`` opens the session, any failure drops it."""
        payload = request.payload
        sid = _session_id(payload)
        session = self._held(sid, binding)
        if session is None:
            if request.phase != "setup":
                raise ProtocolError(
                    f"No secure-aggregation session {sid!r} on node {self.node_id!r}: it was "
                    "never set up here, its setup failed, or the node restarted since.")
            try:
                context = self._context(binding)
            except ConfigurationError as exc:  # fail closed while the policy is invalid
                raise ProtocolError(f"This node's policy is invalid ({exc}): it takes part "
                                    "in no secure aggregation until it is fixed.") from exc
            session = open_node_session(self.node_id, payload, context)
            reply = session.answer("setup", payload)  # raises: nothing is kept
            with self._lock:
                self._sessions[sid] = (session, binding)
                while len(self._sessions) > _KEEP:
                    self._sessions.popitem(last=False)
            return SecaggReply(payload=reply)
        _check_scheme(session, payload)
        try:
            reply = session.answer(request.phase, payload)
        except FedcoreError:
            self._drop(sid)  # a failed exchange ends the session: no later phase uses it
            raise
        if request.phase == "unmask":  # the round's last exchange
            self._drop(sid)
        return SecaggReply(payload=reply)

    def session_for(self, options: Mapping[str, Any], binding: Binding) -> NodeSession:
        """The session that will protect a request's update (``ProtocolError`` when none).

        It is the session named in ``options`` that this node holds under ``binding``, of
        the scheme ``options`` names, its setup exchanges done. A scheme without a setup
        phase (the identity) opens a new session here.
        """
        sid = _session_id(options)
        session = self._held(sid, binding)
        if session is None:
            name = options.get("scheme")
            try:
                cls = plugins.load("secagg", str(name))
            except ConfigurationError as exc:
                raise ProtocolError(str(exc)) from exc
            if getattr(cls, "has_setup", True):
                raise ProtocolError(
                    f"No {name!r} session {sid!r} was set up on node {self.node_id!r} for "
                    f"{binding.describe()}: the update is not released (neither protected nor "
                    "in clear). Run the round's setup exchanges first.")
            session = open_node_session(self.node_id, options, self._context(binding))
            with self._lock:
                self._sessions[sid] = (session, binding)
                while len(self._sessions) > _KEEP:
                    self._sessions.popitem(last=False)
            return session
        _check_scheme(session, options)
        if not session.ready:
            raise ProtocolError(f"Secure-aggregation session {sid!r} has not finished its "
                                "setup exchanges: the update is not released.")
        return session

    def prepare(self, session: NodeSession, options: Mapping[str, Any],
                reference: ParameterSet | None) -> None:
        """Let ``session`` start what its protect needs, while the node trains.

        ``reference`` is the global model of the training request. Never raises: whatever is
        wrong with ``options`` is reported by :meth:`protect`, after training.
        """
        try:
            session.prepare(options, reference)
        except Exception as exc:  # an optimisation only: protect does the work itself
            log.warning("Could not prepare secure aggregation ahead of training: %s", exc)
            return
        with self._lock:
            self._prepared[session.session_id] = session
            self._prepared.move_to_end(session.session_id)
            while len(self._prepared) > _PREPARED:
                self._prepared.popitem(last=False)[1].discard()

    def protect(self, session: NodeSession, options: Mapping[str, Any], update: ParameterSet,
                weight: float, extras: Mapping[str, ParameterSet] | None) -> dict[str, Any]:
        """The protected payload of ``weight * update`` under ``session``."""
        with self._lock:
            self._prepared.pop(session.session_id, None)
        return session.protect(update, weight, options, extras)


def _session_id(payload: Any) -> str:
    sid = payload.get("session") if isinstance(payload, Mapping) else None
    if not isinstance(sid, str):
        raise ProtocolError("Expected a secure-aggregation message with a 'session' id.")
    return sid


def _check_scheme(session: NodeSession, payload: Mapping[str, Any]) -> None:
    named = payload.get("scheme")
    if named is not None and named != session.scheme.name:
        raise ProtocolError(
            f"The message names scheme {named!r}, but session {session.session_id!r} on this "
            f"node is a {session.scheme.name!r} session: refused.")
