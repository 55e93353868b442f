"""``fedcore-node budget``: the privacy budget each dataset has spent, and its limit."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from fedcore.governance import PrivacyLedger, budget_summary
from fedcore.node import Node


def add_parsers(sub: Any) -> None:
    """Add ``budget`` to ``fedcore-node``'s parser."""
    p = sub.add_parser("budget", help="differential privacy spent per dataset, and its limit "
                       "(policy dp_max_epsilon)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def handler(command: str) -> Callable[[argparse.Namespace, Node, Any], int] | None:
    """The function carrying out ``command``, or ``None``."""
    return {"budget": _budget}.get(command)


def rows(node: Node) -> list[dict[str, Any]]:
    """:func:`~fedcore.governance.budget_summary` of every dataset of ``node``."""
    return budget_summary(PrivacyLedger(node.db), node.datasets.list(), node.policy)


def _number(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"


def _budget(args: argparse.Namespace, node: Node, out: Any) -> int:
    from fedcore_node._commands import _when, table

    found = rows(node)
    if args.json:
        print(json.dumps(found, indent=1), file=out)
        return 0
    if not found:
        print("No datasets. Add one with: fedcore-node dataset add ...", file=out)
        return 0
    shown = [{"id": r["dataset"], "name": r["name"], "epsilon spent": _number(r["epsilon_spent"]),
              "limit": _number(r["epsilon_limit"]),
              "remaining": _number(r["epsilon_remaining"]), "DP rounds": r["dp_rounds"],
              "last DP round": _when(r["last_round_at"])} for r in found]
    print(table(shown, ["id", "name", "epsilon spent", "limit", "remaining", "DP rounds",
                        "last DP round"]), file=out)
    print(f"(epsilon at delta {found[0]['delta']:g}; set limits with `fedcore-node policy set "
          "dp_max_epsilon=8` or a table per dataset)", file=out)
    return 0
