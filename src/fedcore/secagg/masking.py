"""Pairwise masking with drop-out recovery (Bonawitz et al., CCS 2017), semi-honest setting.

Phases of a round among nodes ``1..n`` (the researcher only relays; it never holds a private
key or a share in clear):

1. **setup**: each node makes two X25519 key pairs, ``c`` (to encrypt shares) and ``s`` (to
   agree pairwise masks), and returns the public halves.
2. **share_keys**: given every node's public keys, node ``i`` draws a self-mask seed ``b_i``,
   splits ``b_i`` and its mask private key ``s_i`` t-of-n with Shamir's scheme, and seals
   each other node's shares with AES-GCM under ``HKDF(X25519(c_i, c_j))`` (session, round,
   sender and recipient bound as associated data). It also commits to ``b_i`` (SHA-256).
3. **protect** (with training): the fixed-point vector of ``w_i * update_i`` plus
   ``PRG(b_i)``, plus ``PRG(s_ij)`` for every other node ``j`` when ``i < j`` and minus it when
   ``i > j`` (``s_ij = HKDF(X25519(s_i, s_j))``; the PRG is AES-128-CTR read as words of
   the ring: uint64, or uint32 with ``ring_bits=32``).
   Pairwise masks cancel in the sum; the self-mask protects an update that arrives late.
4. **unmask**: each node whose payload arrived (survivors ``U``) is told ``U`` and the
   drop-outs ``D`` and returns its shares of ``b_i`` for ``i`` in ``U`` and of ``s_j`` for
   ``j`` in ``D``, never both for the same node (it refuses a second, different split).
5. **unprotect_sum**: with at least ``t`` unmask replies the researcher rebuilds every
   ``b_i`` (checked against its commitment) and every ``s_j`` (checked against its public
   key), removes the self-masks and the survivors' masks with the drop-outs, and decodes.
   Fewer than ``t`` replies raise :class:`~fedcore.errors.SecureAggregationError`.

Shares travel in a phase of their own, before training, because a node that drops out
during training must already have shared its mask key for the others' masks to be removable.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fedcore.errors import ConfigurationError, FedcoreError, ProtocolError, SecureAggregationError
from fedcore.params import ParameterSet
from fedcore.secagg import _crypto as C
from fedcore.secagg._background import Background, Pending
from fedcore.secagg.base import (
    NodeSession,
    ResearcherSession,
    SecureAggregation,
    SecureSum,
    _field,
    _node_list,
)
from fedcore.secagg.context import NodeContext, keys_statement, majority
from fedcore.secagg.fixedpoint import Encoding, Layout
from fedcore.secagg.shamir import SHARE_BYTES, ShareError, combine_bytes, split_bytes

__all__ = ["PairwiseMasking"]

_SEED = 16  # bytes of b_i and of each PRG key
#: The rings a round may sum in: bits -> the vector's dtype (numpy's unsigned arithmetic
#: wraps modulo 2^bits for free).
_RINGS: dict[int, type[np.unsignedinteger[Any]]] = {64: np.uint64, 32: np.uint32}
#: Masks precomputed and not yet used, per process: one vector of the ring each. A deployed node
#: has one round in flight; a simulation runs many nodes in one process, where the nodes past
#: this many mask after training instead (their cores are shared anyway).
MAX_PRECOMPUTED = 2
_precomputed = threading.BoundedSemaphore(MAX_PRECOMPUTED)


class PairwiseMasking(SecureAggregation):
    """Pairwise additive masks that cancel in the sum; survives drop-outs down to ``threshold``.

    Args:
        threshold: nodes needed to unmask (t of Shamir's t-of-n); default a majority of the
            round's nodes, ``n // 2 + 1``, which is also the least any node accepts (with
            fewer, two disjoint groups told different drop-outs would rebuild both masks of
            one node). More drop-outs than ``n - t`` fail the round.
        clip: values are clipped to ``[-clip, clip]``; ``None`` chooses it each round from
            the global model (``clip_margin * max(1, max |value|)``).
        extras_clip: the range for extras (e.g. SCAFFOLD corrections); ``None``: ``clip``'s.
        clip_margin: the factor of the automatic range.
        max_weight: the largest weight a node may send; ``None``: the largest of the
            researcher's weight hints, else ``2**20``.
        ring_bits: 64 (default) or 32: the sums are exact modulo ``2**ring_bits``. A 32-bit
            ring halves the masks' keystream, the additions and the upload (4 bytes per value
            instead of 8), at a fixed-point step ``2**32`` times coarser: the average's
            resolution is then about ``clip * 2**-29`` (``step`` and ``error_bound`` in the
            round's report), so it suits an explicit, tight ``clip``. See
            docs/secure-aggregation.md.
    """

    name = "masking"
    tolerates_dropout = True

    def __init__(self, threshold: int | None = None, clip: float | None = None,
                 extras_clip: float | None = None, clip_margin: float = 1024.0,
                 max_weight: float | None = None, ring_bits: int = 64):
        if threshold is not None and (not isinstance(threshold, int) or threshold < 1):
            raise ConfigurationError(f"Expected threshold to be a positive int or None. "
                                     f"Received {threshold!r}.")
        for key, value in (("clip", clip), ("extras_clip", extras_clip),
                           ("max_weight", max_weight)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ConfigurationError(f"Expected {key} to be a positive number or None. "
                                         f"Received {value!r}.")
        if not (isinstance(clip_margin, (int, float)) and clip_margin > 0):
            raise ConfigurationError(f"Expected a positive clip_margin. Received {clip_margin!r}.")
        if ring_bits not in _RINGS or isinstance(ring_bits, bool):
            raise ConfigurationError(f"Expected ring_bits to be one of {sorted(_RINGS)}. "
                                     f"Received {ring_bits!r}.")
        self.threshold = threshold
        self.clip = clip
        self.extras_clip = extras_clip
        self.clip_margin = clip_margin
        self.max_weight = max_weight
        self.ring_bits = ring_bits

    def threshold_for(self, n_nodes: int) -> int:
        """The t used for a round of ``n_nodes`` nodes."""
        t = self.threshold if self.threshold is not None else majority(n_nodes)
        if not majority(n_nodes) <= t <= n_nodes:
            raise ConfigurationError(
                f"Expected a threshold from a strict majority of the round's {n_nodes} nodes "
                f"({majority(n_nodes)}) to {n_nodes}. Received threshold={t}. A smaller one "
                "lets inconsistent drop-out claims unmask one node's update: no node accepts "
                "it. Fix: leave threshold=None (a majority) or raise it.")
        return t

    def researcher_session(self, round: int, nodes: Sequence[str],
                           weights_hint: Mapping[str, float] | None = None,
                           reference: ParameterSet | None = None) -> ResearcherSession:
        """See :meth:`SecureAggregation.researcher_session`."""
        return _MaskingResearcher(self, round, nodes, weights_hint, reference)

    def node_session(self, node_id: str, options: Mapping[str, Any],
                     context: NodeContext | None = None) -> NodeSession:
        """See :meth:`SecureAggregation.node_session`."""
        return _MaskingNode(self, node_id, options, context)


def _pair_info(session: str, round: int, a: str, b: str, purpose: str) -> bytes:
    lo, hi = sorted((a, b))
    return C.label(purpose, session, round, lo, hi)


def _self_mask_key(b: bytes, session: str, node: str) -> bytes:
    return C.kdf(b, C.label("self-mask", session, node), _SEED)


def _commitment(b: bytes, session: str, node: str) -> bytes:
    return hashlib.sha256(C.label("commit", session, node) + b).digest()


class _MaskingResearcher(ResearcherSession):
    scheme: PairwiseMasking

    def __init__(self, scheme: PairwiseMasking, round: int, nodes: Sequence[str],
                 weights_hint: Mapping[str, float] | None, reference: ParameterSet | None):
        super().__init__(scheme, round, nodes)
        self.t = scheme.threshold_for(len(self.nodes))
        self.encoding = Encoding.choose(
            len(self.nodes), clip=scheme.clip, extras_clip=scheme.extras_clip,
            clip_margin=scheme.clip_margin, max_weight=scheme.max_weight,
            weights_hint=weights_hint, reference=reference, ring_bits=scheme.ring_bits)
        self._dtype = np.dtype(_RINGS[scheme.ring_bits])
        self._keys: dict[str, tuple[bytes, bytes]] = {}  # U1: node -> (c_pk, s_pk)
        self._vouch: dict[str, dict[str, bytes]] = {}  # U1: node -> identity key, signature
        self._u1: list[str] | None = None
        self._shares: dict[str, dict[str, bytes]] = {}  # U2: sender -> recipient -> sealed
        self._commit: dict[str, bytes] = {}
        self._u2: list[str] | None = None
        self._sum: np.ndarray | None = None
        self._layout: Layout | None = None
        self._u3: list[str] = []
        self._frozen_u3: list[str] | None = None
        self._replies: dict[str, tuple[dict[str, bytes], dict[str, bytes]]] = {}
        self._result: SecureSum | None = None

    def _lost(self, stage: str, have: Sequence[str], among: Sequence[str]) -> None:
        if len(have) < self.t:
            missing = {n: f"no {stage}" for n in among if n not in have}
            raise SecureAggregationError(
                f"Only {len(have)} of {len(self.nodes)} nodes answered the {stage}; at least "
                f"t={self.t} are needed. Missing: {sorted(missing)}. The sum cannot be "
                "computed: rerun the round with the reachable nodes.", failures=missing)

    # --- phase 1 ------------------------------------------------------------------------
    def setup_requests(self) -> dict[str, dict[str, Any]]:
        return {n: self.opening() for n in self.nodes}

    def add_setup(self, node: str, reply: Mapping[str, Any]) -> None:
        self._check_message(node, reply, self.nodes, "setup reply")
        if self._u1 is not None:
            raise ProtocolError(f"The setup reply from {node!r} arrived after the share "
                                "phase began; the node is left out of this round.")
        keys = (_field(reply, "c_pk", bytes, "setup reply"),
                _field(reply, "s_pk", bytes, "setup reply"))
        if any(len(k) != C.KEY_BYTES for k in keys):
            raise ProtocolError(f"Expected 32-byte X25519 public keys from {node!r}.")
        self._vouch[node] = {k: _field(reply, k, bytes, "setup reply")
                             for k in ("identity", "sig")}
        self._keys[node] = keys

    # --- phase 2 ------------------------------------------------------------------------
    def share_requests(self) -> dict[str, dict[str, Any]]:
        if self._u1 is None:
            self._lost("setup", sorted(self._keys), self.nodes)
            self._u1 = sorted(self._keys)
        keys = {n: {"c_pk": c, "s_pk": s, **self._vouch[n]} for n, (c, s) in self._keys.items()}
        return {n: {**self.header(), "threshold": self.t, "keys": keys} for n in self._u1}

    def add_shares(self, node: str, reply: Mapping[str, Any]) -> None:
        self._check_message(node, reply, self._u1 or [], "share reply")
        if self._u2 is not None:
            raise ProtocolError(f"The shares from {node!r} arrived after training began; the "
                                "node is left out of this round.")
        shares = _field(reply, "shares", dict, "share reply")
        expected = set(self._u1 or []) - {node}
        if set(shares) != expected or not all(isinstance(v, bytes) for v in shares.values()):
            raise ProtocolError(f"Expected sealed shares from {node!r} for {sorted(expected)}. "
                                f"Received them for {sorted(shares)}.")
        commit = _field(reply, "commitment", bytes, "share reply")
        self._shares[node] = dict(shares)
        self._commit[node] = commit

    # --- phase 3 ------------------------------------------------------------------------
    @property
    def participants(self) -> list[str]:
        if self._u2 is None:
            if self._u1 is None:
                raise ConfigurationError("Run the setup and share phases before training: "
                                         "call setup_requests() and share_requests() first.")
            self._lost("share phase", sorted(self._shares), self._u1)
            self._u2 = sorted(self._shares)
        return list(self._u2)

    def train_options(self, node: str) -> dict[str, Any]:
        peers = self.participants
        if node not in peers:
            raise ConfigurationError(f"Expected one of this round's participants {peers}. "
                                     f"Received {node!r}.")
        return {**self.header(), "peers": peers, "encoding": self.encoding.to_wire()}

    def add_protected(self, node: str, payload: Mapping[str, Any]) -> None:
        self._check_message(node, payload, self.participants, "protected update")
        if self._frozen_u3 is not None or node in self._u3:
            raise ProtocolError(f"The update from {node!r} arrived twice or after unmasking "
                                "began; it is left out of the sum.")
        values = _field(payload, "values", np.ndarray, "protected update")
        layout = Layout.from_wire(_field(payload, "layout", dict, "protected update"))
        if values.dtype != self._dtype or values.shape != (layout.size,):
            raise ProtocolError(f"Expected {layout.size} {self._dtype} values from {node!r}. "
                                f"Received {values.dtype} {values.shape}.")
        self.encoding.check_received(layout, node, self._layout)
        with self._timed("add_protected_s"):
            if self._sum is None:
                self._layout, self._sum = layout, np.array(values, dtype=self._dtype, copy=True)
            else:
                np.add(self._sum, values, out=self._sum)  # wraps modulo the ring
        self._u3.append(node)

    # --- phase 4 ------------------------------------------------------------------------
    def unmask_requests(self) -> dict[str, dict[str, Any]]:
        peers = self.participants
        if self._frozen_u3 is None:
            self._lost("training (protected updates)", self._u3, peers)
            self._frozen_u3 = sorted(self._u3)
        survivors = self._frozen_u3
        dropped = [n for n in peers if n not in survivors]
        return {i: {**self.header(), "survivors": survivors, "dropped": dropped,
                    "shares": {j: self._shares[j][i] for j in peers if j != i}}
                for i in survivors}

    def add_unmask(self, node: str, reply: Mapping[str, Any]) -> None:
        survivors = self._frozen_u3 or []
        self._check_message(node, reply, survivors, "unmask reply")
        b = _field(reply, "b", dict, "unmask reply")
        s = _field(reply, "s", dict, "unmask reply")
        dropped = set(self.participants) - set(survivors)
        if set(b) != set(survivors) or set(s) != dropped:
            raise ProtocolError(f"Expected from {node!r} shares of the self-mask seeds of "
                                f"{sorted(survivors)} and of the mask keys of {sorted(dropped)}. "
                                f"Received {sorted(b)} and {sorted(s)}.")
        if not all(isinstance(v, bytes) and len(v) == SHARE_BYTES
                   for v in (*b.values(), *s.values())):
            raise ProtocolError(f"Malformed shares from {node!r}: expected {SHARE_BYTES} "
                                "bytes each.")
        self._replies[node] = (dict(b), dict(s))

    # --- phase 5 ------------------------------------------------------------------------
    def unprotect_sum(self) -> SecureSum:
        if self._result is not None:
            return self._result
        if self._frozen_u3 is None or self._sum is None or self._layout is None:
            raise ConfigurationError("Call unmask_requests() and collect the replies before "
                                     "unprotect_sum().")
        survivors, peers = self._frozen_u3, self.participants
        dropped = [n for n in peers if n not in survivors]
        self._lost("unmask request", sorted(self._replies), survivors)
        with self._timed("unmask_s"):
            secrets = self._recover(survivors, dropped)
            seeds = []
            for i in survivors:
                b = secrets[("b", i)]
                if _commitment(b, self.session_id, i) != self._commit[i]:
                    raise SecureAggregationError(f"The self-mask seed rebuilt for {i!r} does "
                                                 "not match its commitment: a share is wrong.",
                                                 failures={i: "bad self-mask shares"})
                seeds.append((_self_mask_key(b, self.session_id, i), -1))
            for j in dropped:
                s_sk = C.private_key(secrets[("s", j)])
                if C.public_of(s_sk) != self._keys[j][1]:
                    raise SecureAggregationError(f"The mask key rebuilt for {j!r} does not "
                                                 "match its public key: a share is wrong.",
                                                 failures={j: "bad mask-key shares"})
                for i in survivors:
                    key = C.agree(s_sk, self._keys[i][1],
                                  _pair_info(self.session_id, self.round, i, j, "mask"), _SEED)
                    seeds.append((key, -1 if i < j else 1))  # undo what i applied
            # In place: every check above passed, and the unmasked sum is kept below, so
            # the masks are never removed twice (a copy would cost a pass over the model).
            # On the idle cores: the researcher waits for nothing else.
            total, self._sum = self._sum, None
            C.apply_masks_spread(total, seeds)
        with self._timed("decode_s"):
            # over the sum itself (no new array): it is dropped above, never used again
            sums, weight, extras, report = self.encoding.decode_in_place(
                total, self._layout, len(survivors))
        report.update({"scheme": self.scheme.name, "nodes": len(survivors),
                       "survivors": list(survivors), "dropped": dropped, "recovered": dropped,
                       "unmask_replies": len(self._replies), "threshold": self.t,
                       "timings": dict(self.timings)})
        self._result = SecureSum(sums, weight, extras, report)
        return self._result

    def _recover(self, survivors: Sequence[str], dropped: Sequence[str]
                 ) -> dict[tuple[str, str], bytes]:
        """Every b_i (i survived) and s_j (j dropped), from the unmask replies, at once."""
        x = {n: i + 1 for i, n in enumerate(self.nodes)}
        points = {x[k]: b"".join([b[i] for i in survivors] + [s[j] for j in dropped])
                  for k, (b, s) in self._replies.items()}
        sizes = [_SEED] * len(survivors) + [C.KEY_BYTES] * len(dropped)
        try:
            values = combine_bytes(points, self.t, sizes)
        except ShareError as exc:
            by_x = {v: k for k, v in x.items()}
            culprit = by_x.get(exc.x, "unknown") if exc.x is not None else "unknown"
            raise SecureAggregationError(f"Cannot rebuild the masks' secrets: {exc} (from the "
                                         f"unmask reply of {culprit!r}).",
                                         failures={culprit: str(exc)}) from exc
        keys = [("b", i) for i in survivors] + [("s", j) for j in dropped]
        return dict(zip(keys, values, strict=True))


class _MaskingNode(NodeSession):
    scheme: PairwiseMasking

    def __init__(self, scheme: PairwiseMasking, node_id: str, options: Mapping[str, Any],
                 context: NodeContext | None = None):
        super().__init__(scheme, node_id, options, context)
        self.nodes = self._round_nodes(options)
        self.t = scheme.threshold_for(len(self.nodes))
        self._c_sk, self.c_pk = C.keypair()
        self._s_sk, self.s_pk = C.keypair()
        self._keys: dict[str, tuple[bytes, bytes]] | None = None
        self._b = b""
        self._own_share = b""
        #: The AES-GCM key agreed with each peer in the share phase: it seals this node's
        #: shares for the peer and opens the peer's for this node (the pair's key, either way).
        self._share_keys: dict[str, bytes] = {}
        self._share_reply: dict[str, Any] | None = None
        self._peers: list[str] | None = None
        self._answered: tuple[list[str], list[str]] | None = None
        self._pre: Pending[np.ndarray] = Pending()
        #: Seconds of the last protect: ``protect_s``, and with a precomputed mask
        #: ``precompute_s`` (its thread's wall time), ``precompute_cpu_s`` and ``wait_s``.
        self.timings: dict[str, float] = {}

    @property
    def ready(self) -> bool:
        """Whether the share phase is done (the node holds every peer's verified keys)."""
        return self._keys is not None

    def _statement(self, node: str, c_pk: bytes, s_pk: bytes) -> bytes:
        return keys_statement(self.scheme.name, self.session_id, self.context.experiment,
                              self.round, self.nodes, node, {"c_pk": c_pk, "s_pk": s_pk})

    def setup(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        """The round's public keys, signed with the node's identity key."""
        return self._reply(c_pk=self.c_pk, s_pk=self.s_pk, **self.context.sign_keys(
            self._statement(self.node_id, self.c_pk, self.s_pk)))

    def share_keys(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        t = _field(msg, "threshold", int, "share message")
        raw = _field(msg, "keys", dict, "share message")
        if t != self.t:
            raise ProtocolError(f"Expected threshold t={self.t} for {len(self.nodes)} nodes. "
                                f"Received t={t}.")
        keys: dict[str, tuple[bytes, bytes]] = {}
        for node, pair in raw.items():
            if node not in self.nodes:
                raise ProtocolError(f"Unknown node {node!r} in the share message; the round's "
                                    f"nodes are {self.nodes}.")
            keys[node] = (_field(pair, "c_pk", bytes, "public keys"),
                          _field(pair, "s_pk", bytes, "public keys"))
            if node != self.node_id:  # its own are compared below; the others' first
                self.context.verify(self.node_id, node, self._statement(node, *keys[node]),
                                    pair.get("identity"), pair.get("sig"), "round keys")
        if keys.get(self.node_id) != (self.c_pk, self.s_pk):
            raise ProtocolError("The public keys relayed for this node are not its own.")
        if len(keys) < t:
            raise ProtocolError(f"Only {len(keys)} nodes' keys for threshold t={t}.")
        if self._share_reply is not None:
            if keys != self._keys:
                raise ProtocolError("A second share message with other keys: refused.")
            return self._share_reply
        self._keys = keys
        self._b = os.urandom(_SEED)
        members = sorted(keys)
        shares = split_bytes([self._b, self._s_sk.private_bytes_raw()], t,
                             [self.nodes.index(n) + 1 for n in members])
        sealed = {}
        for node, share in zip(members, shares, strict=True):
            if node == self.node_id:
                self._own_share = share
                continue
            key = C.agree(self._c_sk, keys[node][0],
                          _pair_info(self.session_id, self.round, self.node_id, node, "share"))
            self._share_keys[node] = key
            sealed[node] = C.seal(key, share, self._ad(self.node_id, node))
        self._share_reply = self._reply(
            shares=sealed, commitment=_commitment(self._b, self.session_id, self.node_id))
        return self._share_reply

    def _ad(self, sender: str, recipient: str) -> bytes:
        return C.label("share", self.session_id, self.round, sender, recipient)

    def _training_setup(self, options: Mapping[str, Any]) -> tuple[list[str], Encoding]:
        """The peers and the fixed-point encoding of the training options, checked."""
        self._check_session(options, "training options")
        if self._keys is None:
            raise ProtocolError("Training options arrived before the share phase: this node "
                                "has no keys for the round.")
        peers = _node_list(_field(options, "peers", list, "training options"), "peers")
        if (self.node_id not in peers or not set(peers) <= set(self._keys)
                or len(peers) < self.t):
            raise ProtocolError(f"Expected at least t={self.t} peers, this node among them, "
                                f"all from the share phase {sorted(self._keys)}. "
                                f"Received {peers}.")
        encoding = Encoding.from_wire(_field(options, "encoding", dict, "training options"))
        if encoding.n_nodes != len(self.nodes):
            raise ProtocolError(f"The fixed-point encoding is sized for {encoding.n_nodes} "
                                f"nodes; the round has {len(self.nodes)}.")
        if encoding.ring_bits != self.scheme.ring_bits:
            raise ProtocolError(f"The fixed-point encoding uses a {encoding.ring_bits}-bit "
                                f"ring; this round's scheme masks in {self.scheme.ring_bits} "
                                "bits.")
        return sorted(peers), encoding

    def _seeds(self, peers: Sequence[str]) -> list[tuple[bytes, int]]:
        """The self-mask's PRG key (+1), and each pairwise key with its sign."""
        assert self._keys is not None
        seeds = [(_self_mask_key(self._b, self.session_id, self.node_id), 1)]
        for j in peers:
            if j != self.node_id:
                key = C.agree(self._s_sk, self._keys[j][1],
                              _pair_info(self.session_id, self.round, self.node_id, j, "mask"),
                              _SEED)
                seeds.append((key, 1 if self.node_id < j else -1))
        return seeds

    def prepare(self, options: Mapping[str, Any], reference: ParameterSet | None = None) -> None:
        """Compute the combined mask (self-mask + signed pairwise streams) in a thread.

        Its length is the global model's encoded size; :meth:`protect` adds it to the
        encoded update in one pass (extending it when extras make the vector longer).
        """
        try:
            peers, encoding = self._training_setup(options)
            size = encoding.expected_size(reference)
        except FedcoreError:  # protect reports it, where the round expects an answer
            return
        if size is None or self._pre.tag == (peers, size):
            return
        self._pre.discard()
        self._pre.install(_precompute(peers, size, self._seeds, _RINGS[self.scheme.ring_bits]))

    def discard(self) -> None:
        """Drop a precomputed mask that :meth:`protect` has not used."""
        self._pre.discard()

    def protect(self, update: ParameterSet, weight: float, options: Mapping[str, Any],
                extras: Mapping[str, ParameterSet] | None = None) -> dict[str, Any]:
        start = time.perf_counter()
        pre = self._pre.take()  # used once, whatever happens below
        dtype = _RINGS[self.scheme.ring_bits]
        try:
            peers, encoding = self._training_setup(options)
            if not isinstance(update, ParameterSet):
                raise ConfigurationError(f"Expected the update as a ParameterSet. "
                                         f"Received {type(update).__name__}.")
            usable = pre if pre is not None and pre.tag[0] == peers else None
            if usable is not None and usable.done \
                    and usable.tag[1] == Layout.of(update, extras).size:
                # The mask is ready and as long as the update's vector: the update is
                # encoded onto it, in one pass and in place (the mask is used once).
                mask = self._mask(usable)
                if mask is not None:
                    layout = encoding.encode_onto(mask, update, weight, extras)
                    return self._masked(mask, layout, peers, start)
                usable = None  # it failed (logged): the masks are made directly
            vector, layout = encoding.encode(update, weight, extras, dtype)
            # Still computing (it runs on while the update is encoded), or another length.
            mask = self._mask(usable) if usable is not None else None
        finally:
            if pre is not None:
                pre.release()
        # After training the node waits for this: what is left of the masks uses the idle
        # cores (the precomputation, beside the training, keeps to one thread).
        if mask is None:
            C.apply_masks_spread(vector, self._seeds(peers))
        else:
            n = min(vector.size, mask.size)
            np.add(vector[:n], mask[:n], out=vector[:n])  # wraps modulo the ring
            if vector.size > n:  # extras beyond the expected length: the streams' next words
                C.apply_masks_spread(vector[n:], self._seeds(peers), offset=n)
        return self._masked(vector, layout, peers, start)

    def _mask(self, pre: Background[np.ndarray]) -> np.ndarray | None:
        """The precomputed mask (waiting for it), its timings kept; ``None`` if it failed."""
        waited = time.perf_counter()
        mask = pre.result()
        self.timings.update(wait_s=time.perf_counter() - waited, precompute_s=pre.seconds,
                            precompute_cpu_s=pre.cpu_seconds)
        return mask

    def _masked(self, vector: np.ndarray, layout: Layout, peers: list[str],
                start: float) -> dict[str, Any]:
        self._peers = peers
        self.timings["protect_s"] = time.perf_counter() - start
        return self._reply(values=vector, layout=layout.to_wire())

    def unmask(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        if self._peers is None:
            raise ProtocolError("Unmask request before this node protected its update.")
        survivors = sorted(_node_list(_field(msg, "survivors", list, "unmask message"), "U"))
        dropped = sorted(_node_list(_field(msg, "dropped", list, "unmask message"), "D"))
        if (set(survivors) & set(dropped) or sorted(survivors + dropped) != self._peers
                or self.node_id not in survivors or len(survivors) < self.t):
            raise ProtocolError(f"Refusing to unmask: survivors {survivors} and drop-outs "
                                f"{dropped} must split this round's peers {self._peers}, "
                                f"include this node, and keep at least t={self.t} survivors.")
        if self._answered is not None and self._answered != (survivors, dropped):
            raise ProtocolError("Refusing a second unmask request with another split of "
                                "survivors and drop-outs: it would reveal both masks of a node.")
        sealed = _field(msg, "shares", dict, "unmask message")
        b_out, s_out = {}, {}
        for sender in self._peers:
            if sender == self.node_id:
                share = self._own_share
            else:
                if not isinstance(sealed.get(sender), bytes):
                    raise ProtocolError(f"The unmask message lacks the share from {sender!r}.")
                share = C.open_sealed(self._share_keys[sender], sealed[sender],
                                      self._ad(sender, self.node_id),
                                      f"share from node {sender!r} to node {self.node_id!r}")
            if len(share) != 2 * SHARE_BYTES:
                raise ProtocolError(f"Malformed share from {sender!r}.")
            if sender in survivors:
                b_out[sender] = share[:SHARE_BYTES]
            else:
                s_out[sender] = share[SHARE_BYTES:]
        self._answered = (survivors, dropped)
        return self._reply(b=b_out, s=s_out)


def _precompute(peers: list[str], size: int,
                seeds: Callable[[Sequence[str]], list[tuple[bytes, int]]],
                dtype: type[np.unsignedinteger[Any]]) -> Background[np.ndarray] | None:
    """A node's combined mask for ``peers``, ``size`` words of ``dtype``, in a daemon thread.

    AES-CTR's ``update_into`` and numpy's additions release the GIL, so it runs beside the
    training, on one thread (the training has the other cores). The key material stays in
    the session: the thread gets its ``seeds`` method. ``None`` when :data:`MAX_PRECOMPUTED`
    masks are held.
    """
    return Background.start(lambda: C.combined_mask(seeds(peers), size, dtype), _precomputed,
                            "the secure-aggregation masks", name="fedcore-secagg-mask",
                            tag=(peers, size))
