"""Enrollment as a deployment does it: nodes trust the test researcher's key, and the
researcher enrolls the nodes' keys. The researcher's key file comes from FEDCORE_IDENTITY,
set for the whole session in conftest.py."""

from __future__ import annotations

from pathlib import Path

from fedcore import Node
from fedcore.wire.identity import public_key


def enroll(homes: dict[str, Path] | list[Node]) -> dict[str, str]:
    """Trust the researcher in each node (a home is created or reopened); ``{node_id: key}``.
    """
    enrolled = {}
    nodes = homes if isinstance(homes, list) else [Node(home, node_id=node_id)
                                                   for node_id, home in homes.items()]
    for node in nodes:
        if "tests" not in node.trusted_researchers:
            node.trust("tests", public_key())
        enrolled[node.node_id] = node.identity.public_key
        if not isinstance(homes, list):
            node._close_audit()
    return enrolled
