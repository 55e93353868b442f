"""Many virtual hospitals in one process, over the in-process transport.

Each virtual hospital is a real :class:`~fedcore.node.Node` with its own home folder,
TinyDB registry and data file; only the transport is in-process. Example::

    with fedcore.simulate.from_arrays(X, y, n_nodes=3, tags=["demo"]) as fed:
        exp = Experiment(Plan, tags=["demo"], federation=fed.url, round_limit=5)
        exp.run()
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedcore.errors import ConfigurationError
from fedcore.node import Node
from fedcore.node._turns import TurnTakingExecutor

__all__ = ["SimulatedFederation", "from_arrays", "from_dataframe", "partition"]


def partition(y: Any, n_nodes: int, *, scheme: str = "iid", alpha: float = 0.5,
              seed: int = 0, min_samples: int = 2) -> list[np.ndarray]:
    """Split sample indices among ``n_nodes``.

    ``scheme="iid"`` shuffles and deals equal shares. ``scheme="dirichlet"`` skews labels:
    each class is spread over nodes with proportions drawn from Dirichlet(``alpha``);
    small ``alpha`` (0.1) gives nodes few classes, large ``alpha`` (100) is close to IID.
    Every node gets at least ``min_samples`` samples.
    """
    y = np.asarray(y)
    n = len(y)
    if n_nodes < 1 or n < n_nodes * min_samples:
        raise ConfigurationError(
            f"Cannot give {n_nodes} nodes {min_samples} samples each out of {n}."
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
    """Nodes serving ``inproc://<name>`` in the background; close it to stop them."""

    def __init__(self, name: str | None = None, root: str | Path | None = None):
        self.name = name or f"sim-{uuid.uuid4().hex[:8]}"
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="fedcore-"))
        # One worker for every node: simulated rounds run one node at a time, which is
        # deterministic and avoids oversubscribing the cores with framework threads.
        self._executor = TurnTakingExecutor()
        self.nodes: list[Node] = []

    @property
    def url(self) -> str:
        """The federation URL to give an Experiment."""
        return f"inproc://{self.name}"

    def add_node(self, node_id: str | None = None, *, node_class: type[Node] = Node) -> Node:
        """Create a node with its own home folder under ``root`` and start it.

        ``node_class``: a subclass of :class:`~fedcore.node.Node` to simulate a site that
        behaves differently (fails, is slow, records what it sends).
        """
        node_id = node_id or f"node-{len(self.nodes) + 1:02d}"
        # A simulation is the researcher's own sandbox: no plan review (deployed nodes,
        # created by `fedcore-node init`, require approval by default).
        node = node_class(self.root / node_id, node_id=node_id, executor=self._executor,
                          approval_required=False)
        node.start(self.url)
        self.nodes.append(node)
        return node

    def close(self) -> None:
        """Stop every node and delete the temporary root (when fedcore created it)."""
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
                alpha: float = 0.5, seed: int = 0, name: str | None = None,
                root: str | Path | None = None) -> SimulatedFederation:
    """A federation of ``n_nodes`` hospitals sharing ``(X, y)`` by :func:`partition`."""
    X, y = np.asarray(X), np.asarray(y)
    fed = SimulatedFederation(name, root)
    for i, idx in enumerate(partition(y, n_nodes, scheme=scheme, alpha=alpha, seed=seed)):
        node = fed.add_node()
        node.datasets.add_arrays(f"{fed.name}-part{i + 1}", tags, X[idx], y[idx])
    return fed


def from_dataframe(frame: pd.DataFrame, *, target: str, n_nodes: int, tags: Sequence[str],
                   scheme: str = "iid", alpha: float = 0.5, seed: int = 0,
                   name: str | None = None, root: str | Path | None = None
                   ) -> SimulatedFederation:
    """A federation whose hospitals each hold a CSV file of rows of ``frame``."""
    if target not in frame.columns:
        raise ConfigurationError(f"No column {target!r}. Columns: {list(frame.columns)}")
    fed = SimulatedFederation(name, root)
    parts = partition(frame[target].to_numpy(), n_nodes, scheme=scheme, alpha=alpha, seed=seed)
    for i, idx in enumerate(parts):
        node = fed.add_node()
        path = node.home / "data" / f"part{i + 1}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.iloc[idx].to_csv(path, index=False)
        node.datasets.add(f"{fed.name}-part{i + 1}", tags, path)
    return fed
