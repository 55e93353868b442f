"""Which senders a broker endpoint hears: everyone, or, under a flood, the ones it verified.

A broker delivers an endpoint's messages over one stream, in the order they were published.
When strangers publish on its inbox faster than the endpoint's MQTT client reads (a Python
client reads some thousands of messages a second), their junk queues in the broker and in
TCP ahead of everything else, a trusted researcher's requests included: no code on the
receiving side can reorder that. What it can do is stop asking for the junk. The inbox is
one subscription per sender name (``.../to/<me>/from/<sender>``); normally the endpoint
subscribes to the wildcard ``.../from/+`` so that anyone may make first contact.

:class:`Door` counts the messages from senders the core never verified. Beyond
``strangers_per_s`` of them in a second it closes: the endpoint subscribes to the exact topic
of each sender it verified and drops the wildcard, so the broker discards the strangers'
messages instead of queueing them, and the verified senders' messages no longer wait behind
them. After ``closed_s`` it opens again (the wildcard back, the exact topics dropped); if the
flood goes on, it closes again within a fraction of a second.

What this protects, and what it does not: a flood under *new* sender names (the cheapest
for an attacker without a broker account, and what a misbehaving client of a shared broker
does) no longer delays the verified senders. A stranger who publishes under a verified
sender's own name (``.../from/researcher``) is not kept out by this: only the broker's ACL
(docs/deployment.md: only the researcher's account may publish under its name) does that.
While the door is closed a sender never verified before (a new researcher, a node that
joins) is not heard until it opens again.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["Door"]

STRANGERS_PER_S = 100  #: messages a second from never-verified senders that close the door
CLOSED_S = 10.0  #: how long the door stays closed before everyone is heard again
KNOWN = 4096  #: verified sender names kept (the least recently verified go first)

#: ``(subscribe, unsubscribe)``: topic filters to change, in this order (subscribing first:
#: a message that matches both for an instant may come twice, and the core drops the
#: replay; none is lost).
Change = Callable[[list[str], list[str]], None]


class Door:
    """The inbox subscriptions of one endpoint whose inbox topics start with ``prefix``.

    ``apply`` changes the subscriptions; it is called under the door's lock, so changes reach
    the broker in the order they were decided (from the client's thread and the event loop).
    """

    def __init__(self, prefix: str, apply: Change, *,
                 strangers_per_s: int = STRANGERS_PER_S, closed_s: float = CLOSED_S,
                 cap: int = KNOWN, clock: Callable[[], float] = time.monotonic):
        self.prefix = prefix
        self.strangers_per_s = strangers_per_s
        self.closed_s = closed_s
        self.closed = False
        #: How many times the door closed (for the log and the tests).
        self.closures = 0
        #: Messages from strangers the endpoint dropped unread while the door was closed
        #: (counted by the endpoint; :meth:`open` returns and resets it).
        self.shut_out = 0
        self._apply = apply
        self._cap = cap
        self._clock = clock
        self._known: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._count = 0
        self._since = 0.0

    @property
    def wildcard(self) -> str:
        return self.prefix + "+"

    def filters(self) -> list[str]:
        """What to subscribe to on (re)connection."""
        with self._lock:
            return self._filters()

    def knows(self, sender: str) -> bool:
        """Whether the core verified a message from ``sender`` (cheap: any thread)."""
        return sender in self._known

    def verified(self, sender: str) -> None:
        """The core verified a message from ``sender``."""
        if not sender:
            return
        with self._lock:  # the client's thread may be listing the names
            if sender in self._known:
                self._known.move_to_end(sender)
                return
            self._known[sender] = None
            gone = self._known.popitem(last=False)[0] if len(self._known) > self._cap else None
            if self.closed:
                self._apply([self.prefix + sender],
                            [self.prefix + gone] if gone is not None else [])

    def stranger(self) -> bool:
        """Count a message from a sender never verified; whether it closed the door now.

        With ``strangers_per_s`` 0 the door never closes.
        """
        if not self.strangers_per_s:
            return False
        now = self._clock()
        if now - self._since >= 1.0:
            self._since, self._count = now, 0
        self._count += 1
        if self._count != self.strangers_per_s:  # 0: never
            return False
        with self._lock:
            if self.closed or not self._known:  # nobody to keep hearing: stay open
                return False
            self.closed = True
            self.closures += 1
            self._apply(self._filters(), [self.wildcard])
        return True

    def open(self) -> int:
        """Listen to everyone again (``closed_s`` after the door closed).

        Returns how many messages from strangers were shut out meanwhile.
        """
        with self._lock:
            if not self.closed:
                return 0
            exact = self._filters()
            self.closed = False
            self._apply([self.wildcard], exact)
            self._count = 0
            shut_out, self.shut_out = self.shut_out, 0
            return shut_out

    def _filters(self) -> list[str]:
        if not self.closed:
            return [self.wildcard]
        return [self.prefix + sender for sender in self._known]
