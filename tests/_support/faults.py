"""Nodes that fail on purpose, for the secure-aggregation tests (training and statistics)."""

from __future__ import annotations

import asyncio

from fedcore import Node


class DiesBeforeUnmasking(Node):
    """A node that sends its protected update, then leaves when asked for its shares."""

    async def _on_secagg(self, env):
        if env.body.phase == "unmask":
            await self._transport.close()  # gone, as if its process had been killed
            await asyncio.Event().wait()
        return super()._on_secagg(env)
