"""``fedcore-node identity`` and ``fedcore-node trust``: the node's side of enrollment.

The node admin prints the node's public key (``identity``) for the researcher to enroll,
and trusts the researcher's public key (``trust add NAME KEY``). On a network the node
answers only trusted researchers.
"""

from __future__ import annotations

import argparse
import base64
from collections.abc import Callable
from typing import Any

from fedcore.node import Node
from fedcore.wire.identity import fingerprint


def add_parsers(sub: Any) -> None:
    """Add ``identity`` and ``trust`` to ``fedcore-node``'s parser."""
    sub.add_parser("identity", help="print this node's public key and fingerprint (give "
                   "them to the researcher, who enrolls the node)")
    trust = sub.add_parser("trust", help="the researchers this node answers: add, list, "
                           "remove")
    tsub = trust.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = tsub.add_parser("add", help="trust a researcher's public key (printed on their side "
                        "by `fedcore identity`)")
    p.add_argument("name", help="a name for the researcher, used in logs and the audit log")
    p.add_argument("key", help="the researcher's public key (base64 or hex)")
    tsub.add_parser("list", help="trusted researchers and their key fingerprints")
    p = tsub.add_parser("remove", help="stop trusting a researcher")
    p.add_argument("name")


def handler(command: str) -> Callable[[argparse.Namespace, Node, Any], int] | None:
    """The function carrying out ``command``, or ``None``."""
    return {"identity": _identity, "trust": _trust}.get(command)


def _identity(args: argparse.Namespace, node: Node, out: Any) -> int:
    print(f"node id:     {node.node_id}\npublic key:  {node.identity.public_key}\n"
          f"fingerprint: {node.identity.fingerprint}\n\nThe researcher enrolls this node "
          f"with: fedcore enroll {node.node_id} "
          f"{node.identity.public_key}", file=out)
    return 0


def _trust(args: argparse.Namespace, node: Node, out: Any) -> int:
    from fedcore_node._commands import _admin, table

    if args.action == "add":
        node.trust(args.name, args.key, by=_admin())
        key = node.trusted_researchers[args.name]
        print(f"Trusted researcher {args.name!r} ({fingerprint(key)}).", file=out)
    elif args.action == "remove":
        node.untrust(args.name, by=_admin())
        print(f"No longer trusting {args.name!r}.", file=out)
    else:
        rows = [{"name": n, "fingerprint": fingerprint(k),
                 "public key": base64.b64encode(k).decode()}
                for n, k in node.trusted_researchers.items()]
        print(table(rows, ["name", "fingerprint", "public key"]) if rows else
              "No trusted researcher: on a network this node refuses every request. Add "
              "one with: fedcore-node trust add NAME KEY", file=out)
    return 0
