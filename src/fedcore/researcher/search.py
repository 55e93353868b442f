"""Finding the datasets a researcher asks for: one search, shared by every researcher tool."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from fedcore.errors import ConfigurationError, DatasetError, GovernanceError
from fedcore.wire.messages import SearchReply, SearchRequest
from fedcore.wire.rpc import Client, Reply

log = logging.getLogger("fedcore.search")


@dataclass
class Found:
    """The outcome of a search: the dataset each node trains on, and every match."""

    targets: dict[str, dict[str, Any]] = field(default_factory=dict)  # node -> dataset
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per node and match
    connected: frozenset[str] = frozenset()  # every node connected when the search began

    def frame(self) -> pd.DataFrame:
        """Every match: one row per node and dataset."""
        return pd.DataFrame(self.rows, columns=["node", "dataset", "name", "tags",
                                                "available", "n_samples", "metadata"])


async def find_datasets(client: Client, federation: str, tags: Sequence[str],
                        nodes: Sequence[str] | None, *, timeout: float,
                        experiment: str = "") -> Found:
    """Ask the connected nodes (or ``nodes``) for their dataset tagged ``tags``.

    Raises ``ConfigurationError`` when a named node or every node is missing, and
    ``DatasetError`` when a node holds several matching datasets or no node holds one (the
    message lists the tags each node has).
    """
    connected = frozenset(client.peers())
    peers = sorted(connected)
    if nodes is not None:
        missing = sorted(set(nodes) - set(peers))
        if missing:
            raise ConfigurationError(
                f"Nodes {missing} are not connected to {federation}. Connected: {peers}"
            )
        peers = [p for p in peers if p in nodes]
    if not peers:
        raise ConfigurationError(
            f"No node is connected to {federation} (waited {timeout:g} s). Start the nodes, "
            "or check the URL."
        )
    found = Found(connected=connected)
    tags_by_node: dict[str, list[str]] = {}
    refused: dict[str, Reply] = {}
    async for reply in client.scatter(
        {p: SearchRequest(tags=list(tags)) for p in peers}, experiment=experiment,
        timeout=timeout,
    ):
        node, body = reply.node, reply.expect(SearchReply)
        if body is None:
            log.warning("Node %s did not answer the search: %s", node, reply.why())
            refused[node] = reply
            continue
        tags_by_node[node] = body.available_tags
        for ds in body.datasets:
            found.rows.append({"node": node, "dataset": ds["id"], "name": ds["name"],
                               "tags": ds["tags"], "available": ds.get("available", True),
                               "n_samples": ds["metadata"].get("n_samples"),
                               "metadata": ds["metadata"]})
            if not ds.get("available", True):
                log.warning("Dataset %r on node %s is unavailable (its file is missing).",
                            ds["name"], node)
        usable = [ds for ds in body.datasets if ds.get("available", True)]
        if len(usable) > 1:
            raise DatasetError(
                f"Node {node!r} has {len(usable)} datasets tagged {list(tags)}: "
                f"{[d['name'] for d in usable]}. Add a tag that tells them apart."
            )
        if usable:
            found.targets[node] = usable[0]
    if not found.targets:
        held = "; ".join(f"{n}: {t}" for n, t in sorted(tags_by_node.items()))
        why = " ".join(f"Node {n} refused the search: {r.message or r.why()}"
                       for n, r in sorted(refused.items()))
        if refused and not tags_by_node and all(r.kind == "governance"
                                                for r in refused.values()):
            # Every node refused this researcher: no tag question was even asked.
            raise GovernanceError(f"No node answered the search. {why}")
        raise DatasetError(
            f"No node has an available dataset tagged {list(tags)}. Tags the nodes have: "
            f"{held or 'none'}." + (f" {why}" if why else "")
        )
    found.targets = dict(sorted(found.targets.items()))
    return found

