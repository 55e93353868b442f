"""A researcher that speaks the wire by hand: frames sent one by one, replies read back."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from fedcore import _runtime
from fedcore.transport import open_transport
from fedcore.wire import codec
from fedcore.wire.messages import Body, Envelope


def talk(url: str, recipient: str, bodies: Iterable[Body]) -> list[Body]:
    """Send each body to ``recipient`` in turn over a raw transport; return the reply bodies."""
    async def go() -> list[Body]:
        t = open_transport(url, role="researcher", identity="raw-researcher")
        await t.start()
        replies = []
        try:
            for body in bodies:
                env = Envelope(body, sender="raw-researcher", recipient=recipient,
                               experiment="exp-1", round=1)
                await t.send(recipient, codec.encode(env))
                _, frame = await asyncio.wait_for(t.receive(), 30)
                replies.append(codec.decode(frame).body)
        finally:
            await t.close()
        return replies

    return _runtime.run(go())
