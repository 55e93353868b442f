"""The researcher's session (Federation), the Round object and typed scatter replies."""

from __future__ import annotations

import asyncio

import numpy as np
import pandas as pd
import pytest

from fedcore import Experiment, FedAvg, FederatedStatistics, Federation, simulate
from fedcore.errors import ConfigurationError
from fedcore.researcher.federation import Selection
from fedcore.researcher.protection import ClearRound
from fedcore.researcher.round import Round, RoundSettings
from fedcore.researcher.strategies import AllNodes
from fedcore.wire.messages import Ping, Pong, SearchReply, SearchRequest, TrainRequest

pytest.importorskip("sklearn")

from sklearn.linear_model import SGDClassifier  # noqa: E402

from fedcore_sklearn import SklearnTrainingPlan  # noqa: E402


class Plan(SklearnTrainingPlan):
    estimator = SGDClassifier


ARGS = dict(tags=["t"], model_args={"loss": "log_loss", "alpha": 1e-3},
            training_args={"epochs": 1, "batch_size": 16}, progress=False, seed=3)


def _data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(240, 4))
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int)
    return X, y


def test_one_session_serves_an_experiment_and_statistics_and_outlives_them():
    X, y = _data()
    frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(4)]).assign(y=y)
    args = {**ARGS, "model_args": {**ARGS["model_args"], "target": "y"}}
    with simulate.from_dataframe(frame, target="y", n_nodes=3, tags=["t"], seed=0) as sim:
        with Federation(sim.url) as fed:
            found = fed.search(["t"])
            assert sorted(found["node"]) == ["node-01", "node-02", "node-03"]
            exp = Experiment(Plan, federation=fed, **args)
            assert exp.session is fed and exp.federation == sim.url
            exp.run(2)
            stats = exp.statistics()
            assert stats.session is fed  # the experiment's connection, not a second one
            pooled = stats.describe("x0").loc[("x0", "pooled")]
            assert pooled["count"] == 240
            stats.close()
            exp.close()
            assert fed.connected  # closing the tools leaves the caller's session open
            status = fed.node_status()
            assert status["answers"].all() and len(status) == 3
        assert not fed.connected
        # The same experiment over a URL (its own session) trains to the same model.
        alone = Experiment(Plan, federation=sim.url, **args)
        alone.run(2)
        alone.close()
        for name, value in alone.parameters.items():
            np.testing.assert_array_equal(exp.parameters[name], value)


def test_a_round_runs_on_its_own_and_returns_rows_and_the_new_model():
    X, y = _data()
    with simulate.from_arrays(X, y, n_nodes=2, tags=["t"], seed=0) as sim:
        exp = Experiment(Plan, federation=sim.url, **ARGS)
        exp.run_once()  # the reference: the experiment's own second round follows
        start = exp.parameters
        fed = Federation(sim.url)
        selection = Selection(["t"])

        async def one_round():
            nodes, gone = await selection.for_round(fed, 2)
            agg = FedAvg()
            settings = RoundSettings(
                experiment=exp.id, round=2, nodes=nodes, datasets=selection.targets,
                params=start, timeout=30.0, gone=gone,
                request=dict(plan=exp._bundle.to_wire(), model_args=exp.model_args,
                             training_args=exp.training_args, data_info=exp._data_info(),
                             test_ratio=exp.test_ratio, seed=exp.seed,
                             evaluate_global=True, evaluate_local=True, privacy={}))
            return await Round(settings, fed, agg, ClearRound(agg, AllNodes())).run()

        from fedcore import _runtime

        result = _runtime.run(one_round())
        fed.close()
        assert result.error is None and result.ok == ["node-01", "node-02"]
        assert [r["round"] for r in result.rows] == [2, 2]
        exp.run_once()
        exp.close()
        for name, value in exp.parameters.items():
            np.testing.assert_array_equal(result.params[name], value)


def test_scatter_replies_are_typed_answers_or_errors_against_one_node():
    X, y = _data()
    with simulate.from_arrays(X, y, n_nodes=2, tags=["t"], seed=0) as sim:
        fed = Federation(sim.url)

        async def ask():
            client = await fed.client(["node-01", "node-02"])
            pings = [r async for r in client.scatter({"node-01": Ping(), "node-02": Ping()})]
            bad = {"node-01": TrainRequest(plan={}, params=None, dataset_id="nope"),
                   "node-02": SearchRequest(tags=["t"])}
            mixed = {r.node: r async for r in client.scatter(bad, timeout=10)}
            return pings, mixed

        from fedcore import _runtime

        pings, mixed = _runtime.run(ask())
        fed.close()
    assert {r.node for r in pings} == {"node-01", "node-02"}
    assert all(isinstance(r.expect(Pong), Pong) and r.error is None for r in pings)
    refused, answered = mixed["node-01"], mixed["node-02"]
    assert refused.body is None and refused.remote and refused.error
    assert refused.expect(SearchReply) is None and not refused.missing
    assert isinstance(answered.expect(SearchReply), SearchReply)
    assert answered.expect(Pong) is None and "unexpected reply" in answered.why()


def test_async_twins_work_inside_a_running_loop_and_say_what_they_twin():
    X, y = _data()
    with simulate.from_arrays(X, y, n_nodes=2, tags=["t"], seed=0) as sim:
        exp = Experiment(Plan, federation=sim.url, **ARGS)

        async def notebook_cell():
            found = await exp.asearch()
            await exp.arun_once()
            return found

        found = asyncio.run(notebook_cell())
        exp.close()
    assert len(found) == 2 and exp.round == 1
    assert "Find the datasets" in Experiment.search.__doc__
    assert Experiment.asearch.__doc__ == "Async twin of :meth:`search`."
    assert Experiment.asearch.__name__ == "asearch"


def test_a_federation_needs_a_url():
    with pytest.raises(ConfigurationError, match="Expected a federation URL"):
        Federation("")
    with pytest.raises(ConfigurationError, match="Expected a federation URL"):
        FederatedStatistics(None, tags=["t"])  # type: ignore[arg-type]


def test_scatter_gives_every_peer_one_reply_whatever_became_of_its_request():
    from fedcore import _runtime
    from fedcore_transport.inprocess import InProcessTransport

    X, y = _data()
    with simulate.from_arrays(X, y, n_nodes=2, tags=["t"], seed=0) as sim:
        fed = Federation(sim.url)
        silent = InProcessTransport(sim.url, role="node", identity="silent")

        async def ask():
            await silent.start()  # connected, never answers
            client = await fed.client(["node-01", "node-02"])
            bodies = dict.fromkeys(["node-01", "ghost", "silent", "node-02"], Ping())
            replies = [r async for r in client.scatter(bodies, timeout=2.0)]
            await silent.close()
            return replies, dict(client._pending), dict(client._awaiting)

        replies, pending, awaiting = _runtime.run(ask())
        fed.close()
    by_node = {r.node: r for r in replies}
    assert len(replies) == 4 and set(by_node) == {"node-01", "node-02", "ghost", "silent"}
    assert [r.node for r in replies][-1] == "silent"  # the one that timed out comes last
    assert isinstance(by_node["node-01"].expect(Pong), Pong)
    assert isinstance(by_node["node-02"].expect(Pong), Pong)
    assert by_node["ghost"].missing and "No peer 'ghost'" in by_node["ghost"].why()
    assert by_node["silent"].missing and "did not answer ping within 2 s" in \
        by_node["silent"].why()
    assert pending == {} and awaiting == {}  # nothing of the scatter is left behind


def test_a_body_that_cannot_be_sent_fails_its_node_only():
    from fedcore import _runtime

    X, y = _data()
    with simulate.from_arrays(X, y, n_nodes=2, tags=["t"], seed=0) as sim:
        fed = Federation(sim.url)

        async def ask():
            client = await fed.client(["node-01", "node-02"])
            bodies = {"node-01": SearchRequest(tags=["t", object()]),  # type: ignore[list-item]
                      "node-02": SearchRequest(tags=["t"])}
            return {r.node: r async for r in client.scatter(bodies, timeout=10)}

        replies = _runtime.run(ask())
        fed.close()
    assert replies["node-01"].kind == "protocol" and not replies["node-01"].remote
    assert "Cannot send a object" in replies["node-01"].why()
    assert isinstance(replies["node-02"].expect(SearchReply), SearchReply)
