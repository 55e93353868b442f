"""Federation: a researcher's session with a federation, shared by every researcher tool.

It owns the connection (the transport, the researcher's key and the enrolled nodes), the
wait for nodes that are still dialling in, the dataset search, node status and closing.
:class:`~fedcore.researcher.experiment.Experiment` and
:class:`~fedcore.researcher.statistics.FederatedStatistics` compose one: give either a URL
(it opens and closes its own session) or a ``Federation`` (several tools then share one
connection, and closing it is the caller's).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pandas as pd

from fedcore import _runtime
from fedcore.errors import ConfigurationError, RoundError
from fedcore.researcher.search import Found, find_datasets
from fedcore.transport import open_transport, redact_url
from fedcore.wire.messages import Body, Envelope, Ping, Pong
from fedcore.wire.rpc import Client, Reply, credentials

__all__ = ["Federation", "Selection"]

log = logging.getLogger("fedcore.experiment")

_SETTLE_S = 0.5  # quiet time that ends the first wait for nodes when none are named
_PING_S = 5.0  # the longest wait for a ping's answer in node_status()

ProgressCallback = Callable[[str, Envelope], None]


class Federation:
    """A researcher's connection to the nodes of a federation.

    ``url`` picks the transport (``inproc://name``, ``ws://host:port``, ``mqtt://...``).
    On a networked federation, frames are signed with the researcher's key (``identity``: a
    key file, default ``$FEDCORE_IDENTITY`` or ``~/.fedcore/researcher.key``) and only the
    nodes in ``enrolled`` (``{node_id: public key}`` or a ``nodes.toml`` path) are accepted.
    It connects on first use and waits up to ``connect_timeout`` seconds for the nodes;
    without a node list, it also lets nodes that dial in one after another arrive.

    Example::

        with Federation("ws://localhost:8765") as fed:
            fed.search(["diabetes"])        # one row per node and matching dataset
            fed.node_status()                # who is connected and answers
            exp = Experiment(MyPlan, tags=["diabetes"], federation=fed)
    """

    def __init__(self, url: str, *, identity: str | Path | None = None,
                 enrolled: Mapping[str, str] | str | Path | None = None,
                 connect_timeout: float = 10.0, name: str | None = None):
        if not isinstance(url, str) or not url:
            raise ConfigurationError(
                f"Expected a federation URL such as inproc://name or ws://host:port. "
                f"Received: {url!r}")
        self._url = url
        #: The URL as it may be shown, logged and stored: without its credentials (a
        #: password in it is replaced by ``***``; see :func:`fedcore.transport.redact_url`).
        self.url = redact_url(url)
        self.identity = identity
        self.enrolled = enrolled
        self.connect_timeout = float(connect_timeout)
        #: The researcher's name on the transport: ``name``, else the account the URL logs in
        #: with (``mqtts://researcher@broker/...``: a broker's ACL grants that account the
        #: researcher's topics), else ``researcher-`` and 8 random hex digits.
        self.name = name or _account(url) or f"researcher-{uuid.uuid4().hex[:8]}"
        self._client: Client | None = None
        self._listeners: dict[str, ProgressCallback] = {}

    def __repr__(self) -> str:
        state = "connected" if self._client is not None else "not connected"
        return f"Federation({self.url!r}, {state})"

    def __str__(self) -> str:
        return self.url

    # --- the connection ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while the session holds an open connection."""
        return self._client is not None

    async def client(self, nodes: Sequence[str] | None = None) -> Client:
        """The open client, connected first if needed, once ``nodes`` (or one node) are there.

        Without a node list, the first connection to a network also waits a moment for the
        nodes that dial in one after another.
        """
        pause = 0.0
        if self._client is None:
            transport = open_transport(self._url, role="researcher", identity=self.name)
            client = Client(transport, **credentials(transport, self.identity, self.enrolled))
            client.on_progress = self._on_progress
            await client.start()
            self._client = client
            if not nodes and transport.capabilities.networked:
                pause = _SETTLE_S
        await self._client.wait_for_peers(len(nodes) if nodes else 1, self.connect_timeout,
                                          settle=pause)
        return self._client

    def peers(self) -> set[str]:
        """The nodes connected now (none before the first connection)."""
        return set() if self._client is None else self._client.peers()

    def listen(self, experiment: str, callback: ProgressCallback | None) -> None:
        """Route the training progress of ``experiment``'s requests to ``callback``."""
        if callback is None:
            self._listeners.pop(experiment, None)
        else:
            self._listeners[experiment] = callback

    def _on_progress(self, node: str, env: Envelope) -> None:
        callback = self._listeners.get(env.experiment)
        if callback is not None:
            callback(node, env)

    async def scatter(self, bodies: Mapping[str, Body], *, experiment: str = "",
                      round: int = 0, timeout: float = 60.0) -> AsyncIterator[Reply]:
        """Send one body per node; yield each node's :class:`~fedcore.wire.rpc.Reply`."""
        client = await self.client()
        async for reply in client.scatter(bodies, experiment=experiment, round=round,
                                          timeout=timeout):
            yield reply

    async def _close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    # --- search and status ------------------------------------------------------------------

    async def find(self, tags: Sequence[str], nodes: Sequence[str] | None = None, *,
                   experiment: str = "") -> Found:
        """The dataset tagged ``tags`` on each connected node (or on ``nodes``)."""
        client = await self.client(nodes)
        return await find_datasets(client, self.url, tags, nodes,
                                   timeout=self.connect_timeout, experiment=experiment)

    async def _search(self, tags: Sequence[str] | str, nodes: Sequence[str] | None = None
                      ) -> pd.DataFrame:
        """Find the datasets tagged ``tags``: one row per node and matching dataset."""
        found = await self.find([tags] if isinstance(tags, str) else list(tags), nodes)
        return found.frame()

    async def _node_status(self, known: Iterable[str] = (),
                           datasets: Mapping[str, str] | None = None) -> pd.DataFrame:
        """Liveness: one row per node connected now or in ``known``.

        Columns: ``connected`` (its connection is up now), ``answers`` (it answered a ping
        just now), ``last_seen`` (UTC time of its latest message), ``ping_s`` (round trip),
        ``name``, and ``dataset`` (from ``datasets``, ``{node: dataset name}``).
        """
        client = await self.client()
        peers = client.peers()
        pongs: dict[str, tuple[Pong, float]] = {}
        async for reply in client.scatter(dict.fromkeys(sorted(peers), Ping()),
                                          timeout=min(self.connect_timeout, _PING_S)):
            pong = reply.expect(Pong)
            if pong is not None:
                pongs[reply.node] = (pong, reply.seconds)
        rows = []
        for node in sorted({*peers, *known, *client.last_heard}):
            pong, ping_s = pongs.get(node, (None, None))
            heard = client.last_heard.get(node)
            rows.append({
                "node": node, "connected": node in peers, "answers": pong is not None,
                "last_seen": pd.Timestamp(heard, unit="s", tz="UTC") if heard else pd.NaT,
                "ping_s": ping_s, "name": pong.name if pong else None,
                "dataset": (datasets or {}).get(node),
            })
        return pd.DataFrame(rows, columns=["node", "connected", "answers", "last_seen",
                                           "ping_s", "name", "dataset"])

    async def _connect(self) -> Federation:
        """Connect now (instead of on first use); return the session."""
        await self.client()
        return self

    # --- the public API: each call once synchronous (scripts, Jupyter), once async ------------

    connect = _runtime.blocking(_connect)
    aconnect = _runtime.awaitable(_connect)
    search = _runtime.blocking(_search)
    asearch = _runtime.awaitable(_search)
    node_status = _runtime.blocking(_node_status)
    anode_status = _runtime.awaitable(_node_status)
    close = _runtime.blocking(_close)
    aclose = _runtime.awaitable(_close)

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Selection:
    """The datasets a tool works on: its tags, its nodes, and what the last search found.

    The search is repeated only when needed: never searched, the tags or nodes changed, or
    the set of connected nodes changed since (a node left, or came back after a restart).
    """

    def __init__(self, tags: Sequence[str] | str, nodes: Sequence[str] | None = None):
        self.tags = tags
        self.nodes = nodes
        #: node -> the dataset it serves (``None`` until searched).
        self.targets: dict[str, dict[str, Any]] | None = None
        #: Nodes that held the data but left the federation.
        self.gone: list[str] = []
        self._searched_peers: frozenset[str] = frozenset()

    @property
    def tags(self) -> list[str]:
        """Dataset tags to use; changing them repeats the search."""
        return list(self._tags)

    @tags.setter
    def tags(self, tags: Sequence[str] | str) -> None:
        if isinstance(tags, str):
            tags = [tags]
        if not tags:
            raise ConfigurationError("Expected at least one dataset tag. Received: []")
        self._tags = [str(t) for t in tags]
        self.targets = None

    @property
    def nodes(self) -> list[str] | None:
        """Only these nodes take part (``None``: every node with matching data)."""
        return None if self._nodes is None else list(self._nodes)

    @nodes.setter
    def nodes(self, nodes: Sequence[str] | None) -> None:
        self._nodes = None if nodes is None else [str(n) for n in nodes]
        self.targets = None

    async def search(self, fed: Federation, experiment: str = "") -> Found:
        """Search now; remember what was found."""
        found = await fed.find(self._tags, self._nodes, experiment=experiment)
        self._searched_peers = found.connected
        self.targets = found.targets
        return found

    async def current(self, fed: Federation, experiment: str = "") -> dict[str, dict[str, Any]]:
        """The targets, searched first if never searched."""
        if self.targets is None:
            await self.search(fed, experiment)
            self.gone = []
        assert self.targets is not None
        return self.targets

    async def for_round(self, fed: Federation, rnd: int, experiment: str = ""
                        ) -> tuple[list[str], list[str]]:
        """``(nodes with data, connected; nodes with data that are gone)`` for round ``rnd``.

        Searches again when the connected nodes changed since the last search.
        """
        if self.targets is None:
            await self.current(fed, experiment)
        else:
            peers = frozenset((await fed.client(self._nodes)).peers())
            if peers != self._searched_peers:
                await self._search_again(fed, peers, rnd, experiment)
        assert self.targets is not None
        return list(self.targets), [n for n in self.gone if n not in self.targets]

    async def _search_again(self, fed: Federation, peers: frozenset[str], rnd: int,
                            experiment: str) -> None:
        known = set(self.targets or ()) | set(self._nodes or ())
        wanted = None if self._nodes is None else [n for n in self._nodes if n in peers]
        log.info("Round %d: the connected nodes changed (%s); searching again.", rnd,
                 ", ".join(sorted(peers)) or "none")
        if wanted == [] or not peers:
            gone = sorted(known)
            raise RoundError(f"Round {rnd}: none of the nodes {gone} is connected to "
                             f"{fed.url}.", failures=dict.fromkeys(gone, "not connected"))
        found = await fed.find(self._tags, wanted, experiment=experiment)
        self._searched_peers = found.connected
        self.targets = found.targets
        self.gone = sorted(n for n in known - set(self.targets) if n not in peers)

    def dataset_names(self) -> dict[str, str]:
        """``{node: dataset name}`` of the last search."""
        return {n: t["name"] for n, t in (self.targets or {}).items()}


def _account(url: str) -> str | None:
    """The user name a URL logs in with (``user@`` or ``?username=``), if any."""
    parts = urlsplit(url)
    given = parse_qs(parts.query).get("username")
    try:
        user = parts.username
    except ValueError:
        user = None
    return given[0] if given and given[0] else (unquote(user) if user else None)
