"""One round of training: send the requests, fold the replies, return a :class:`RoundResult`.

``Round(settings, session, aggregator, protection).run()`` is the whole round as the
researcher sees it. It knows nothing of the :class:`~fedcore.researcher.experiment.Experiment`
that made it: the experiment chooses the nodes and builds the :class:`RoundSettings`, and
applies the result (history, global model, checkpoint, TensorBoard). How updates reach the
aggregator, in clear or through secure aggregation, is the ``protection`` layer
(:mod:`fedcore.researcher.protection`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd

from fedcore.aggregators import Aggregator
from fedcore.errors import FedcoreError, RoundError, SecureAggregationError
from fedcore.params import ParameterSet
from fedcore.researcher._frame import rows_frame
from fedcore.researcher.federation import Federation
from fedcore.researcher.protection import RoundProtection
from fedcore.wire.messages import TrainReply, TrainRequest
from fedcore.wire.rpc import Reply

__all__ = ["Round", "RoundResult", "RoundSettings"]

log = logging.getLogger("fedcore.experiment")


@dataclass(frozen=True)
class RoundSettings:
    """Everything one round needs, fixed when it starts.

    ``nodes`` are the selected nodes that are connected, ``gone`` the selected ones that
    left; ``datasets`` maps each node to the dataset it trains on (a search result).
    ``request`` holds the fields of every node's :class:`~fedcore.wire.messages.TrainRequest`
    but the dataset, the aggregator's options and the protection's.
    """

    experiment: str
    round: int
    nodes: list[str]
    datasets: Mapping[str, Mapping[str, Any]]
    params: ParameterSet
    request: Mapping[str, Any]
    timeout: float
    deadline: float | None = None
    min_nodes: int = 1
    gone: list[str] = field(default_factory=list)

    @property
    def wait(self) -> float:
        """How long the round waits for a reply: the timeout, or the deadline if shorter."""
        return self.timeout if self.deadline is None else min(self.timeout, self.deadline)


@dataclass
class RoundResult:
    """What one round produced: a history row per node, and the new global model.

    ``params`` is ``None`` and ``error`` says why when the round failed (no node answered,
    or fewer than the strategy's quorum); the rows are there either way.
    """

    round: int
    rows: list[dict[str, Any]]
    failures: dict[str, str]
    params: ParameterSet | None = None
    error: RoundError | None = None

    @property
    def ok(self) -> list[str]:
        """The nodes whose update is in the new global model."""
        return [r["node"] for r in self.rows if r["status"] == "ok"]

    @property
    def frame(self) -> pd.DataFrame:
        """The rows as a DataFrame (as :attr:`Experiment.history` shows them)."""
        return rows_frame(self.rows)


class Round:
    """One round: requests out, replies folded into ``aggregator`` through ``protection``."""

    def __init__(self, settings: RoundSettings, session: Federation, aggregator: Aggregator,
                 protection: RoundProtection):
        self.settings = settings
        self.session = session
        self.aggregator = aggregator
        self.protection = protection
        self._rows: dict[str, dict[str, Any]] = {}
        self._failures: dict[str, str] = {}

    async def run(self) -> RoundResult:
        """Run the round; the result holds the rows, and the new model or why there is none."""
        started = time.perf_counter()
        s = self.settings
        self.aggregator.start(s.params, s.round)
        for node in s.gone:
            self._missing(node, f"Node {node!r} is not connected.")
        await self.protection.prepare()
        for node, err in self.protection.failures.items():
            self._missing(node, err)
        await self._train(self.protection.participants(s.nodes))
        await self._finish()
        rows = [self._rows[n] for n in sorted(self._rows)]
        round_s = time.perf_counter() - started
        for row in rows:
            row["round_s"] = round_s
        for node, err in self._failures.items():
            what = "is missing" if self._rows[node]["status"] == "missing" else "failed"
            log.warning("Round %d: node %s %s: %s", s.round, node, what, err)
        result = RoundResult(s.round, rows, self._failures)
        result.error = self._quorum(result)
        if result.error is None:
            result.params = self.aggregator.result()
            self._central_privacy(rows)
        return result

    def _requests(self, nodes: list[str]) -> dict[str, TrainRequest]:
        s = self.settings
        algorithm = self.aggregator.round_options()
        # One copy of the global model for every request, which no one writes any more:
        # in process, the nodes read it where it is (no frame of its own for each).
        params = s.params.snapshot()
        return {node: TrainRequest(params=params, dataset_id=s.datasets[node]["id"],
                                   algorithm=algorithm, secagg=self.protection.options(node),
                                   **s.request)
                for node in nodes}

    async def _train(self, nodes: list[str]) -> None:
        """Send the training requests; fold replies in node order, each once it is in."""
        s = self.settings
        order = sorted(nodes)  # updates are folded in this order, whatever the arrival
        arrived: dict[str, Reply] = {}
        folded = 0
        client = await self.session.client()  # its scatter as Federation.scatter's, unwrapped
        async for reply in client.scatter(self._requests(order), experiment=s.experiment,
                                          round=s.round, timeout=s.wait):
            if s.deadline is not None and reply.missing and reply.seconds >= s.deadline * 0.99:
                reply = replace(reply, error=f"TransportError: Node {reply.node!r} missed the "
                                             f"round's deadline of {s.deadline:g} s.")
            arrived[reply.node] = reply
            while folded < len(order) and order[folded] in arrived:
                self._fold(arrived.pop(order[folded]))
                folded += 1

    def _fold(self, reply: Reply) -> None:
        node = reply.node
        if reply.missing:  # no answer: the node is gone or too late
            self._missing(node, reply.why())
            self._rows[node]["round_trip_s"] = reply.seconds
            return
        row = self._row(node, "ok")
        row["round_trip_s"] = reply.seconds
        body = reply.expect(TrainReply)
        error = ""
        if body is not None:
            try:
                self.protection.add(node, body)
            except (ValueError, FedcoreError) as exc:
                body, error = None, f"{type(exc).__name__}: {exc}"
        if body is None:
            error = error or reply.why()
            self._failures[node] = error
            row.update(status="failed", n_samples=0, n_test=0, error=error)
            if reply.remote:
                row["error_kind"] = reply.kind
            return
        row.update(_reply_columns(body))
        if body.overrides:  # the node's policy changed the training arguments
            log.warning("Round %d: node %s applied its policy: %s", self.settings.round, node,
                        row["policy"] or body.overrides)

    async def _finish(self) -> None:
        """Complete the protection's sum; a failure fails every node that contributed."""
        ok = [n for n, r in self._rows.items() if r["status"] == "ok"]
        if not ok:
            return
        try:
            columns = await self.protection.finish()
        except SecureAggregationError as exc:
            for node in ok:
                self._failures[node] = str(exc)
                self._rows[node].update(status="failed", error=str(exc))
            return
        for node in ok:
            self._rows[node].update(columns)

    def _quorum(self, result: RoundResult) -> RoundError | None:
        ok, need = result.ok, self.settings.min_nodes
        if len(ok) >= need:
            return None
        detail = "; ".join(f"{n}: {e}" for n, e in self._failures.items())
        if not ok:
            return RoundError(f"Round {result.round} failed on every node. {detail}",
                              failures=self._failures)
        return RoundError(
            f"Round {result.round} lacks its quorum: {len(ok)} node(s) answered "
            f"({', '.join(ok)}), the strategy needs {need}. Missing or failed: {detail}",
            failures=self._failures)

    def _central_privacy(self, rows: list[dict[str, Any]]) -> None:
        report = getattr(self.aggregator, "privacy_report", None)
        if callable(report):  # central DP: what the researcher's noise spent this round
            spent = report()
            for row in rows:
                row.update(central_epsilon=spent.get("epsilon"),
                           central_epsilon_total=spent.get("epsilon_total"))

    def _row(self, node: str, status: str) -> dict[str, Any]:
        dataset = self.settings.datasets.get(node, {}).get("name", "")
        row: dict[str, Any] = {"round": self.settings.round, "node": node, "dataset": dataset,
                               "status": status}
        self._rows[node] = row
        return row

    def _missing(self, node: str, error: str) -> None:
        """The row of a node that did not answer (gone, too late, disconnected)."""
        self._failures[node] = error
        self._row(node, "missing").update(n_samples=0, n_test=0, error=error)


def _reply_columns(body: TrainReply) -> dict[str, Any]:
    """A training reply's history columns: counts, metrics, timings, privacy, policy."""
    row: dict[str, Any] = {"n_samples": body.n_samples, "n_test": body.n_test,
                           "device": body.device}
    row.update({f"train_{k}": v for k, v in body.train_stats.items()})
    row.update({f"global_{k}": v for k, v in body.metrics_global.items()})
    row.update({f"local_{k}": v for k, v in body.metrics_local.items()})
    row.update(body.timings)
    if body.privacy:  # what DP cost this node, this round and in total
        row.update(privacy=body.privacy.get("mechanism"),
                   privacy_epsilon=body.privacy.get("epsilon"),
                   privacy_epsilon_total=body.privacy.get("epsilon_total"),
                   privacy_delta=body.privacy.get("delta"))
        withheld = body.privacy.get("withheld")
        if withheld:  # metrics the node kept: no noise covers them
            row.update(privacy_withheld=", ".join(map(str, withheld)))
    if body.overrides:
        row.update(overrides=dict(body.overrides), policy="; ".join(body.policy_notes))
    return row
