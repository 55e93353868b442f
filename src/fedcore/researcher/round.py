"""One round of an Experiment: choose the nodes, send the requests, fold the replies.

Kept apart from :mod:`fedcore.researcher.experiment` (the researcher's object and its settings):
:func:`run_round` works on the experiment's state. Under secure aggregation the
round also runs the scheme's exchanges (:mod:`fedcore.researcher.protection`) and folds the
unmasked sum instead of each update.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from fedcore.errors import (
    FedcoreError,
    PlanError,
    RoundError,
    SecureAggregationError,
    TransportError,
)
from fedcore.params import ParameterSet
from fedcore.researcher.protection import SecureRound
from fedcore.researcher.search import describe
from fedcore.wire.messages import Envelope, ErrorReply, TrainReply, TrainRequest
from fedcore.wire.rpc import Client

if TYPE_CHECKING:
    from fedcore.aggregators import Aggregator
    from fedcore.researcher.experiment import Experiment

log = logging.getLogger("fedcore.experiment")


async def _round_nodes(exp: Experiment, rnd: int) -> tuple[Client, list[str], list[str]]:
    """The round's nodes: ``(client, connected selected nodes, selected but gone)``.

    The search is repeated only when the set of connected nodes changed since the last
    one (a node left, or came back after a restart): nothing extra when nothing changed.
    """
    if exp._client is None or exp._targets is None:
        client = await exp._connect()
    else:
        client = exp._client
    peers = frozenset(client.peers())
    if exp._targets is None:
        await exp._find(client, exp._nodes)
        exp._gone = []
    elif peers != exp._searched_peers:
        known = set(exp._targets) | set(exp._nodes or ())
        wanted = None if exp._nodes is None else [n for n in exp._nodes if n in peers]
        log.info("Round %d: the connected nodes changed (%s); searching again.", rnd,
                 ", ".join(sorted(peers)) or "none")
        if wanted == [] or not peers:
            gone = sorted(known)
            raise RoundError(f"Round {rnd}: none of the nodes {gone} is connected to "
                             f"{exp.federation}.",
                             failures=dict.fromkeys(gone, "not connected"))
        await exp._find(client, wanted)
        assert exp._targets is not None
        exp._gone = sorted(n for n in known - set(exp._targets) if n not in peers)
    assert exp._targets is not None
    gone = [n for n in exp._gone if n not in exp._targets]
    selected = exp._strategy.select(sorted({*exp._targets, *gone}), rnd)
    return (client, [n for n in selected if n in exp._targets],
            [n for n in selected if n not in exp._targets])

async def run_round(exp: Experiment) -> pd.DataFrame:
    """Run the experiment's next round; return its rows of history."""
    started = time.perf_counter()
    rnd = exp.round + 1
    client, selected, gone = await _round_nodes(exp, rnd)
    assert exp._targets is not None
    data_info = exp._data_info()
    if exp._params is None:
        exp._params = _initial_parameters(exp, data_info)
    plan_wire = exp._bundle.to_wire()
    agg = exp._aggregator
    agg.start(exp._params, rnd)
    algorithm = agg.round_options()
    deadline = exp._strategy.deadline
    wait = exp.timeout if deadline is None else min(exp.timeout, deadline)
    rows: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    for node in gone:
        rows[node] = _missing(exp, rnd, node, f"Node {node!r} is not connected.", failures)
    secure = None
    if exp._secagg is not None and selected:
        secure = SecureRound(
            exp._secagg, client, experiment=exp.id, round=rnd, nodes=selected,
            weights_hint={n: exp._strategy.weight(n, int(
                (exp._targets[n].get("metadata") or {}).get("n_samples") or 1))
                for n in selected},
            reference=exp._params, weighting=exp._strategy.weighting, timeout=wait)
        await secure.prepare()
        for node, err in secure.failures.items():
            rows[node] = _missing(exp, rnd, node, err, failures)
        selected = [n for n in secure.participants if n in selected]
    bodies = {
        node: TrainRequest(
            plan=plan_wire, params=exp._params, dataset_id=exp._targets[node]["id"],
            model_args=exp._model_args, training_args=exp._training_args,
            data_info=data_info, test_ratio=exp._test_ratio, seed=exp.seed,
            evaluate_global=exp.evaluate_global, evaluate_local=exp.evaluate_local,
            algorithm=algorithm, privacy=exp._privacy,
            secagg=secure.options(node) if secure is not None else {},
        )
        for node in selected
    }
    order = list(bodies)  # sorted node ids: updates are folded in this order
    arrived: dict[str, tuple[Envelope | Exception, float]] = {}
    folded = 0
    async for node, result, seconds in client.scatter(
        bodies, experiment=exp.id, round=rnd, timeout=wait
    ):
        if deadline is not None and isinstance(result, TransportError) and (
                seconds >= deadline * 0.99):
            result = TransportError(f"Node {node!r} missed the round's deadline of "
                                    f"{deadline:g} s.")
        arrived[node] = (result, seconds)
        while folded < len(order) and order[folded] in arrived:
            name = order[folded]
            res, secs = arrived.pop(name)
            rows[name] = _fold(exp, agg, secure, rnd, name, res, secs, failures)
            folded += 1
    if secure is not None:
        await _secure_sum(exp, agg, secure, rnd, rows, failures)
    new_rows = [rows[n] for n in sorted(rows)]
    round_s = time.perf_counter() - started
    for row in new_rows:
        row["round_s"] = round_s
    ok = [r["node"] for r in new_rows if r["status"] == "ok"]
    for node, err in failures.items():
        what = "is missing" if rows[node]["status"] == "missing" else "failed"
        log.warning("Round %d: node %s %s: %s", rnd, node, what, err)
    if len(ok) < exp._strategy.min_nodes:
        exp._history.extend(new_rows)
        detail = "; ".join(f"{n}: {e}" for n, e in failures.items())
        if not ok:
            raise RoundError(f"Round {rnd} failed on every node. {detail}",
                             failures=failures)
        raise RoundError(
            f"Round {rnd} lacks its quorum: {len(ok)} node(s) answered ({', '.join(ok)}), "
            f"the strategy needs {exp._strategy.min_nodes}. Missing or failed: {detail}",
            failures=failures)
    exp._params = agg.result()
    report = getattr(agg, "privacy_report", None)
    if callable(report):  # central DP: what the researcher's noise spent this round
        spent = report()
        for row in new_rows:
            row.update(central_epsilon=spent.get("epsilon"),
                       central_epsilon_total=spent.get("epsilon_total"))
    exp.round = rnd
    exp._history.extend(new_rows)
    frame = pd.DataFrame(new_rows)
    if exp._tensorboard is not None:
        exp._tensorboard.write_round(rnd, frame)
    if exp.checkpoint_dir is not None:
        exp.save(Path(exp.checkpoint_dir) / f"round_{rnd:04d}.fedcore")
    return frame

def _missing(exp: Experiment, rnd: int, node: str, error: str, failures: dict[str, str]
             ) -> dict[str, Any]:
    """The history row of a node that did not answer (gone, too late, disconnected)."""
    failures[node] = error
    dataset = exp._targets[node]["name"] if exp._targets and node in exp._targets else ""
    return {"round": rnd, "node": node, "dataset": dataset, "status": "missing",
            "n_samples": 0, "n_test": 0, "error": error}

async def _secure_sum(exp: Experiment, agg: Aggregator, secure: SecureRound, rnd: int,
                      rows: dict[str, dict[str, Any]], failures: dict[str, str]) -> None:
    """Unmask the round's secure sum and fold it; a failure fails the round's nodes."""
    ok = [n for n, r in rows.items() if r["status"] == "ok"]
    if not ok:
        return
    try:
        total = await secure.finish()
    except SecureAggregationError as exc:
        for node in ok:
            failures[node] = str(exc)
            rows[node].update(status="failed", error=str(exc))
        return
    agg.add_sum(total.sums, total.total_weight, total.report["survivors"], total.extras)
    clipped = sum(total.report.get("clipped", {}).values())
    if clipped:
        log.warning("Round %d: %d value(s) were clipped to the secure-aggregation range: "
                    "the aggregate is of the clipped updates. Pass a larger clip= to the "
                    "scheme (history column secagg_clipped counts them).", rnd, clipped)
    for node in ok:
        rows[node].update(secagg=secure.scheme.name,
                          secagg_recovered=len(total.report.get("recovered", [])),
                          secagg_clipped=clipped)
    for node, err in secure.failures.items():  # failed the unmask exchange only
        if node not in failures:
            log.warning("Round %d: node %s %s", rnd, node, err)

def _fold(exp: Experiment, agg: Aggregator, secure: SecureRound | None, rnd: int, node: str,
          result: Envelope | Exception, seconds: float, failures: dict[str, str]
          ) -> dict[str, Any]:
    if isinstance(result, TransportError):  # no answer: the node is gone or too late
        return {**_missing(exp, rnd, node, str(result), failures), "round_trip_s": seconds}
    row: dict[str, Any] = {"round": rnd, "node": node,
                           "dataset": exp._targets[node]["name"] if exp._targets else "",
                           "status": "ok", "round_trip_s": seconds}
    body = result.body if isinstance(result, Envelope) else None
    if isinstance(body, TrainReply):
        try:
            if secure is not None:
                secure.add(node, body.secagg)
            else:
                agg.add(body.params, exp._strategy.weight(node, body.n_samples), node,
                        body.extras)
        except (ValueError, FedcoreError) as exc:
            body = None
            result = exc
    if isinstance(body, TrainReply):
        row.update(n_samples=body.n_samples, n_test=body.n_test, device=body.device)
        row.update({f"train_{k}": v for k, v in body.train_stats.items()})
        row.update({f"global_{k}": v for k, v in body.metrics_global.items()})
        row.update({f"local_{k}": v for k, v in body.metrics_local.items()})
        row.update(body.timings)
        if body.privacy:  # what DP cost this node, this round and in total
            row.update(privacy=body.privacy.get("mechanism"),
                       privacy_epsilon=body.privacy.get("epsilon"),
                       privacy_epsilon_total=body.privacy.get("epsilon_total"),
                       privacy_delta=body.privacy.get("delta"))
        if body.overrides:  # the node's policy changed the training arguments
            row.update(overrides=dict(body.overrides), policy="; ".join(body.policy_notes))
            log.warning("Round %d: node %s applied its policy: %s", rnd, node,
                        row["policy"] or body.overrides)
        return row
    error = describe(result)
    failures[node] = error
    row.update(status="failed", n_samples=0, n_test=0, error=error)
    if isinstance(body, ErrorReply):
        row["error_kind"] = body.kind
    return row

def _initial_parameters(exp: Experiment, data_info: dict[str, Any]) -> ParameterSet:
    try:
        plan = exp._plan(exp._model_args, exp._training_args, data_info)
        plan.build(seed=exp.seed)
        return ParameterSet(plan.get_parameters()).copy()
    except FedcoreError:
        raise
    except Exception as exc:
        raise PlanError(
            f"The plan failed to build its initial model: {type(exc).__name__}: {exc}",
            exc_type=type(exc).__name__,
        ) from exc
