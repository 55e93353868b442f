"""The researcher's side of a round under secure aggregation, over a :class:`~._rpc.Client`.

Order of a round (see :mod:`fedcore.secagg.base`): the scheme's setup exchanges with the
selected nodes (:meth:`SecureRound.prepare`), training requests that carry each node's
protection options (:meth:`SecureRound.options`), the protected updates folded in as they
arrive (:meth:`SecureRound.add`), then the unmask exchange with the nodes whose update
arrived and the sum (:meth:`SecureRound.finish`). A node that fails an exchange is left out
of the round and named; the scheme decides whether the sum can still be made.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fedcore.errors import ProtocolError
from fedcore.params import ParameterSet
from fedcore.researcher.search import describe
from fedcore.secagg import ResearcherSession, SecureAggregation, SecureSum
from fedcore.wire.messages import Envelope, SecaggReply, SecaggRequest
from fedcore.wire.rpc import Client


class SecureRound:
    """One round's secure-aggregation session, driven over ``client``."""

    def __init__(self, scheme: SecureAggregation, client: Client, *, experiment: str,
                 round: int, nodes: list[str], weights_hint: Mapping[str, float],
                 reference: ParameterSet, weighting: str, timeout: float):
        self.session: ResearcherSession = scheme.researcher_session(
            round, nodes, weights_hint=weights_hint, reference=reference)
        self.scheme = scheme
        self._client = client
        self._experiment = experiment
        self._round = round
        self._weighting = weighting
        self._timeout = timeout
        self.failures: dict[str, str] = {}

    async def _exchange(self, phase: str, requests: dict[str, dict[str, Any]],
                        record: Callable[[str, Mapping[str, Any]], None]) -> None:
        if not requests:
            return
        bodies = {node: SecaggRequest(phase=phase, payload=msg) for node, msg in requests.items()}
        async for node, result, _ in self._client.scatter(
                bodies, experiment=self._experiment, round=self._round, timeout=self._timeout):
            reply = result.body if isinstance(result, Envelope) else None
            if not isinstance(reply, SecaggReply):
                self.failures[node] = f"secure aggregation ({phase}): {describe(result)}"
                continue
            try:
                record(node, reply.payload)
            except ProtocolError as exc:
                self.failures[node] = f"secure aggregation ({phase}): {exc}"

    async def prepare(self) -> None:
        """Run the setup exchanges; nodes that fail them are in :attr:`failures`."""
        s = self.session
        steps: list[tuple[str, Callable[[], dict[str, dict[str, Any]]],
                          Callable[[str, Mapping[str, Any]], None]]] = [
            ("setup", s.setup_requests, s.add_setup),
            ("share_keys", s.share_requests, s.add_shares),
        ]
        for phase, requests, record in steps:
            await self._exchange(phase, requests(), record)

    @property
    def participants(self) -> list[str]:
        """The nodes that train and protect their update this round."""
        return [n for n in self.session.participants if n not in self.failures]

    def options(self, node: str) -> dict[str, Any]:
        """What ``node``'s training request carries in ``TrainRequest.secagg``."""
        return {**self.session.train_options(node), "weighting": self._weighting}

    def add(self, node: str, payload: Mapping[str, Any]) -> None:
        """Fold one protected update (``ProtocolError`` when it is malformed)."""
        self.session.add_protected(node, payload)

    async def finish(self) -> SecureSum:
        """The unmask exchange, then the sum (``SecureAggregationError`` when impossible)."""
        await self._exchange("unmask", self.session.unmask_requests(), self.session.add_unmask)
        return self.session.unprotect_sum()
