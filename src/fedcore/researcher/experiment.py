"""Experiment: the researcher's interactive object."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from fedcore import _runtime, plugins
from fedcore._files import write_atomic
from fedcore.aggregators import Aggregator
from fedcore.aggregators._local import check_supported
from fedcore.data import merge_metadata
from fedcore.errors import ConfigurationError, ProtocolError
from fedcore.params import ParameterSet
from fedcore.plan import PlanBundle, TrainingPlan, check_training_args
from fedcore.privacy.spec import PrivacySpec
from fedcore.researcher import monitoring
from fedcore.researcher import round as _rounds
from fedcore.researcher.search import describe, find_datasets
from fedcore.researcher.strategies import AllNodes, Strategy, from_params
from fedcore.secagg import SecureAggregation, scheme_of
from fedcore.transport import open_transport
from fedcore.wire import codec
from fedcore.wire.messages import (
    Checkpoint,
    Envelope,
    Ping,
    PlanStatus,
    PlanStatusRequest,
    PlanSubmit,
    Pong,
    TrainProgress,
)
from fedcore.wire.rpc import Client, credentials

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from fedcore.researcher.statistics import FederatedStatistics

__all__ = ["Experiment"]

log = logging.getLogger("fedcore.experiment")

_CHECKPOINT_VERSION = 1
_SETTLE_S = 0.5  # quiet time that ends the wait for nodes when none are named
_PING_S = 5.0  # the longest wait for a ping's answer in nodes()


class Experiment:
    """Train ``plan`` on the datasets tagged ``tags`` across a federation, round by round.

    The same code runs in simulation (``federation="inproc://name"``) and against deployed
    nodes; only the URL changes. Every setting is a constructor argument and a property that
    may change between rounds. Synchronous methods work in scripts and inside Jupyter; each
    has an async twin (``asearch``, ``arun``, ``arun_once``).

    On a networked federation, frames are signed with the researcher's key (``identity``:
    a key file, default ``$FEDCORE_IDENTITY`` or ``~/.fedcore/researcher.key``) and only
    the nodes in ``enrolled`` (``{node_id: public key}`` or a ``nodes.toml`` path, default
    ``~/.fedcore/nodes.toml``) are accepted; see :mod:`fedcore.wire.identity`.

    Example::

        exp = Experiment(MyPlan, tags=["breast-cancer"], federation=fed.url,
                         training_args={"epochs": 1}, round_limit=5)
        exp.run()
        exp.history          # one row per node and round
        exp.plot()           # training curves; tensorboard="runs/x" logs every round
        exp.parameters       # the global model
    """

    def __init__(
        self,
        plan: type[TrainingPlan],
        *,
        tags: Sequence[str],
        federation: str,
        model_args: Mapping[str, Any] | None = None,
        training_args: Mapping[str, Any] | None = None,
        aggregator: str | Aggregator = "fedavg",
        strategy: Strategy | None = None,
        round_limit: int | None = None,
        nodes: Sequence[str] | None = None,
        test_ratio: float = 0.2,
        seed: int = 0,
        evaluate_global: bool = True,
        evaluate_local: bool = True,
        checkpoint_dir: str | Path | None = None,
        timeout: float = 600.0,
        connect_timeout: float = 10.0,
        progress: bool = True,
        name: str | None = None,
        identity: str | Path | None = None,
        enrolled: Mapping[str, str] | str | Path | None = None,
        tensorboard: str | Path | None = None,
        secagg: str | SecureAggregation | None = None,
        privacy: Mapping[str, Any] | None = None,
    ):
        self.plan = plan
        self.tags = tags
        self.federation = federation
        self.model_args = model_args or {}
        self.training_args = training_args or {}
        self._secagg: SecureAggregation | None = None
        self._strategy: Strategy = AllNodes()
        self.aggregator = aggregator
        self.secagg = secagg
        self.privacy = privacy
        self.strategy = strategy
        self.round_limit = round_limit
        self.nodes = nodes
        self.test_ratio = test_ratio
        self.seed = int(seed)
        self.evaluate_global = evaluate_global
        self.evaluate_local = evaluate_local
        self.checkpoint_dir = checkpoint_dir
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.progress = progress
        self.name = name or "experiment"
        self.identity = identity
        self.enrolled = enrolled
        self.tensorboard = tensorboard
        self.id = uuid.uuid4().hex
        self.round = 0
        self._params: ParameterSet | None = None
        self._history: list[dict[str, Any]] = []
        self._targets: dict[str, dict[str, Any]] | None = None
        self._searched_peers: frozenset[str] = frozenset()  # connected at the last search
        self._gone: list[str] = []  # nodes that held the data but left the federation
        self._client: Client | None = None
        self._live: dict[str, dict[str, Any]] = {}  # node -> its latest training progress
        self._bar: Any = None  # run()'s progress bar, while it runs
        self._saved_data_info: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (
            f"Experiment({self._plan.__name__}, tags={self._tags}, "
            f"federation={self.federation!r}, round={self.round}/{self._round_limit}, "
            f"aggregator={self._aggregator!r})"
        )

    # --- configuration (validated setters) --------------------------------------------------

    @property
    def plan(self) -> type[TrainingPlan]:
        """The training plan class; setting it ships new source (nodes may re-approve)."""
        return self._plan

    @plan.setter
    def plan(self, plan: type[TrainingPlan]) -> None:
        bundle = PlanBundle.from_class(plan)
        # The aggregator's node side (FedProx, SCAFFOLD...) must be able to run on this plan.
        check_supported(getattr(self, "_aggregator", None), plan)
        self._bundle = bundle
        self._plan = plan

    @property
    def plan_hash(self) -> str:
        """SHA-256 of the shipped plan, as node administrators see it."""
        return self._bundle.sha256

    @property
    def tags(self) -> list[str]:
        """Dataset tags to train on; changing them repeats the search."""
        return list(self._tags)

    @tags.setter
    def tags(self, tags: Sequence[str]) -> None:
        if isinstance(tags, str):
            tags = [tags]
        if not tags:
            raise ConfigurationError("Expected at least one dataset tag. Received: []")
        self._tags = [str(t) for t in tags]
        self._targets = None

    @property
    def nodes(self) -> list[str] | None:
        """Only these nodes take part (``None``: every node with matching data)."""
        return None if self._nodes is None else list(self._nodes)

    @nodes.setter
    def nodes(self, nodes: Sequence[str] | None) -> None:
        self._nodes = None if nodes is None else [str(n) for n in nodes]
        self._targets = None

    @property
    def model_args(self) -> dict[str, Any]:
        """Arguments that shape the model; may change between rounds."""
        return dict(self._model_args)

    @model_args.setter
    def model_args(self, value: Mapping[str, Any]) -> None:
        self._model_args = _as_dict(value, "model_args")

    @property
    def training_args(self) -> dict[str, Any]:
        """Arguments of local training (epochs, batch size, learning rate...)."""
        return dict(self._training_args)

    @training_args.setter
    def training_args(self, value: Mapping[str, Any]) -> None:
        value = _as_dict(value, "training_args")
        check_training_args(self.plan, value)  # a misspelt key fails here, not on the nodes
        self._training_args = value

    @property
    def aggregator(self) -> Aggregator:
        """How node updates become the next global model."""
        return self._aggregator

    @aggregator.setter
    def aggregator(self, value: str | Aggregator) -> None:
        if isinstance(value, str):
            value = plugins.load("aggregators", value)()
        if not isinstance(value, Aggregator):
            raise ConfigurationError(
                f"Expected an Aggregator or a registered aggregator name. Received: {value!r}"
            )
        check_supported(value, self.plan)  # refused now, not on every node in round 1
        _check_secure(value, self._secagg, self._strategy)
        self._aggregator = value

    @property
    def secagg(self) -> SecureAggregation | None:
        """Secure aggregation (:mod:`fedcore.secagg`): the researcher learns only the sum.

        ``"masking"`` (pairwise masking, survives nodes that drop out), ``"joye-libert"``
        (homomorphic encryption), a configured scheme object, or ``None`` (updates in
        clear). Needs a sum-only aggregator (FedAvg, FedProx, SCAFFOLD, FedAdam...).
        """
        return self._secagg

    @secagg.setter
    def secagg(self, value: str | SecureAggregation | None) -> None:
        value = scheme_of(value)
        _check_secure(self._aggregator, value, self._strategy)
        self._secagg = value

    @property
    def privacy(self) -> dict[str, Any]:
        """Differential privacy asked of every node (``{}``: none); see the DP docs.

        ``{"mechanism": "update", "clip": 1.0, "noise_multiplier": 1.1, "delta": 1e-5}``
        (update-level DP, any backend) or ``"mechanism": "dp-sgd"`` (torch, through
        Opacus). Each node reports what it spent in :attr:`history` (``privacy_epsilon``,
        ``privacy_epsilon_total``) and may refuse a round that would exceed its budget.
        """
        return dict(self._privacy)

    @privacy.setter
    def privacy(self, value: Mapping[str, Any] | None) -> None:
        spec = PrivacySpec.parse(value)
        self._privacy = {} if spec is None else spec.to_dict()

    @property
    def strategy(self) -> Strategy:
        """Which nodes train each round, the quorum and the deadline.

        See :mod:`fedcore.researcher.strategies`.

        Default :class:`~fedcore.researcher.strategies.AllNodes`: every node holding the data, no
        deadline beyond ``timeout``, and a round counts when at least one node answered.
        """
        return self._strategy

    @strategy.setter
    def strategy(self, value: Strategy | None) -> None:
        if value is None:
            value = AllNodes()
        if not isinstance(value, Strategy):
            raise ConfigurationError(
                f"Expected a fedcore.researcher.strategies.Strategy (e.g. AllNodes(), "
                f"Fraction(0.5)). "
                f"Received: {value!r}")
        _check_secure(self._aggregator, self._secagg, value)
        self._strategy = value

    @property
    def test_ratio(self) -> float:
        """Fraction of each node's samples held out for evaluation."""
        return self._test_ratio

    @test_ratio.setter
    def test_ratio(self, value: float) -> None:
        if not 0.0 <= float(value) < 1.0:
            raise ConfigurationError(f"test_ratio must be in [0, 1). Received: {value!r}")
        self._test_ratio = float(value)

    @property
    def round_limit(self) -> int | None:
        """Total number of rounds :meth:`run` goes up to."""
        return self._round_limit

    @round_limit.setter
    def round_limit(self, value: int | None) -> None:
        if value is not None and int(value) < 0:
            raise ConfigurationError(f"round_limit must be >= 0. Received: {value!r}")
        self._round_limit = None if value is None else int(value)

    @property
    def tensorboard(self) -> Path | None:
        """TensorBoard log folder: each completed round is appended (``docs/monitoring.md``)."""
        return None if self._tensorboard is None else self._tensorboard.logdir

    @tensorboard.setter
    def tensorboard(self, logdir: str | Path | None) -> None:
        self._tensorboard = None if logdir is None else monitoring.TensorBoardWriter(logdir)

    # --- results ----------------------------------------------------------------------------

    @property
    def parameters(self) -> ParameterSet | None:
        """The global model's parameters (``None`` before the first round)."""
        return self._params

    @property
    def history(self) -> pd.DataFrame:
        """One row per node and round: status, sample counts, metrics, durations, errors."""
        return pd.DataFrame(self._history)

    def metrics(self, which: str = "global") -> pd.DataFrame:
        """Per-round metrics averaged over nodes, weighted by their test-sample counts.

        ``which="global"`` evaluates the model each round started from (the aggregated
        model of the round before); ``"local"`` the nodes' updates; ``"train"`` averages
        what local training reported (``loss``...), weighted by training samples.
        """
        return monitoring.round_metrics(self.history, which)

    def plot(self, metric: str = "accuracy", which: str = "global",
             path: str | Path | None = None, ax: Axes | None = None) -> Figure:
        """Training curves of ``metric``: one line per node, their weighted mean in bold.

        See :func:`fedcore.researcher.monitoring.plot`; needs ``pip install "fedcore[plot]"``.
        """
        return monitoring.plot(self.history, metric, which, path=path, ax=ax)

    @property
    def live(self) -> pd.DataFrame:
        """What each node last reported while training, one row per node.

        Nodes report during long local training (about once a second): ``round``,
        ``step``, ``epoch``, ``loss`` (mean training loss so far), ``samples``, ``fraction``
        of the round's local work, ``elapsed_s``. The progress bar of :meth:`run` shows the
        latest loss too. Rounds shorter than a second report nothing.
        """
        return pd.DataFrame(list(self._live.values()),
                            columns=["node", "round", "step", "epoch", "loss", "samples",
                                     "fraction", "elapsed_s"])

    def _on_progress(self, node: str, env: Envelope) -> None:
        body = env.body
        assert isinstance(body, TrainProgress)
        self._live[node] = {"node": node, "round": env.round, "step": body.step,
                            "epoch": body.epoch, "loss": body.loss, "samples": body.samples,
                            "fraction": body.fraction, "elapsed_s": body.elapsed_s}
        log.debug("Round %d: node %s at step %d, loss %s", env.round, node, body.step,
                  body.loss)
        if self._bar is not None:
            losses = [r["loss"] for r in self._live.values()
                      if r["round"] == env.round and r["loss"] is not None]
            done = [r["fraction"] for r in self._live.values()
                    if r["round"] == env.round and r["fraction"] is not None]
            postfix = {"training": f"{len(losses)} node(s)"}
            if losses:
                postfix["loss"] = f"{sum(losses) / len(losses):.4f}"
            if done:
                postfix["local"] = f"{100 * min(done):.0f}%"
            self._bar.set_postfix(postfix)

    def statistics(self) -> FederatedStatistics:
        """Federated statistics over this experiment's datasets (same tags and nodes).

        ``exp.statistics().describe(["age"])`` and the like: see
        :mod:`fedcore.researcher.statistics`.
        With the experiment's secure aggregation, if it has one (only pooled results).
        """
        from fedcore.researcher.statistics import FederatedStatistics

        return FederatedStatistics(self.federation, self._tags, nodes=self._nodes,
                                   timeout=self.timeout, connect_timeout=self.connect_timeout,
                                   identity=self.identity, enrolled=self.enrolled,
                                   secagg=self._secagg)

    def trained_plan(self) -> TrainingPlan:
        """A plan instance holding the global model, for use on local data.

        ``trained_plan().model`` is the backend's model (an estimator, a ``torch.nn.Module``).
        """
        if self._params is None:
            raise ConfigurationError("No global model yet: run at least one round.")
        plan = self._plan(self._model_args, self._training_args, self._data_info())
        plan.build(seed=self.seed)
        plan.set_parameters(self._params)
        return plan

    # --- network ----------------------------------------------------------------------------

    async def _connect(self) -> Client:
        settle = 0.0
        if self._client is None:
            transport = open_transport(self.federation, role="researcher",
                                       identity=f"researcher-{self.id[:8]}")
            client = Client(transport, **credentials(transport, self.identity, self.enrolled))
            client.on_progress = self._on_progress
            await client.start()
            self._client = client
            # Networked nodes dial in one after another: without a node list, give the
            # stragglers a moment before the first search.
            if transport.capabilities.networked and not self._nodes:
                settle = _SETTLE_S
        wanted = len(self._nodes) if self._nodes else 1
        await self._client.wait_for_peers(wanted, self.connect_timeout, settle=settle)
        return self._client

    async def _close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def close(self) -> None:
        """Disconnect from the federation (the experiment can reconnect later)."""
        _runtime.run(self._close())

    def __enter__(self) -> Experiment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _search(self) -> pd.DataFrame:
        return await self._find(await self._connect(), self._nodes)

    async def _find(self, client: Client, nodes: Sequence[str] | None) -> pd.DataFrame:
        self._searched_peers = frozenset(client.peers())
        found = await find_datasets(client, self.federation, self._tags, nodes,
                                    timeout=self.connect_timeout, experiment=self.id)
        self._targets = found.targets
        return pd.DataFrame(found.rows, columns=["node", "dataset", "name", "tags",
                                                 "available", "n_samples", "metadata"])

    def search(self) -> pd.DataFrame:
        """Find the datasets tagged ``tags``: one row per node and dataset."""
        return _runtime.run(self._search())

    async def _nodes_frame(self) -> pd.DataFrame:
        client = self._client or await self._connect()
        peers = client.peers()
        pongs: dict[str, tuple[Pong | None, float | None]] = {}
        async for node, result, seconds in client.scatter(
                dict.fromkeys(sorted(peers), Ping()), experiment=self.id,
                timeout=min(self.connect_timeout, _PING_S)):
            if isinstance(result, Envelope) and isinstance(result.body, Pong):
                pongs[node] = (result.body, seconds)
        known = {*peers, *(self._targets or {}), *(self._nodes or ()), *self._gone,
                 *client.last_heard}
        rows = []
        for node in sorted(known):
            pong, ping_s = pongs[node] if node in pongs else (None, None)
            heard = client.last_heard.get(node)
            rows.append({
                "node": node, "connected": node in peers, "answers": pong is not None,
                "last_seen": pd.Timestamp(heard, unit="s", tz="UTC") if heard else pd.NaT,
                "ping_s": ping_s, "name": pong.name if pong else None,
                "dataset": (self._targets or {}).get(node, {}).get("name"),
            })
        return pd.DataFrame(rows, columns=["node", "connected", "answers", "last_seen",
                                           "ping_s", "name", "dataset"])

    def node_status(self) -> pd.DataFrame:
        """Liveness: one row per node this experiment knows of or sees connected.

        Columns: ``connected`` (its connection is up now), ``answers`` (it answered a ping
        just now), ``last_seen`` (UTC time of its latest message), ``ping_s`` (round trip),
        ``name``, and ``dataset``: the dataset matching the tags, once searched. A node that
        dropped out stays listed with ``connected=False`` and when it was last heard from.
        """
        return _runtime.run(self._nodes_frame())

    def _data_info(self) -> dict[str, Any]:
        if self._targets is None:
            return dict(self._saved_data_info)
        return merge_metadata([t["metadata"] for t in self._targets.values()])

    # --- rounds (the round itself is in fedcore.researcher.round) --------------------------------

    async def _run_once(self) -> pd.DataFrame:
        return await _rounds.run_round(self)

    def run_once(self) -> pd.DataFrame:
        """Run one round; return its rows of :attr:`history`."""
        return _runtime.run(self._run_once())

    async def _run(self, rounds: int | None) -> pd.DataFrame:
        if rounds is None:
            if self._round_limit is None:
                raise ConfigurationError(
                    "Give run() a number of rounds, or set round_limit on the experiment."
                )
            rounds = max(self._round_limit - self.round, 0)
        elif self._round_limit is not None:
            rounds = min(int(rounds), max(self._round_limit - self.round, 0))
        from tqdm.auto import tqdm

        with tqdm(total=rounds, desc=self.name, unit="round", disable=not self.progress) as bar:
            self._bar = bar
            try:
                for _ in range(rounds):
                    rows = await self._run_once()
                    bar.set_postfix(_postfix(rows), refresh=False)
                    bar.update(1)
            finally:
                self._bar = None
        return self.history

    def run(self, rounds: int | None = None) -> pd.DataFrame:
        """Run ``rounds`` more rounds (default: up to ``round_limit``); return the history."""
        return _runtime.run(self._run(rounds))

    # --- plan review ------------------------------------------------------------------------

    async def _plan_rows(self, body: PlanSubmit | PlanStatusRequest) -> pd.DataFrame:
        client = await self._connect()
        if self._targets is None:
            await self._search()
        assert self._targets is not None
        rows: list[dict[str, Any]] = []
        async for node, result, _ in client.scatter(
            dict.fromkeys(self._targets, body), experiment=self.id,
            timeout=self.connect_timeout,
        ):
            reply = result.body if isinstance(result, Envelope) else None
            if isinstance(reply, PlanStatus):
                rows.append({"node": node, "plan_hash": reply.plan_hash, "status": reply.status,
                             "note": reply.note, "approval_required": reply.approval_required})
            else:
                rows.append({"node": node, "plan_hash": self.plan_hash, "status": "error",
                             "note": describe(result), "approval_required": None})
        return pd.DataFrame(sorted(rows, key=lambda r: r["node"]),
                            columns=["node", "plan_hash", "status", "note",
                                     "approval_required"])

    def submit_plan(self, message: str = "") -> pd.DataFrame:
        """Submit the plan for review to the nodes holding the datasets; one row per node.

        Nodes that require approval run a plan only once their administrator approved its
        SHA-256 (:attr:`plan_hash`). ``message`` goes to the reviewers. Each row gives the
        node's ``status`` (``pending``, ``approved``, ``rejected``) and ``note``.
        """
        return _runtime.run(self._plan_rows(PlanSubmit(plan=self._bundle.to_wire(),
                                                       message=message)))

    def plan_status(self) -> pd.DataFrame:
        """Where the plan stands on each node (``unknown`` where it was never submitted)."""
        return _runtime.run(self._plan_rows(PlanStatusRequest(plan_hash=self.plan_hash)))

    # --- async twins: the work always runs on fedcore's loop, awaited from any loop ---------

    async def anode_status(self) -> pd.DataFrame:
        """Async twin of :meth:`node_status`."""
        return await _runtime.run_async(self._nodes_frame())

    async def asearch(self) -> pd.DataFrame:
        """Async twin of :meth:`search`."""
        return await _runtime.run_async(self._search())

    async def arun_once(self) -> pd.DataFrame:
        """Async twin of :meth:`run_once`."""
        return await _runtime.run_async(self._run_once())

    async def arun(self, rounds: int | None = None) -> pd.DataFrame:
        """Async twin of :meth:`run`."""
        return await _runtime.run_async(self._run(rounds))

    async def asubmit_plan(self, message: str = "") -> pd.DataFrame:
        """Async twin of :meth:`submit_plan`."""
        return await _runtime.run_async(self._plan_rows(
            PlanSubmit(plan=self._bundle.to_wire(), message=message)))

    async def aplan_status(self) -> pd.DataFrame:
        """Async twin of :meth:`plan_status`."""
        return await _runtime.run_async(self._plan_rows(
            PlanStatusRequest(plan_hash=self.plan_hash)))

    async def aclose(self) -> None:
        """Async twin of :meth:`close`."""
        await _runtime.run_async(self._close())

    # --- checkpoints ------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the experiment to one file, atomically (never a half-written checkpoint)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "format": _CHECKPOINT_VERSION,
            "id": self.id, "name": self.name, "round": self.round,
            "round_limit": self._round_limit, "tags": self._tags, "nodes": self._nodes,
            "federation": self.federation, "model_args": self._model_args,
            "training_args": self._training_args, "test_ratio": self._test_ratio,
            "seed": self.seed, "evaluate_global": self.evaluate_global,
            "evaluate_local": self.evaluate_local, "timeout": self.timeout,
            "connect_timeout": self.connect_timeout,
            "checkpoint_dir": None if self.checkpoint_dir is None else str(self.checkpoint_dir),
            "tensorboard": None if self.tensorboard is None else str(self.tensorboard),
            "plan": self._bundle.to_wire(),
            "aggregator": {"name": self._aggregator.name,
                           "params": self._aggregator.get_params()},
            "secagg": None if self._secagg is None else {
                "name": self._secagg.name, "params": self._secagg.wire_params()},
            "privacy": self._privacy,
            "strategy": {"name": type(self._strategy).__name__,
                         "params": self._strategy.get_params()},
            "targets": self._targets, "data_info": self._data_info(),
        }
        body = Checkpoint(state=state, params=self._params, history=self._history,
                          aggregator_state=self._aggregator.state_dict())
        return write_atomic(path, codec.encode(Envelope(body=body)))

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        federation: str | None = None,
        plan: type[TrainingPlan] | None = None,
        aggregator: Aggregator | None = None,
        strategy: Strategy | None = None,
        **overrides: Any,
    ) -> Experiment:
        """Resume an experiment from :meth:`save` (or the newest file of a checkpoint folder).

        The plan is rebuilt from the shipped source unless ``plan`` is given; ``federation``
        and any constructor argument can be overridden.
        """
        path = Path(path)
        if path.is_dir():
            files = sorted(path.glob("*.fedcore"))
            if not files:
                raise ConfigurationError(f"No *.fedcore checkpoint in {path}.")
            path = files[-1]
        try:
            body = codec.decode(path.read_bytes()).body
        except FileNotFoundError:
            raise ConfigurationError(f"No checkpoint at {path}.") from None
        except ProtocolError as exc:
            raise ConfigurationError(
                f"{path} is not a readable fedcore checkpoint ({exc}). Pass a file written by "
                "Experiment.save(), or the checkpoint folder.") from exc
        if not isinstance(body, Checkpoint):
            raise ConfigurationError(
                f"{path} is not a fedcore experiment checkpoint (it holds a "
                f"{body.TAG!r} message). Pass a file written by Experiment.save().")
        found = body.state.get("format")
        if found != _CHECKPOINT_VERSION:
            raise ConfigurationError(
                f"{path} is an experiment checkpoint of format {found!r}; this fedcore reads "
                f"format {_CHECKPOINT_VERSION}. Open it with the fedcore version that wrote it.")
        s = body.state
        if plan is None:
            plan = PlanBundle.from_wire(s["plan"]).load()
        if aggregator is None:
            agg_cls = plugins.load("aggregators", s["aggregator"]["name"])
            aggregator = agg_cls(**s["aggregator"]["params"])
        aggregator.load_state_dict(body.aggregator_state)
        if strategy is None and s.get("strategy"):
            strategy = from_params(s["strategy"]["name"], s["strategy"]["params"])
        kwargs: dict[str, Any] = {
            k: s[k] for k in ("tags", "nodes", "model_args", "training_args", "round_limit",
                              "test_ratio", "seed", "evaluate_global", "evaluate_local",
                              "timeout", "connect_timeout", "name", "checkpoint_dir")
        }
        kwargs["tensorboard"] = s.get("tensorboard")
        kwargs["privacy"] = s.get("privacy") or None
        if s.get("secagg"):
            kwargs["secagg"] = plugins.load("secagg", s["secagg"]["name"])(
                **s["secagg"]["params"])
        kwargs.update(overrides)
        exp = cls(plan, federation=federation or s["federation"], aggregator=aggregator,
                  strategy=strategy, **kwargs)
        exp.id = s["id"]
        exp.round = int(s["round"])
        exp._params = body.params
        exp._history = list(body.history)
        exp._saved_data_info = s.get("data_info") or {}
        return exp


def _check_secure(aggregator: Aggregator | None, secagg: SecureAggregation | None,
                  strategy: Strategy) -> None:
    if secagg is None:
        return
    if aggregator is not None and not aggregator.sum_only:
        raise ConfigurationError(
            f"{type(aggregator).__name__} needs each node's update in clear, which secure "
            f"aggregation ({secagg.name}) hides. Use a sum-only aggregator (FedAvg, FedProx, "
            "SCAFFOLD, FedAdam, FedYogi, FedAdagrad, FedAvgM) or secagg=None.")
    if type(strategy).weight is not Strategy.weight:
        # Under secure aggregation the node weights its update before protecting it; the
        # researcher only ever sees the sum, so it cannot apply another weight afterwards.
        raise ConfigurationError(
            f"{type(strategy).__name__} overrides weight(), which secure aggregation "
            f"({secagg.name}) cannot apply: each node weights its own update before "
            "protecting it, by its sample count or by 1, and the researcher sees only the "
            "sum. Use the strategy's weighting='samples' or 'uniform' instead of a custom "
            "weight(), or secagg=None.")


def _as_dict(value: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{what} must be a dict. Received: {type(value).__name__}")
    return dict(value)


def _postfix(rows: pd.DataFrame) -> dict[str, str]:
    ok = rows[rows["status"] == "ok"] if "status" in rows else rows
    out = {"nodes": f"{len(ok)}/{len(rows)}"}
    for key in ("global_accuracy", "global_mse", "train_loss"):
        if key in ok and ok[key].notna().any():
            out[key.split("_", 1)[1]] = f"{ok[key].mean():.4f}"
            break
    return out

