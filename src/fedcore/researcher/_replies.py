"""How the researcher's statistics account for a node that did not answer (clear or secure)."""

from __future__ import annotations

from fedcore.errors import FedcoreError, GovernanceError, RoundError
from fedcore.wire.rpc import Reply

__all__ = ["nobody_answered", "outcome"]


def nobody_answered(failed: dict[str, tuple[str, str]]) -> FedcoreError:
    """The error when every node failed: ``GovernanceError`` if all refused, else ``RoundError``."""
    detail = "; ".join(f"{n}: {m}" for n, (_, m) in sorted(failed.items()))
    if failed and all(s == "refused" for s, _ in failed.values()):
        return GovernanceError(f"Every node refused the statistics request. {detail}",
                               reason=detail)
    return RoundError(f"No node answered the statistics request. {detail}",
                      failures={n: m for n, (_, m) in failed.items()})


def outcome(reply: Reply) -> tuple[str, str]:
    """Why a node gave no statistics: ``("refused" or "failed", message)``."""
    if reply.remote:
        return ("refused" if reply.kind == "governance" else "failed",
                f"{reply.message} ({reply.kind} error)")
    return "failed", reply.why()
