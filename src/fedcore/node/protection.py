"""The node's half of round protection: how an update leaves the node, in clear or protected.

It mirrors :mod:`fedcore.researcher.protection`: :class:`ClearUpdate` is the identity,
:class:`SecureUpdate` protects the update through the round's secure-aggregation session
(:class:`~fedcore.node._secagg.SecaggSessions`). :func:`update_protection` picks one from the
training request, so the round executor has no branch of its own for secure aggregation.
The session is the one the node holds for the request's researcher key, experiment and round
(never one the request makes up): its scheme is what governance sees.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from fedcore.errors import ConfigurationError
from fedcore.node._secagg import Binding, SecaggSessions
from fedcore.params import ParameterSet
from fedcore.wire.messages import TrainReply

__all__ = ["ClearUpdate", "SecureUpdate", "UpdateProtection", "update_protection"]


class UpdateProtection:
    """How one round's update leaves the node (the identity: as it is)."""

    #: The scheme of the session that protects the update, which governance sees
    #: (``None``: in clear).
    scheme: str | None = None

    def prepare(self, reference: ParameterSet) -> None:
        """Start, beside training, what protecting the update will need."""

    async def protect(self, reply: TrainReply,
                      executor: concurrent.futures.Executor) -> TrainReply:
        """The reply as it leaves the node (``FedcoreError`` when it cannot be protected)."""
        return reply


class ClearUpdate(UpdateProtection):
    """The identity: the update leaves in clear."""


class SecureUpdate(UpdateProtection):
    """The update is replaced by its secure-aggregation payload; the researcher sees a sum."""

    def __init__(self, sessions: SecaggSessions, options: Mapping[str, Any],
                 binding: Binding):
        self._sessions = sessions
        self._options = options
        #: Raises ProtocolError when the node holds no such session for ``binding``.
        self.session = sessions.session_for(options, binding)
        self.scheme = self.session.scheme.name

    def prepare(self, reference: ParameterSet) -> None:
        # The masks are computed in a thread while the node trains.
        self._sessions.prepare(self.session, self._options, reference)

    async def protect(self, reply: TrainReply,
                      executor: concurrent.futures.Executor) -> TrainReply:
        return await asyncio.get_running_loop().run_in_executor(executor, self._protect, reply)

    def _protect(self, reply: TrainReply) -> TrainReply:
        options = self._options
        weight = 1.0 if options.get("weighting") == "uniform" else float(reply.n_samples)
        extras = {k: v for k, v in reply.extras.items() if isinstance(v, ParameterSet)}
        if len(extras) != len(reply.extras):
            raise ConfigurationError(
                f"Secure aggregation sums ParameterSets only; the aggregator's node side "
                f"returned other extras: {sorted(set(reply.extras) - set(extras))}.")
        payload = self._sessions.protect(self.session, options, reply.params, weight,
                                         extras or None)
        return dataclasses.replace(reply, params=ParameterSet({}), extras={}, secagg=payload)


_CLEAR = ClearUpdate()  # holds nothing: one serves every request in clear


def update_protection(sessions: SecaggSessions, options: Mapping[str, Any],
                      binding: Callable[[], Binding]) -> UpdateProtection:
    """The protection a training request asks for: its ``secagg`` options, or none.

    ``binding`` gives what the session is bound to (called only when one is asked for).
    ``ProtocolError`` when the options name a session the node does not hold for it.
    """
    return SecureUpdate(sessions, options, binding()) if options else _CLEAR
