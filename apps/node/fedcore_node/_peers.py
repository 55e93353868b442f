"""``fedcore-node peer`` and ``fedcore-node secagg``: the node's side of secure aggregation.

``peer add NODE_ID KEY`` records another node's identity key (printed by ``fedcore-node
identity`` on that node). A node with a peer list verifies every round member's signed keys
against it and refuses members it does not know. ``secagg jl-modulus`` makes a Joye-Libert
modulus whose factors are forgotten at once, for a federation that publishes one: every
node's administrator adds its SHA-256 to the policy key ``secagg_jl_moduli``.
"""

from __future__ import annotations

import argparse
import base64
from collections.abc import Callable
from typing import Any

from fedcore.node import Node
from fedcore.wire.identity import fingerprint


def add_parsers(sub: Any) -> None:
    """Add ``peer`` and ``secagg`` to ``fedcore-node``'s parser."""
    peer = sub.add_parser("peer", help="the other nodes whose secure-aggregation keys this "
                          "node verifies: add, list, remove")
    psub = peer.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = psub.add_parser("add", help="know another node by its identity key (printed on that "
                        "node by `fedcore-node identity`)")
    p.add_argument("node", help="the other node's id")
    p.add_argument("key", help="its public key (base64 or hex)")
    psub.add_parser("list", help="known peers and their key fingerprints")
    p = psub.add_parser("remove", help="forget a peer")
    p.add_argument("node")
    secagg = sub.add_parser("secagg", help="secure-aggregation parameters")
    ssub = secagg.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = ssub.add_parser("jl-modulus", help="make a Joye-Libert modulus (its factors are "
                        "forgotten) and print it with its SHA-256")
    p.add_argument("--bits", type=int, default=2048, help="modulus size (default 2048)")


def handler(command: str) -> Callable[[argparse.Namespace, Node, Any], int] | None:
    """The function carrying out ``command``, or ``None``."""
    return {"peer": _peer, "secagg": _secagg}.get(command)


def _peer(args: argparse.Namespace, node: Node, out: Any) -> int:
    from fedcore_node._commands import _admin, table

    if args.action == "add":
        node.add_peer(args.node, args.key, by=_admin())
        key = (node.peers or {})[args.node]
        print(f"Peer {args.node!r} ({fingerprint(key)}): its round keys are verified against "
              "this key, and round members outside the peer list are refused.", file=out)
    elif args.action == "remove":
        node.remove_peer(args.node, by=_admin())
        left = "" if node.peers else (" The peer list is empty: round keys are checked "
                                      "against the keys relayed with them.")
        print(f"Forgot peer {args.node!r}.{left}", file=out)
    else:
        rows = [{"node": n, "fingerprint": fingerprint(k),
                 "public key": base64.b64encode(k).decode()}
                for n, k in (node.peers or {}).items()]
        print(table(rows, ["node", "fingerprint", "public key"]) if rows else
              "No peer list: this node checks each round member's keys against the identity "
              "key relayed with them, which does not stop a researcher from making up "
              "members. Add the federation's other nodes with: fedcore-node peer add NODE_ID "
              "KEY", file=out)
    return 0


def _secagg(args: argparse.Namespace, node: Node, out: Any) -> int:
    from fedcore.errors import ConfigurationError
    from fedcore.secagg import _bigint
    from fedcore.secagg.context import modulus_digest

    if args.bits < 2048 or args.bits % 8:
        raise ConfigurationError(f"Expected --bits a multiple of 8 of at least 2048. "
                                 f"Received {args.bits}.")
    modulus = _bigint.biprime(args.bits)  # p and q are never kept
    digest = modulus_digest(modulus.to_bytes(args.bits // 8, "little"))
    print(f"modulus: {modulus:x}\nsha256:  {digest}\n\nPublish both. Each node's "
          "administrator runs: fedcore-node policy set "
          f"'secagg_jl_moduli=[\"{digest}\"]'\nand the researcher passes "
          "JoyeLibert(modulus=\"<the hex above>\").", file=out)
    return 0
