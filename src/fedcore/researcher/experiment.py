"""Experiment: the researcher's interactive object."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from fedcore import _runtime, plugins
from fedcore.aggregators import Aggregator
from fedcore.data import merge_metadata
from fedcore.data.preprocessing import Preprocessing
from fedcore.errors import ConfigurationError, FedcoreError, PlanError
from fedcore.params import ParameterSet
from fedcore.plan import PlanBundle, TrainingPlan
from fedcore.plan.personal import shared
from fedcore.researcher import checkpoint, monitoring
from fedcore.researcher.federation import Federation, Selection
from fedcore.researcher.protection import protection_for
from fedcore.researcher.round import Round, RoundResult, RoundSettings
from fedcore.researcher.settings import ExperimentSettings, session_of
from fedcore.researcher.statistics import FederatedStatistics
from fedcore.researcher.strategies import AllNodes, Strategy, from_params
from fedcore.secagg import SecureAggregation
from fedcore.wire.messages import (
    Checkpoint,
    Envelope,
    PlanStatus,
    PlanStatusRequest,
    PlanSubmit,
    TrainProgress,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["Experiment"]

log = logging.getLogger("fedcore.experiment")



class Experiment(ExperimentSettings):
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
        federation: str | Federation,
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
        preprocessing: Preprocessing | None = None,
    ):
        self.plan = plan
        self._selection = Selection(tags, nodes)
        self._session = session_of(federation, identity, enrolled, connect_timeout)
        self._owns_session = not isinstance(federation, Federation)
        self.model_args = model_args or {}
        self.training_args = training_args or {}
        self._secagg: SecureAggregation | None = None
        self._strategy: Strategy = AllNodes()
        self.aggregator = aggregator
        self.secagg = secagg
        self.privacy = privacy
        self.preprocessing = preprocessing
        self.strategy = strategy
        self.round_limit = round_limit
        self.test_ratio = test_ratio
        self.seed = int(seed)
        self.evaluate_global = evaluate_global
        self.evaluate_local = evaluate_local
        self.checkpoint_dir = checkpoint_dir
        self.timeout = float(timeout)
        self.progress = progress
        self.name = name or "experiment"
        self.tensorboard = tensorboard
        self.id = uuid.uuid4().hex
        self.round = 0
        self._params: ParameterSet | None = None
        self._history: list[dict[str, Any]] = []
        self._live: dict[str, dict[str, Any]] = {}  # node -> its latest training progress
        self._bar: Any = None  # run()'s progress bar, while it runs
        self._saved_data_info: dict[str, Any] = {}
        # What every round's request repeats, kept while its source is the same object: the
        # plan's wire form (a new plan is a new bundle) and the data_info merged from the
        # search's targets (a new search makes new targets).
        self._plan_wire: tuple[PlanBundle, dict[str, Any]] | None = None
        self._merged_info: tuple[dict[str, Any], dict[str, Any]] | None = None

    def __repr__(self) -> str:
        return (
            f"Experiment({self._plan.__name__}, tags={self.tags}, "
            f"federation={self.federation!r}, round={self.round}/{self._round_limit}, "
            f"aggregator={self._aggregator!r})"
        )

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

        See :func:`fedcore.researcher.monitoring.plot`; needs the ``plot`` extra.
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
        return FederatedStatistics(self._session, self.tags, nodes=self.nodes,
                                   timeout=self.timeout, secagg=self._secagg)

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

    # --- the session -------------------------------------------------------------------------

    async def _close(self) -> None:
        """Disconnect from the federation (the experiment can reconnect later).

        A session given as a :class:`Federation` stays open: closing it is its owner's.
        """
        self._session.listen(self.id, None)
        if self._owns_session:
            await self._session.aclose()

    def __enter__(self) -> Experiment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _search(self) -> pd.DataFrame:
        """Find the datasets tagged ``tags``: one row per node and dataset."""
        found = await self._selection.search(self._session, self.id)
        return found.frame()

    async def _node_status(self) -> pd.DataFrame:
        """Liveness: one row per node this experiment knows of or sees connected.

        Columns: ``connected`` (its connection is up now), ``answers`` (it answered a ping
        just now), ``last_seen`` (UTC time of its latest message), ``ping_s`` (round trip),
        ``name``, and ``dataset``: the dataset matching the tags, once searched. A node that
        dropped out stays listed with ``connected=False`` and when it was last heard from.
        """
        sel = self._selection
        await self._session.client(sel.nodes)
        known = {*(sel.targets or {}), *(sel.nodes or ()), *sel.gone}
        return await self._session._node_status(known, sel.dataset_names())

    def _data_info(self) -> dict[str, Any]:
        if self._selection.targets is None:
            return dict(self._saved_data_info)
        return merge_metadata([t["metadata"] for t in self._selection.targets.values()])

    # --- rounds (one round is a fedcore.researcher.round.Round) -----------------------------

    async def _run_once(self) -> pd.DataFrame:
        """Run one round; return its rows of :attr:`history`."""
        result, frame = await self._round()
        return result.frame if frame is None else frame

    async def _round(self) -> tuple[RoundResult, pd.DataFrame | None]:
        """Run one round and record it; its rows as a frame, if recording made one."""
        settings = await self._round_settings(self.round + 1, {})
        targets = settings.datasets
        protection = protection_for(
            self._secagg, self._session, self._aggregator, self._strategy, experiment=self.id,
            round=settings.round, nodes=settings.nodes, reference=settings.params,
            timeout=settings.wait,
            weights_hint={} if self._secagg is None else {  # only secure rounds read it
                n: self._strategy.weight(n, int(
                    (targets[n].get("metadata") or {}).get("n_samples") or 1))
                for n in settings.nodes})
        result = await Round(settings, self._session, self._aggregator, protection).run()
        return result, self._apply(result)

    async def _round_settings(self, rnd: int, request: dict[str, Any]) -> RoundSettings:
        self._session.listen(self.id, self._on_progress)
        connected, gone = await self._selection.for_round(self._session, rnd, self.id)
        targets = self._selection.targets or {}
        selected = self._strategy.select(sorted({*connected, *gone}), rnd)
        nodes = [n for n in selected if n in targets]
        if self._params is None:
            self._params = _initial_parameters(self, self._data_info())
        if self._plan_wire is None or self._plan_wire[0] is not self._bundle:
            self._plan_wire = (self._bundle, self._bundle.to_wire())
        if self._merged_info is None or self._merged_info[0] is not targets:
            self._merged_info = (targets, self._data_info())
        plan, data_info = self._plan_wire[1], self._merged_info[1]
        return RoundSettings(
            experiment=self.id, round=rnd, nodes=nodes, datasets=targets,
            params=self._params, timeout=self.timeout, deadline=self._strategy.deadline,
            min_nodes=self._strategy.min_nodes, gone=[n for n in selected if n not in targets],
            request=dict(plan=plan, model_args=self._model_args,
                         training_args=self._training_args, data_info=data_info,
                         test_ratio=self._test_ratio, seed=self.seed,
                         evaluate_global=self.evaluate_global,
                         evaluate_local=self.evaluate_local, privacy=self._privacy,
                         preprocessing=({} if self._preprocessing is None
                                        else self._preprocessing.to_wire()))
            | request)

    async def _fine_tune(self, epochs: int = 1) -> pd.DataFrame:
        """Fine-tune the federated model on every node, after the last round.

        Each node trains the current global model (with its local parameters, if the plan
        has some) for ``epochs`` more local epochs on its own data, keeps the result in its
        home and evaluates it on its test split; nothing of it leaves the node. Returns one
        row per node: ``global_*`` metrics before fine-tuning, ``local_*`` after. The global
        model, the round count and :attr:`history` do not change.
        """
        if self._params is None or self.round == 0:
            raise ConfigurationError("Run at least one round before fine_tune(): it "
                                     "fine-tunes the federated model.")
        if not (isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1):
            raise ConfigurationError(f"Expected epochs >= 1 (an int). Received: {epochs!r}")
        args = {k: v for k, v in self._training_args.items() if k != "num_updates"}
        settings = await self._round_settings(self.round + 1, dict(
            fine_tune=True, evaluate_global=True, evaluate_local=True,
            training_args={**args, "epochs": epochs}))
        aggregator = plugins.load("aggregators", "fedavg")()  # the replies are the global model
        protection = protection_for(None, self._session, aggregator, self._strategy,
                                    experiment=self.id, round=settings.round,
                                    nodes=settings.nodes, reference=settings.params,
                                    timeout=settings.wait, weights_hint={})
        result = await Round(settings, self._session, aggregator, protection).run()
        if result.error is not None:
            raise result.error
        frame = result.frame
        frame.insert(1, "fine_tune_epochs", epochs)
        return frame

    fine_tune = _runtime.blocking(_fine_tune)
    afine_tune = _runtime.awaitable(_fine_tune)

    def _apply(self, result: RoundResult) -> pd.DataFrame | None:
        """Record a round's result: history, global model, TensorBoard, checkpoint.

        Returns the rows' frame where TensorBoard needed one, else ``None``: ``run()``
        needs no frame per round (~0.4 ms of the event loop each).
        """
        self._history.extend(result.rows)
        if result.error is not None:
            raise result.error
        self._params = result.params
        self.round = result.round
        frame = None
        if self._tensorboard is not None:
            frame = result.frame
            self._tensorboard.write_round(result.round, frame)
        if self.checkpoint_dir is not None:
            self.save(Path(self.checkpoint_dir) / f"round_{result.round:04d}.fedcore")
        return frame

    async def _run(self, rounds: int | None = None) -> pd.DataFrame:
        """Run ``rounds`` more rounds (default: up to ``round_limit``); return the history."""
        if rounds is None:
            if self._round_limit is None:
                raise ConfigurationError(
                    "Give run() a number of rounds, or set round_limit on the experiment."
                )
            rounds = max(self._round_limit - self.round, 0)
            if rounds == 0:
                log.warning("%s", self._at_limit())
        elif self._round_limit is not None:
            left = max(self._round_limit - self.round, 0)
            if int(rounds) > 0 and left == 0:
                raise ConfigurationError(self._at_limit())
            if int(rounds) > left:
                log.warning("run(%d) runs %d round(s): round_limit is %d and round %d is done. "
                            "Raise exp.round_limit to run more.", int(rounds), left,
                            self._round_limit, self.round)
            rounds = min(int(rounds), left)
        bar_class = _progress_bar(self.progress)
        with bar_class(total=rounds, desc=self.name, unit="round",
                       disable=not self.progress) as bar:
            self._bar = None if bar.disable else bar  # a hidden bar needs no postfix
            try:
                for _ in range(rounds):
                    result, frame = await self._round()
                    if not bar.disable:
                        bar.set_postfix(_postfix(result.frame if frame is None else frame),
                                        refresh=False)
                    bar.update(1)
            finally:
                self._bar = None
        return self.history

    def _at_limit(self) -> str:
        return (f"The experiment has run {self.round} round(s), its round_limit: no round left "
                f"to run. Raise the limit first (exp.round_limit = {self.round + 1} or more), "
                "then call run() again.")

    # --- plan review ------------------------------------------------------------------------

    async def _plan_rows(self, body: PlanSubmit | PlanStatusRequest) -> pd.DataFrame:
        targets = await self._selection.current(self._session, self.id)
        rows: list[dict[str, Any]] = []
        async for reply in self._session.scatter(dict.fromkeys(targets, body),
                                                 experiment=self.id,
                                                 timeout=self.connect_timeout):
            status = reply.expect(PlanStatus)
            if status is not None:
                rows.append({"node": reply.node, "plan_hash": status.plan_hash,
                             "status": status.status, "note": status.note,
                             "approval_required": status.approval_required})
            else:
                rows.append({"node": reply.node, "plan_hash": self.plan_hash, "status": "error",
                             "note": reply.why(), "approval_required": None})
        return pd.DataFrame(sorted(rows, key=lambda r: r["node"]),
                            columns=["node", "plan_hash", "status", "note",
                                     "approval_required"])

    async def _submit_plan(self, message: str = "") -> pd.DataFrame:
        """Submit the plan for review to the nodes holding the datasets; one row per node.

        Nodes that require approval run a plan only once their administrator approved its
        SHA-256 (:attr:`plan_hash`). ``message`` goes to the reviewers. Each row gives the
        node's ``status`` (``pending``, ``approved``, ``rejected``) and ``note``.
        """
        return await self._plan_rows(PlanSubmit(plan=self._bundle.to_wire(), message=message))

    async def _plan_status(self) -> pd.DataFrame:
        """Where the plan stands on each node (``unknown`` where it was never submitted)."""
        return await self._plan_rows(PlanStatusRequest(plan_hash=self.plan_hash))

    # --- the public calls: each once synchronous (scripts, Jupyter), once async -------------

    search = _runtime.blocking(_search)
    asearch = _runtime.awaitable(_search)
    node_status = _runtime.blocking(_node_status)
    anode_status = _runtime.awaitable(_node_status)
    run_once = _runtime.blocking(_run_once)
    arun_once = _runtime.awaitable(_run_once)
    run = _runtime.blocking(_run)
    arun = _runtime.awaitable(_run)
    submit_plan = _runtime.blocking(_submit_plan)
    asubmit_plan = _runtime.awaitable(_submit_plan)
    plan_status = _runtime.blocking(_plan_status)
    aplan_status = _runtime.awaitable(_plan_status)
    close = _runtime.blocking(_close)
    aclose = _runtime.awaitable(_close)

    # --- checkpoints ------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the experiment to one file, atomically (never a half-written checkpoint)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "format": checkpoint.VERSION,
            "id": self.id, "name": self.name, "round": self.round,
            "round_limit": self._round_limit, "tags": self.tags, "nodes": self.nodes,
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
            "preprocessing": (None if self._preprocessing is None
                              else self._preprocessing.to_wire()),
            "strategy": {"name": type(self._strategy).__name__,
                         "params": self._strategy.get_params()},
            "targets": self._selection.targets, "data_info": self._data_info(),
        }
        return checkpoint.write(path, Checkpoint(
            state=state, params=self._params, history=self._history,
            aggregator_state=self._aggregator.state_dict()))

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
        body = checkpoint.read(path)
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
        if s.get("preprocessing"):
            kwargs["preprocessing"] = Preprocessing.from_wire(s["preprocessing"])
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


def _progress_bar(progress: bool) -> Any:
    """The notebook widget of tqdm where one can show, else its console bar; never a warning.

    ``tqdm.auto`` warns on import in a Jupyter kernel without ipywidgets, even when the bar is
    disabled: a disabled bar and a kernel without widgets both use the console class.
    """
    from tqdm.std import tqdm as console

    if not progress:
        return console
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return console
    from tqdm.auto import tqdm

    return tqdm


def _postfix(rows: pd.DataFrame) -> dict[str, str]:
    ok = rows[rows["status"] == "ok"] if "status" in rows else rows
    out = {"nodes": f"{len(ok)}/{len(rows)}"}
    for key in ("global_accuracy", "global_mse", "train_loss"):
        if key in ok and ok[key].notna().any():
            out[key.split("_", 1)[1]] = f"{ok[key].mean():.4f}"
            break
    return out



def _initial_parameters(exp: Experiment, data_info: dict[str, Any]) -> ParameterSet:
    try:
        plan = exp.plan(exp.model_args, exp.training_args, data_info)
        plan.build(seed=exp.seed)
        return shared(exp.plan, ParameterSet(plan.get_parameters())).copy()
    except FedcoreError:
        raise
    except Exception as exc:
        raise PlanError(
            f"The plan failed to build its initial model: {type(exc).__name__}: {exc}",
            exc_type=type(exc).__name__,
        ) from exc
