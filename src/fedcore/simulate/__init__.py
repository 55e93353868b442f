"""Many virtual hospitals: in one process, in worker processes, or on a Ray cluster.

Each virtual hospital is a real :class:`~fedcore.node.Node` with its own home folder,
TinyDB registry and data file; only the transport is in-process. Example::

    with fedcore.simulate.from_arrays(X, y, n_nodes=3, tags=["demo"]) as fed:
        exp = Experiment(Plan, tags=["demo"], federation=fed.url, round_limit=5)
        exp.run()

Once :func:`from_arrays` or :func:`from_dataframe` has built the nodes, the objects of the
process are frozen for Python's garbage collector (:meth:`SimulatedFederation.freeze_setup`)
until the federation closes, so that its rounds do not scan them again and again.

With ``workers=N`` the nodes are dealt to N shards, each in a worker process (or, with
``engine="ray"``, a Ray actor) of its own, and the researcher stays in this process: frames
cross between them unchanged (:mod:`fedcore.simulate._shards`), so the run is the same protocol and
gives the same model, bit for bit.
"""

from __future__ import annotations

import functools
import gc
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedcore import plugins
from fedcore.errors import ConfigurationError
from fedcore.node import Node
from fedcore.node._turns import TurnTakingExecutor
from fedcore.simulate._shards import ProcessShard, ShardLink, ShardRelay, ShardSpec, shard_specs

__all__ = ["ENGINES", "YOUNG_PER_NODE", "YOUNG_THRESHOLD", "SimulatedFederation", "from_arrays",
           "from_dataframe", "partition"]

#: Where ``workers`` run: worker processes of this machine, or Ray actors.
ENGINES = ("process", "ray")
#: The collector's youngest-generation threshold while a simulation's setup is frozen
#: (:meth:`SimulatedFederation.freeze_setup`): at least this many allocations...
YOUNG_THRESHOLD = 10_000
#: ...and at least this many per node of the federation (what a round keeps alive per node,
#: with room to spare: a young collection about once a round, not once per ten nodes).
YOUNG_PER_NODE = 100


def partition(y: Any, n_nodes: int, *, scheme: str = "iid", alpha: float = 0.5,
              seed: int = 0, min_samples: int = 1) -> list[np.ndarray]:
    """Split sample indices among ``n_nodes``.

    ``scheme="iid"`` shuffles and deals equal shares. ``scheme="dirichlet"`` skews labels:
    each class is spread over nodes with proportions drawn from Dirichlet(``alpha``);
    small ``alpha`` (0.1) gives nodes few classes, large ``alpha`` (100) is close to IID.
    Every node gets at least ``min_samples`` samples. A node with one sample trains on it
    and has no test split (it reports no test metrics): ask ``min_samples=2`` for nodes
    that all evaluate.
    """
    y = np.asarray(y)
    n = len(y)
    if min_samples < 1:
        raise ConfigurationError(f"min_samples must be >= 1. Received: {min_samples!r}")
    if n_nodes < 1 or n < n_nodes * min_samples:
        raise ConfigurationError(
            f"Cannot give {n_nodes} nodes {min_samples} sample(s) each out of {n}: lower "
            "n_nodes" + (" or min_samples." if min_samples > 1 else ".")
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), n_nodes)]
    if scheme != "dirichlet":
        raise ConfigurationError(f"scheme must be 'iid' or 'dirichlet'. Received: {scheme!r}")
    if not alpha > 0:
        raise ConfigurationError(f"alpha must be > 0. Received: {alpha!r}")
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(n_nodes)]
        for cls in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == cls))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n_nodes))[:-1] * len(idx)).astype(int)
            for node, chunk in enumerate(np.split(idx, cuts)):
                parts[node].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_samples:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ConfigurationError(
        f"Dirichlet(alpha={alpha}) kept leaving a node with fewer than {min_samples} "
        "samples: raise alpha or lower n_nodes."
    )


class SimulatedFederation:
    """Nodes serving ``inproc://<name>`` in the background; close it to stop them.

    ``nodes`` are the nodes of this process. Nodes in worker processes or Ray actors
    (``from_arrays(..., workers=N)``) are listed in :attr:`node_ids` only; :attr:`lost`
    says which of their shards stopped unasked, and why.

    ``durable``: whether the nodes' homes flush their changes to disk (``fsync``) as a
    deployed node does (see :class:`~fedcore.node.Node`). ``None`` (the default): not in
    a temporary ``root`` (``root=None``: deleted by :meth:`close`, so nothing of it
    outlives the process), yes in a ``root`` of yours. Files are replaced whole either way.
    """

    def __init__(self, name: str | None = None, root: str | Path | None = None, *,
                 durable: bool | None = None):
        self.name = name or f"sim-{uuid.uuid4().hex[:8]}"
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="fedcore-"))
        #: Whether the nodes' homes fsync their changes (see the class's docstring).
        self.durable = (not self._own_root) if durable is None else bool(durable)
        # One worker for every node: simulated rounds run one node at a time, which is
        # deterministic and avoids oversubscribing the cores with framework threads.
        self._executor = TurnTakingExecutor()
        self.nodes: list[Node] = []
        self._relay: ShardRelay | None = None
        self._froze = False  # this federation froze the process's objects (gc.freeze)
        self._threshold: tuple[int, ...] | None = None  # the collector's, before it raised it
        self._young = YOUNG_THRESHOLD  # the youngest generation's threshold it set

    @property
    def url(self) -> str:
        """The federation URL to give an Experiment."""
        return f"inproc://{self.name}"

    @property
    def node_ids(self) -> list[str]:
        """The ids of every node, in this process or in a shard elsewhere."""
        return [n.node_id for n in self.nodes] + (self._relay.node_ids if self._relay else [])

    @property
    def shards(self) -> list[str]:
        """Where each shard of nodes runs; empty when every node is in this process.

        E.g. ``"worker process 1 (pid 123)"``, or a Ray actor's host, Ray node and pid.
        """
        return [link.label for link in self._relay.links] if self._relay else []

    @property
    def lost(self) -> dict[str, str]:
        """Shards that stopped unasked (a worker process that died): label -> reason."""
        return dict(self._relay.lost) if self._relay else {}

    def add_shards(self, links: Sequence[ShardLink]) -> None:
        """Start nodes elsewhere (worker processes, Ray actors) that serve this URL.

        Each link builds its shard's nodes; this returns once all of them serve. Called once,
        by :func:`from_arrays` with ``workers``.
        """
        if self._relay is not None:
            raise ConfigurationError("This federation already has its shards.")
        relay = ShardRelay(self.url, links)
        relay.start()  # closes what started if one shard fails
        self._relay = relay

    def add_node(self, node_id: str | None = None, *, node_class: type[Node] = Node) -> Node:
        """Create a node with its own home folder under ``root`` and start it.

        ``node_class``: a subclass of :class:`~fedcore.node.Node` to simulate a site that
        behaves differently (fails, is slow, records what it sends).
        """
        node = self._build_node(node_id or f"node-{len(self.nodes) + 1:02d}", node_class)
        node.start(self.url)
        self.nodes.append(node)
        return node

    def _add_nodes(self, node_ids: Sequence[str],
                   give_data: Callable[[int, Node], object]) -> None:
        """Build the nodes ``node_ids``, ``give_data(i, node)`` to each, then start them all.

        Started together once their homes are written, the nodes' starts reach the loop in
        one go, instead of waking it (and handing it the GIL) once per node between two
        homes being written. Each node does and records what it did when started first; it
        records its dataset before it records that it started serving.
        """
        built: list[Node] = []
        started = 0
        try:
            for i, node_id in enumerate(node_ids):
                built.append(self._build_node(node_id))
                give_data(i, built[-1])
            for node in built:
                node.start(self.url)
                self.nodes.append(node)
                started += 1
        finally:
            for node in built[started:]:  # not serving: close what recording its data opened
                node._close_audit()

    def _build_node(self, node_id: str, node_class: type[Node] = Node) -> Node:
        # A simulation is the researcher's own sandbox: no plan review (deployed nodes,
        # created by `fedcore-node init`, require approval by default).
        return node_class(self.root / node_id, node_id=node_id, executor=self._executor,
                          approval_required=False, durable=self.durable)

    def freeze_setup(self) -> None:
        """Leave the objects that exist now out of the garbage collector's scans until close.

        A simulated round allocates many objects that live until its end (each node's
        request, job and reply), so Python's garbage collector runs full collections
        during rounds, and each one scans every object of the process: the frameworks'
        modules, every node, every plan (at 1000 nodes about 0.6M objects and 0.25 s per
        collection, a third of fedcore's own time per round). :func:`gc.freeze` moves the
        objects that exist now to a generation the collector never scans; :meth:`close`
        moves them back (:func:`gc.unfreeze`). In between, an object that exists now is
        still freed as soon as nothing refers to it; only reference cycles among them that
        become garbage wait for ``close`` to be freed.

        Before freezing, the backends this process has imported warm up
        (:meth:`TrainingPlan.warm_up <fedcore.plan.TrainingPlan.warm_up>`: torch imports
        ``torch._dynamo`` with its first optimizer, ~1 s), so that round 1 neither pays
        for it nor leaves those objects to be scanned.

        :func:`from_arrays` and :func:`from_dataframe` call it once their nodes are built;
        call it yourself after adding nodes with :meth:`add_node`. It does nothing when the
        collector is disabled, or when objects are frozen already (by your own
        ``gc.freeze()``, or by another federation still open), so that ``close`` never
        unfreezes what it did not freeze.

        While frozen, the collector's youngest generation is also collected after
        :data:`YOUNG_THRESHOLD` allocations, or :data:`YOUNG_PER_NODE` per node of the
        federation when that is more, instead of Python's default 700 (when it is lower;
        ``close`` restores it unless it was changed meanwhile). A round keeps each node's
        request, job and reply alive until its end (~65 objects per node): collected every
        700 allocations, they were caught alive, scanned and moved to older generations,
        whose collections then scanned them again (at 1000 nodes ~100 us of the collector
        per node and round; ~35-80 us with 10,000; ~10-15 us with 100 per node). A
        reference cycle that becomes garbage waits at most that many allocations longer to
        be freed.
        """
        if self._froze or not gc.isenabled() or gc.get_freeze_count():
            return
        for backend in plugins.imported("backends"):  # what round 1 would import: now
            plugins.load("backends", backend).warm_up()
        gc.freeze()
        self._froze = True
        threshold = gc.get_threshold()
        young = self._young = max(YOUNG_THRESHOLD, YOUNG_PER_NODE * len(self.node_ids))
        if threshold[0] < young:
            self._threshold = threshold
            gc.set_threshold(young, *threshold[1:])

    def close(self) -> None:
        """Stop every node and delete the temporary root (when fedcore created it)."""
        if self._froze:
            gc.unfreeze()
            self._froze = False
            if self._threshold is not None:  # unless it was changed meanwhile
                if gc.get_threshold() == (self._young, *self._threshold[1:]):
                    gc.set_threshold(*self._threshold)
                self._threshold = None
        if self._relay is not None:
            self._relay.close()
            self._relay = None
        for node in self.nodes:
            node.stop()
        self.nodes.clear()
        self._executor.shutdown(wait=True)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SimulatedFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def from_arrays(X: Any, y: Any, *, n_nodes: int, tags: Sequence[str], scheme: str = "iid",
                alpha: float = 0.5, seed: int = 0, min_samples: int = 1,
                name: str | None = None, root: str | Path | None = None, workers: int = 1,
                engine: str = "process", ray_address: str | None = None,
                threads: int | None = None, durable: bool | None = None
                ) -> SimulatedFederation:
    """A federation of ``n_nodes`` hospitals sharing ``(X, y)`` by :func:`partition`.

    ``workers=N`` (N > 1) runs the nodes in N shards, each a worker process of this
    machine (``engine="process"``) or a Ray actor (``engine="ray"``: the ``ray`` extra;
    ``ray_address`` is the cluster to join, as for ``ray.init``, or ``None`` to start or
    join one as ``ray.init()`` does). The experiment stays in this process and gets the
    same model, bit for bit, as with ``workers=1`` as long as the frameworks use as many
    threads in the workers as here (float sums depend on it): ``threads`` sets
    ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` in worker processes (``None``: they inherit
    this process's environment); a plan may also fix its own (``torch.set_num_threads``).
    ``durable``: whether the homes fsync their changes (:class:`SimulatedFederation`;
    by default only in a ``root`` of yours).
    """
    X, y = np.asarray(X), np.asarray(y)
    parts = partition(y, n_nodes, scheme=scheme, alpha=alpha, seed=seed,
                      min_samples=min_samples)
    links = _links(workers, engine, ray_address, n_nodes, threads)
    fed = SimulatedFederation(name, root, durable=durable)
    try:
        if not links:
            fed._add_nodes([f"node-{i + 1:02d}" for i in range(len(parts))],
                           lambda i, node: node.datasets.add_arrays(
                               f"{fed.name}-part{i + 1}", tags, X[parts[i]], y[parts[i]]))
            fed.freeze_setup()
            return fed
        ids = [f"node-{i + 1:02d}" for i in range(n_nodes)]
        datasets = [f"{fed.name}-part{i + 1}" for i in range(n_nodes)]
        # Ray actors may run on other machines: a temporary home of their own there,
        # unless the caller named a folder (then the same path on every machine).
        shard_root = str(fed.root) if engine == "process" or root is not None else None
        specs = shard_specs(fed.name, shard_root, tags, ids, datasets, parts, len(links))
        for spec, _ in specs:  # the backends imported here, to import before round 1
            spec["warm"] = plugins.imported("backends")
            spec["durable"] = fed.durable if shard_root is not None else durable
        fed.add_shards([make(spec, X[index], y[index])
                        for make, (spec, index) in zip(links, specs, strict=True)])
        fed.freeze_setup()  # the researcher's half folds every node's reply here
    except BaseException:
        fed.close()
        raise
    return fed


def _links(workers: int, engine: str, ray_address: str | None, n_nodes: int,
           threads: int | None) -> list[Any]:
    """One factory ``(spec, X, y) -> ShardLink`` per shard; none for ``workers=1``."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigurationError(f"workers must be an integer >= 1. Received: {workers!r}")
    if engine not in ENGINES:
        raise ConfigurationError(f"engine must be one of {ENGINES}. Received: {engine!r}")
    if ray_address is not None and engine != "ray":
        raise ConfigurationError("ray_address is for engine='ray'. Received engine="
                                 f"{engine!r}: add engine='ray', or drop ray_address.")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigurationError(f"threads must be an integer >= 1 or None. Received: "
                                 f"{threads!r}")
    workers = min(workers, n_nodes)
    if workers == 1 and engine == "process":
        return []
    if engine == "ray":
        from fedcore.simulate import _ray  # imports ray (the `ray` extra) only now

        return _ray.link_factories(workers, ray_address, build_shard)
    return [functools.partial(ProcessShard, i, threads=threads) for i in range(workers)]


def build_shard(spec: ShardSpec, X: np.ndarray, y: np.ndarray | None) -> SimulatedFederation:
    """In a worker: the shard's nodes, started on a federation of its own (same name)."""
    for backend in spec.get("warm", []):  # the frameworks the parent uses: imported now,
        try:                              # while the parent sets up, not in round 1
            plugins.load("backends", backend)
        except ConfigurationError:  # not installed here: the round that needs it says so
            pass
    fed = SimulatedFederation(spec["name"], spec["root"], durable=spec.get("durable"))
    try:
        nodes = spec["nodes"]

        def give_data(i: int, node: Node) -> None:
            _, dataset, lo, hi = nodes[i]
            node.datasets.add_arrays(dataset, spec["tags"], X[lo:hi],
                                     None if y is None else y[lo:hi])

        fed._add_nodes([n[0] for n in nodes], give_data)
    except BaseException:
        fed.close()
        raise
    fed.freeze_setup()
    return fed


def from_dataframe(frame: pd.DataFrame, *, target: str, n_nodes: int, tags: Sequence[str],
                   scheme: str = "iid", alpha: float = 0.5, seed: int = 0,
                   name: str | None = None, root: str | Path | None = None,
                   durable: bool | None = None) -> SimulatedFederation:
    """A federation whose hospitals each hold a CSV file of rows of ``frame``.

    ``durable``: as for :func:`from_arrays`.
    """
    if target not in frame.columns:
        raise ConfigurationError(f"No column {target!r}. Columns: {list(frame.columns)}")
    fed = SimulatedFederation(name, root, durable=durable)
    parts = partition(frame[target].to_numpy(), n_nodes, scheme=scheme, alpha=alpha, seed=seed)

    def give_data(i: int, node: Node) -> None:
        path = node.home / "data" / f"part{i + 1}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.iloc[parts[i]].to_csv(path, index=False)
        node.datasets.add(f"{fed.name}-part{i + 1}", tags, path)

    try:
        fed._add_nodes([f"node-{i + 1:02d}" for i in range(len(parts))], give_data)
    except BaseException:
        fed.close()
        raise
    fed.freeze_setup()
    return fed
