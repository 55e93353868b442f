"""One exception root for fedcore, split by what the caller can do about it.

``FedcoreError``
    ``TransportError``      the network failed; retrying may help.
    ``ProtocolError``       a frame was malformed, oversized, of an unknown type or version.
    ``GovernanceError``     a node refused the request; ``reason`` says why.
    ``PlanError``           the researcher's training plan failed (on a node or locally).
    ``DatasetError``        a dataset is missing, unavailable or does not fit the request.
    ``ConfigurationError``  the call was wrong: fix the arguments or install an extra.
    ``RoundError``          no node produced a usable update in a round.
        ``SecureAggregationError``  secure aggregation cannot produce the sum this round.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigurationError",
    "DatasetError",
    "FedcoreError",
    "GovernanceError",
    "PlanError",
    "ProtocolError",
    "RoundError",
    "SecureAggregationError",
    "TransportError",
]


class FedcoreError(Exception):
    """Root of every error fedcore raises on purpose."""


class TransportError(FedcoreError):
    """The network failed to carry a frame (retryable)."""


class ProtocolError(FedcoreError):
    """A frame could not be understood: malformed, oversized, unknown type or version."""


class GovernanceError(FedcoreError):
    """A node refused a request under its own policy."""

    def __init__(self, message: str, *, node: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.node = node
        self.reason = reason or message


class PlanError(FedcoreError):
    """The researcher's training plan raised, on a node or while being prepared."""

    def __init__(
        self,
        message: str,
        *,
        node: str | None = None,
        exc_type: str | None = None,
        traceback: str | None = None,
    ):
        super().__init__(message)
        self.node = node
        self.exc_type = exc_type
        self.traceback = traceback


class DatasetError(FedcoreError):
    """A dataset is missing, unavailable, ambiguous or does not fit the request."""


class ConfigurationError(FedcoreError, ValueError):
    """The arguments or the installation are wrong; the message says how to fix it."""


class MissingDependencyError(ConfigurationError):
    """A package this machine needs is not installed; the message names what installs it.

    On a node it is the node's installation that lacks it: the round fails with kind
    ``dependency`` and its administrator installs the package (not the researcher's plan).
    """


def lacking(node: str, exc: BaseException) -> str:
    """What a researcher reads when node ``node`` lacks a package: who installs it."""
    return (f"Node {node} lacks a package this round needs: {exc} This is the node's "
            "installation, not the plan: its administrator installs it, then the round can "
            "run there.")


class RoundError(FedcoreError):
    """No node produced a usable update in a round; ``failures`` maps node to its error."""

    def __init__(self, message: str, *, failures: dict[str, Any] | None = None):
        super().__init__(message)
        self.failures = dict(failures or {})


class SecureAggregationError(RoundError):
    """Secure aggregation cannot produce this round's sum; it never returns a wrong one.

    Too few nodes remain for the scheme's threshold, a node the scheme cannot do without
    dropped out, or a reconstructed secret failed its check. ``failures`` maps the nodes
    concerned to what went wrong; rerunning the round (with the nodes that are reachable)
    is the fix.
    """
