"""A trusted researcher playing the attacker: hand-made bodies in correctly signed frames.

The node under attack runs for real (``Node.start`` on a websocket URL, or a node process);
:class:`Attacker` signs with a real researcher key the node trusts, so the node's guard
accepts every frame and only the node's own checks stand between the attacker and the data::

    url, node = serve(tmp_path / "site", "site", trusted={"alice": alice_key_file})
    with Attacker(url, {"site": node.identity.public_bytes}, key=alice_key_file) as a:
        reply = a.ask("site", SearchRequest(tags=["x"]), sender="bob")   # claims to be bob
    node.stop()

``ask`` returns the reply envelope (its ``body`` is what the node answered). After the
scenario the attacker checks the node still answers a ping, unless told not to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedcore import _runtime
from fedcore.node import Node
from fedcore.testing.transport import wait_until
from fedcore.transport import open_transport
from fedcore.wire import codec
from fedcore.wire.identity import Identity, public_key
from fedcore.wire.messages import Body, Envelope, Ping, Pong, TrainProgress
from fedcore.wire.signing import Guard
from tests._support.net import free_port

__all__ = ["Attacker", "serve"]


def serve(home: Path, node_id: str, *, trusted: Mapping[str, str | Path] | None = None,
          **node_args: Any) -> tuple[str, Node]:
    """A node on a fresh loopback websocket URL, trusting ``{name: key file}`` researchers.

    Without ``trusted`` it trusts the session's test researcher (FEDCORE_IDENTITY) as
    ``tests``. Returns ``(url, node)``; the caller stops the node.
    """
    url = f"ws://127.0.0.1:{free_port()}"
    node = Node(home, node_id=node_id, **node_args)
    for name, key_file in (trusted or {"tests": ""}).items():
        node.trust(name, Identity(key_file).public_key if key_file else public_key())
    return url, node.start(url)


class Attacker:
    """A researcher transport that sends exactly the envelopes it is given, signed.

    ``nodes`` maps node ids to their raw public keys (what the researcher enrolled); ``key``
    is the researcher's key file (default: the session's test researcher).
    """

    def __init__(self, url: str, nodes: Mapping[str, bytes], *, key: str | Path | None = None,
                 check_alive: bool = True, timeout: float = 30.0):
        self.url = url
        self.nodes = dict(nodes)
        self.identity = Identity(key) if key else None
        self.check_alive = check_alive
        self.timeout = timeout
        self._transport: Any = None
        self.guard: Guard | None = None

    # --- sync use (tests are synchronous; fedcore's runtime loop carries the transport) -----

    def __enter__(self) -> Attacker:
        _runtime.run(self.start())
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if exc[0] is None and self.check_alive:
                for node in self.nodes:  # the node still serves honest requests
                    pong = self.ask(node, Ping())
                    assert isinstance(pong.body, Pong), pong.body
        finally:
            _runtime.run(self.close())

    def ask(self, node: str, body: Body, **envelope: Any) -> Envelope:
        """Send ``body`` to ``node`` in an envelope with ``envelope``'s fields; the reply."""
        return _runtime.run(self.aask(node, body, **envelope))

    def send_frame(self, node: str, frame: bytes) -> Envelope:
        """Send raw bytes (already sealed, or not) to ``node``; the reply envelope."""
        return _runtime.run(self._exchange(node, frame))

    # --- async ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the transport and wait for every node to connect."""
        from fedcore.wire.identity import researcher_identity

        identity = self.identity or researcher_identity()
        self._transport = open_transport(self.url, role="researcher", identity="attacker")
        await self._transport.start()
        self.guard = Guard(identity, lambda: self.nodes, networked=True,
                           max_size=codec.DEFAULT_MAX_FRAME)
        await wait_until(lambda: set(self.nodes) <= set(self._transport.peers()),
                         f"nodes {sorted(self.nodes)} to connect", timeout=self.timeout)

    async def close(self) -> None:
        """Close the transport."""
        if self._transport is not None:
            await self._transport.close()

    def seal(self, node: str, body: Body, **envelope: Any) -> tuple[Envelope, bytes]:
        """The envelope and its signed frame (``sender``, ``experiment``, ``round`` settable).
        """
        assert self.guard is not None
        fields = {"sender": "researcher", "experiment": "exp-1", "round": 1, **envelope}
        env = Envelope(body, recipient=node, **fields)
        return env, self.guard.seal(env)

    async def aask(self, node: str, body: Body, **envelope: Any) -> Envelope:
        """Async :meth:`ask`."""
        env, frame = self.seal(node, body, **envelope)
        reply = await self._exchange(node, frame)
        assert reply.reply_to == env.id, (reply.reply_to, env.id)
        return reply

    async def _exchange(self, node: str, frame: bytes) -> Envelope:
        assert self.guard is not None
        await self._transport.send(node, frame)
        while True:  # progress messages may come before the reply
            _, got = await asyncio.wait_for(self._transport.receive(), self.timeout)
            env, _ = self.guard.open(got)
            if not isinstance(env.body, TrainProgress):
                return env
