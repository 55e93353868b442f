"""Round protection: how a round's updates reach the aggregator, as one interchangeable layer.

A :class:`~fedcore.researcher.round.Round` talks to a :class:`RoundProtection` only:

- :class:`ClearRound`, the identity: each node's update is folded into the aggregator as it
  arrives, weighted by the strategy;
- :class:`SecureRound`: a secure-aggregation scheme (:mod:`fedcore.secagg`). Its setup
  exchanges run before the training requests (:meth:`RoundProtection.prepare`), each
  request carries the node's protection options (:meth:`RoundProtection.options`), the
  protected updates are collected (:meth:`RoundProtection.add`), and the unmask exchange
  gives the sum, folded into the aggregator at the end (:meth:`RoundProtection.finish`).

The node mirrors the same layer (:mod:`fedcore.node.protection`). :class:`SecureExchange`
drives a scheme's phases over any session that scatters requests; federated statistics use
it too.
"""

from __future__ import annotations

import abc
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, Protocol

from fedcore.aggregators import Aggregator
from fedcore.errors import ProtocolError, SecureAggregationError
from fedcore.params import ParameterSet
from fedcore.researcher.strategies import Strategy
from fedcore.secagg import ResearcherSession, SecureAggregation, SecureSum
from fedcore.wire.messages import Body, SecaggReply, SecaggRequest, TrainReply
from fedcore.wire.rpc import Reply

__all__ = ["ClearRound", "RoundProtection", "SecureExchange", "SecureRound", "protection_for"]

log = logging.getLogger("fedcore.experiment")


class Scatters(Protocol):
    """What protection needs of a session: one request per node, replies as they come."""

    def scatter(self, bodies: Mapping[str, Body], *, experiment: str = "", round: int = 0,
                timeout: float = 60.0) -> AsyncIterator[Reply]:
        """Send one body per node; yield each node's reply."""
        ...


class RoundProtection(abc.ABC):
    """One round's protection of the nodes' updates (see the module's docstring)."""

    #: What the history's ``secagg`` column says (``""``: in clear).
    name: str = ""

    def __init__(self) -> None:
        #: Nodes left out of the round by the protection's own exchanges, with why.
        self.failures: dict[str, str] = {}

    async def prepare(self) -> None:  # noqa: B027 - the identity has nothing to prepare
        """Run the exchanges that come before training; failed nodes go to :attr:`failures`."""

    def participants(self, nodes: list[str]) -> list[str]:
        """The nodes of ``nodes`` that train and send an update this round."""
        return [n for n in nodes if n not in self.failures]

    def options(self, node: str) -> dict[str, Any]:
        """What ``node``'s training request carries in ``TrainRequest.secagg``."""
        return {}

    @abc.abstractmethod
    def add(self, node: str, reply: TrainReply) -> None:
        """Fold one node's reply (``ValueError`` or a ``FedcoreError`` when unusable)."""

    async def finish(self) -> dict[str, Any]:
        """Complete the round's sum; returns what to add to each contributing node's row.

        ``SecureAggregationError`` when the sum cannot be made.
        """
        return {}


class ClearRound(RoundProtection):
    """The identity: updates travel in clear and are folded one by one, as they arrive."""

    def __init__(self, aggregator: Aggregator, strategy: Strategy):
        super().__init__()
        self._aggregator = aggregator
        self._strategy = strategy

    def add(self, node: str, reply: TrainReply) -> None:
        self._aggregator.add(reply.params, self._strategy.weight(node, reply.n_samples), node,
                             reply.extras)


class SecureExchange:
    """A secure-aggregation scheme's exchanges for one round, driven over a session."""

    def __init__(self, scheme: SecureAggregation, session: Scatters, *, experiment: str,
                 round: int, nodes: list[str], weights_hint: Mapping[str, float],
                 reference: ParameterSet, weighting: str, timeout: float):
        self.session: ResearcherSession = scheme.researcher_session(
            round, nodes, weights_hint=weights_hint, reference=reference)
        self.scheme = scheme
        self._transport = session
        self._experiment = experiment
        self.round = round
        self._weighting = weighting
        self._timeout = timeout
        self.failures: dict[str, str] = {}

    async def _exchange(self, phase: str, requests: dict[str, dict[str, Any]],
                        record: Callable[[str, Mapping[str, Any]], None]) -> None:
        if not requests:
            return
        bodies = {node: SecaggRequest(phase=phase, payload=msg) for node, msg in requests.items()}
        async for reply in self._transport.scatter(
                bodies, experiment=self._experiment, round=self.round, timeout=self._timeout):
            answer = reply.expect(SecaggReply)
            if answer is None:
                self.failures[reply.node] = f"secure aggregation ({phase}): {reply.why()}"
                continue
            try:
                record(reply.node, answer.payload)
            except ProtocolError as exc:
                self.failures[reply.node] = f"secure aggregation ({phase}): {exc}"

    async def prepare(self) -> None:
        """Run the setup exchanges; nodes that fail them are in :attr:`failures`.

        ``SecureAggregationError`` when too few are left; it says why each node left (a
        node's refusal, say a member outside its peer list, rather than just "no setup").
        """
        s = self.session
        await self._exchange("setup", s.setup_requests(), s.add_setup)
        with self._explained():
            requests = s.share_requests()
        await self._exchange("share_keys", requests, s.add_shares)

    @property
    def participants(self) -> list[str]:
        """The nodes that train and protect their update this round (as :meth:`prepare`)."""
        with self._explained():
            return [n for n in self.session.participants if n not in self.failures]

    @contextlib.contextmanager
    def _explained(self) -> Iterator[None]:
        """Adds the nodes' own reasons to a ``SecureAggregationError`` raised inside."""
        try:
            yield
        except SecureAggregationError as exc:
            if not self.failures:
                raise
            why = "; ".join(f"{n}: {e}" for n, e in sorted(self.failures.items()))
            raise SecureAggregationError(f"{exc} Why: {why}", failures={
                **(exc.failures or {}), **self.failures}) from exc

    def options(self, node: str) -> dict[str, Any]:
        """What ``node``'s request carries for its protection."""
        return {**self.session.train_options(node), "weighting": self._weighting}

    def add(self, node: str, payload: Mapping[str, Any]) -> None:
        """Fold one protected update (``ProtocolError`` when it is malformed)."""
        self.session.add_protected(node, payload)

    async def finish(self) -> SecureSum:
        """The unmask exchange, then the sum (``SecureAggregationError`` when impossible)."""
        await self._exchange("unmask", self.session.unmask_requests(), self.session.add_unmask)
        return self.session.unprotect_sum()


class SecureRound(RoundProtection):
    """Secure aggregation: the researcher learns only the weighted sum of the updates."""

    def __init__(self, exchange: SecureExchange, aggregator: Aggregator):
        super().__init__()
        self.exchange = exchange
        self.name = exchange.scheme.name
        self._aggregator = aggregator
        self.failures = exchange.failures  # one record of who left, whichever exchange

    async def prepare(self) -> None:
        await self.exchange.prepare()

    def participants(self, nodes: list[str]) -> list[str]:
        return [n for n in self.exchange.participants if n in nodes]

    def options(self, node: str) -> dict[str, Any]:
        return self.exchange.options(node)

    def add(self, node: str, reply: TrainReply) -> None:
        self.exchange.add(node, reply.secagg)

    async def finish(self) -> dict[str, Any]:
        before = set(self.failures)
        total = await self.exchange.finish()
        self._aggregator.add_sum(total.sums, total.total_weight, total.report["survivors"],
                                 total.extras)
        clipped = sum(total.report.get("clipped", {}).values())
        if clipped:
            log.warning("Round %d: %d value(s) were clipped to the secure-aggregation range: "
                        "the aggregate is of the clipped updates. Pass a larger clip= to the "
                        "scheme (history column secagg_clipped counts them).",
                        self.exchange.round, clipped)
        for node, err in self.failures.items():  # failed the unmask exchange only
            if node not in before:
                log.warning("Round %d: node %s %s", self.exchange.round, node, err)
        return {"secagg": self.name, "secagg_recovered": len(total.report.get("recovered", [])),
                "secagg_clipped": clipped}


def protection_for(scheme: SecureAggregation | None, session: Scatters,
                   aggregator: Aggregator, strategy: Strategy, *, experiment: str, round: int,
                   nodes: list[str], weights_hint: Mapping[str, float],
                   reference: ParameterSet, timeout: float) -> RoundProtection:
    """The round's protection: :class:`ClearRound` without a scheme, else :class:`SecureRound`."""
    if scheme is None or not nodes:
        return ClearRound(aggregator, strategy)
    exchange = SecureExchange(scheme, session, experiment=experiment, round=round,
                              nodes=nodes, weights_hint=weights_hint, reference=reference,
                              weighting=strategy.weighting, timeout=timeout)
    return SecureRound(exchange, aggregator)

