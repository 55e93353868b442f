"""What a node brings to a secure-aggregation session: its floors, its key, the peers it knows.

The researcher configures a scheme, but a node takes part in a round only on its own terms.
:class:`NodeFloors` are the node's limits (its policy settings ``secagg_min_members``,
``secagg_min_key_bits`` and ``secagg_jl_moduli``; the threshold floor, a strict majority of
the round's members, always holds). :class:`NodeContext` adds the node's identity key, which
signs the round keys it hands out, and its peer list: the identity keys of the other nodes,
against which their round keys are verified before any pairwise secret is derived.

Without a peer list (``peers=None``) a node verifies each peer's round keys against the
identity key relayed with them: that stops anyone who merely relays messages (a broker) from
swapping keys, but not the researcher, who can make up a member with a key of its own. With
a peer list, a member the node does not know is refused. docs/secure-aggregation.md says what
holds in each case.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedcore.errors import ProtocolError
from fedcore.secagg import _crypto as C

__all__ = ["EphemeralSigner", "NodeContext", "NodeFloors", "Signer", "majority"]

_SIG_BYTES = 64
_KEY_BYTES = 32


def majority(n_members: int) -> int:
    """The smallest threshold a node accepts for ``n_members``: a strict majority."""
    return n_members // 2 + 1


@dataclass(frozen=True)
class NodeFloors:
    """A node's limits on the rounds it takes part in, whatever the researcher asks.

    Args:
        min_members: fewest nodes in a secure round (the sum of fewer reveals too much; a
            one-node "sum" is that node's update).
        min_key_bits: smallest Joye-Libert modulus, in bits.
        jl_moduli: SHA-256 digests (hex) of Joye-Libert moduli the node's administrator
            installed, beside the ones a node the node knows generated and signed.
    """

    min_members: int = 3
    min_key_bits: int = 2048
    jl_moduli: frozenset[str] = field(default_factory=frozenset)


class Signer(Protocol):
    """An Ed25519 key that signs (``fedcore.wire.identity.Identity`` is one)."""

    @property
    def public_bytes(self) -> bytes:
        """The raw 32-byte public key."""
        ...

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        ...


class EphemeralSigner:
    """An Ed25519 key held in memory only: nodes simulated in memory without a home."""

    def __init__(self) -> None:
        self._key = Ed25519PrivateKey.generate()
        self.public_bytes = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        return self._key.sign(message)


@dataclass(frozen=True)
class NodeContext:
    """A node's terms for one session: floors, identity key, peer list, the experiment.

    ``peers`` maps node ids to raw Ed25519 public keys; ``None`` means the node keeps no peer
    list and verifies round keys against the identity keys relayed with them. ``experiment``
    is the experiment the session was set up for (the signed round keys name it).
    """

    floors: NodeFloors = field(default_factory=NodeFloors)
    signer: Signer = field(default_factory=EphemeralSigner)
    peers: Mapping[str, bytes] | None = None
    experiment: str = ""

    def check_members(self, node_id: str, members: Sequence[str]) -> None:
        """``ProtocolError`` when the round is too small or has members the node does not know."""
        floor = self.floors.min_members
        if len(members) < floor:
            raise ProtocolError(
                f"Expected a secure round of at least {floor} nodes (this node's policy "
                f"secagg_min_members). Received a round of {len(members)}: {list(members)}. "
                "The sum of so few updates reveals them; run the round with more nodes.")
        if self.peers is not None:
            unknown = [m for m in members if m != node_id and m not in self.peers]
            if unknown:
                raise ProtocolError(
                    f"Round members {unknown} are not in this node's peer list, so their round "
                    "keys cannot be verified: refused. Fix: the node's administrator adds each "
                    "genuine node with `fedcore-node peer add NODE_ID KEY` (its key is printed "
                    "by `fedcore-node identity` on that node).")

    def sign_keys(self, statement: bytes) -> dict[str, bytes]:
        """The fields a setup reply carries to vouch for its keys: identity key, signature."""
        return {"identity": self.signer.public_bytes, "sig": self.signer.sign(statement)}

    def key_of(self, node_id: str, member: str, relayed: object) -> bytes:
        """The identity key to verify ``member``'s signatures with (peer list, else relayed)."""
        if member == node_id:
            return self.signer.public_bytes
        if self.peers is not None:
            key = self.peers.get(member)
            if key is None:
                raise ProtocolError(
                    f"Node {member!r} is not in this node's peer list: its keys are refused. "
                    "Fix: `fedcore-node peer add NODE_ID KEY` on this node.")
            return key
        if not isinstance(relayed, bytes) or len(relayed) != _KEY_BYTES:
            raise ProtocolError(f"Expected the 32-byte identity key of node {member!r} with "
                                "its round keys.")
        return relayed

    def verify(self, node_id: str, member: str, statement: bytes, relayed_key: object,
               sig: object, what: str) -> None:
        """``ProtocolError`` unless ``sig`` is ``member``'s signature of ``statement``."""
        key = self.key_of(node_id, member, relayed_key)
        if not isinstance(sig, bytes) or len(sig) != _SIG_BYTES:
            raise ProtocolError(f"The {what} of node {member!r} carry no signature: refused "
                                "(unsigned round keys may come from anyone).")
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(sig, statement)
        except (InvalidSignature, ValueError):
            source = "its key in this node's peer list" if self.peers is not None else (
                "the identity key relayed with them")
            raise ProtocolError(
                f"The signature on the {what} of node {member!r} does not verify against "
                f"{source}: they were altered or made up by someone else. Refused.") from None


def keys_statement(scheme: str, session: str, experiment: str, round: int,
                   members: Collection[str], node: str, keys: Mapping[str, bytes]) -> bytes:
    """What a node signs for its round keys: the session, the members, itself and the keys."""
    parts = [f"{k}={bytes(v).hex()}" for k, v in sorted(keys.items())]
    return C.label("round-keys", scheme, session, experiment, round, ",".join(sorted(members)),
                   node, *parts)


def modulus_digest(modulus: bytes) -> str:
    """The SHA-256 (hex) of a Joye-Libert modulus as it travels (little-endian bytes)."""
    return hashlib.sha256(modulus).hexdigest()


def modulus_statement(digest: str, bits: int, dealer: str) -> bytes:
    """What the node that generated a Joye-Libert modulus signs (it forgot the factors)."""
    return C.label("jl-modulus", digest, bits, dealer)
