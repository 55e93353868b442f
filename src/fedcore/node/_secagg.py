"""A node's secure-aggregation sessions: one per round, from setup to unmasking.

The researcher opens a session with a ``setup`` exchange (schemes without one open it with
the training request); the node keeps it until the round's ``unmask`` exchange, or until
newer sessions push it out. Key material never leaves this object except as the scheme's
encrypted shares.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from fedcore.errors import FedcoreError, ProtocolError
from fedcore.params import ParameterSet
from fedcore.secagg import NodeSession, open_node_session
from fedcore.wire.messages import SecaggReply, SecaggRequest

log = logging.getLogger("fedcore.node")
_KEEP = 16  # sessions kept: a few concurrent experiments, each with one round in flight
#: Sessions holding a precomputed mask (one uint64 vector each) not yet used by protect; a
#: round whose training failed leaves one behind until newer rounds push it out.
_PREPARED = 4


class SecaggSessions:
    """The sessions of one node, by session id (the newest :data:`_KEEP`)."""

    def __init__(self, node_id: str):
        self.node_id = node_id
        self._sessions: OrderedDict[str, NodeSession] = OrderedDict()
        self._lock = threading.Lock()  # protect() runs in the training thread
        self._prepared: OrderedDict[str, NodeSession] = OrderedDict()

    def _get(self, payload: Mapping[str, Any], *, open_new: bool) -> NodeSession:
        sid = payload.get("session") if isinstance(payload, Mapping) else None
        if not isinstance(sid, str):
            raise ProtocolError("Expected a secure-aggregation message with a 'session' id.")
        with self._lock:
            session = self._sessions.get(sid)
            if session is None:
                if not open_new:
                    raise ProtocolError(
                        f"No secure-aggregation session {sid!r} on node {self.node_id!r}: it "
                        "was never set up here, or the node restarted since.")
                session = open_node_session(self.node_id, payload)
                self._sessions[sid] = session
                while len(self._sessions) > _KEEP:
                    self._sessions.popitem(last=False)
            return session

    def answer(self, request: SecaggRequest) -> SecaggReply:
        """Run one exchange; ``setup`` opens the session."""
        session = self._get(request.payload, open_new=request.phase == "setup")
        reply = session.answer(request.phase, request.payload)
        if request.phase == "unmask":  # the round's last exchange
            with self._lock:
                self._sessions.pop(session.session_id, None)
                self._prepared.pop(session.session_id, None)
        return SecaggReply(payload=reply)

    def prepare(self, options: Mapping[str, Any], reference: ParameterSet | None) -> None:
        """Let the session in ``options`` start what its protect needs, while the node trains.

        ``reference`` is the global model of the training request. Never raises: whatever is
        wrong with ``options`` is reported by :meth:`protect`, after training.
        """
        try:
            session = self._get(options, open_new=True)
        except FedcoreError as exc:
            log.debug("Nothing to prepare for secure aggregation: %s", exc)
            return
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

    def protect(self, options: Mapping[str, Any], update: ParameterSet, weight: float,
                extras: Mapping[str, ParameterSet] | None) -> dict[str, Any]:
        """The protected payload of ``weight * update`` for the session in ``options``."""
        session = self._get(options, open_new=True)
        with self._lock:
            self._prepared.pop(session.session_id, None)
        return session.protect(update, weight, options, extras)
