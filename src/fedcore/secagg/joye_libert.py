"""Joye-Libert additively homomorphic aggregation (Joye & Libert, FC 2013), as in Fed-BioMed.

Public modulus ``N = pq`` (``key_size`` bits). Node ``i`` holds a key ``sk_i`` (2 * |N| random
bits) and encrypts the packed plaintext ``x_t`` of ciphertext index ``t`` as::

    c_{i,t} = (1 + x_t * N) * H(t)^{sk_i}  mod N^2      H: SHAKE-256 of (session, round, t)

The researcher multiplies the nodes' ciphertexts and removes the keys with ``sk_0 = -sum sk_i``:
``prod_i c_{i,t} * H(t)^{sk_0} = 1 + (sum_i x_{i,t}) * N  mod N^2``. A decryption that is not of
that form (a missing or wrong key) is detected and raises; it never yields a wrong sum.

**No trusted dealer.**

1. setup: every node makes an X25519 key pair to seal what it sends to the others through the
   researcher, and signs it with its identity key (checked by every other node before use).
   The modulus is never the researcher's alone: the round's first node (sorted ids)
   generates one, forgets ``p, q`` and signs its SHA-256 (a certificate the researcher keeps
   with ``modulus_`` for the next rounds, ``modulus_cert_``), or it is a published modulus
   (the scheme's ``modulus``) whose SHA-256 every node's administrator installed (policy
   ``secagg_jl_moduli``). A node refuses any other modulus, a certificate from a node it does
   not know (with a peer list), and moduli below its ``secagg_min_key_bits``. Whoever knows
   the factors could read a single ciphertext, so the generating node must not collude with
   the researcher.
2. share_keys: node ``i`` draws ``sk_i`` and splits it into additive shares over the integers,
   ``sk_i = sum_k r_{i,k}`` (the ``r_{i,k}``, ``k != i``, uniform on 2 * |N| + 128 bits), and
   seals ``r_{i,k}`` for node ``k``.
3. protect: node ``k`` opens the shares relayed to it and returns, beside its ciphertexts,
   ``S_k = sum_i r_{i,k}``. The researcher learns ``sum_k S_k = sum_i sk_i`` (so ``sk_0``) and
   nothing about a single ``sk_i``: each ``S_k`` is blinded by the other nodes' shares.

Several fixed-point values are packed per plaintext: slots of 64 bits plus enough carry bits
for the sum of all nodes (``8 + ceil(bitlen(n) / 8)`` bytes), as many as fit below ``N``: 28
values per ciphertext for a 2048-bit ``N`` and up to 255 nodes.

Every node's key is in ``sk_0``, so every node must send its ciphertexts:
``tolerates_dropout = False`` and a missing node raises ``SecureAggregationError``.

**Precomputation.** ``H(t)^{sk_i}`` does not depend on the update, and ``sk_i`` is drawn in
share_keys, before training: ``prepare`` (called as training starts) computes the masks of
the global model's ciphertexts in a daemon thread (512 bytes each for a 2048-bit ``N``: ~18 MB
per million parameters; at most :data:`MAX_PRECOMPUTED` per process), and ``protect`` only
multiplies them by ``1 + x_t * N``. Ciphertexts beyond them (extras) are computed then; a
failed or mismatched precomputation falls back to the direct path, with the same ciphertexts.
Exponentiations are spread over every core (``_bigint.powmod_many``) on both sides.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedcore.errors import ConfigurationError, FedcoreError, ProtocolError, SecureAggregationError
from fedcore.params import ParameterSet
from fedcore.secagg import _bigint as B
from fedcore.secagg import _crypto as C
from fedcore.secagg._background import Background, Pending
from fedcore.secagg.base import NodeSession, ResearcherSession, SecureAggregation, SecureSum, _field
from fedcore.secagg.context import (
    NodeContext,
    keys_statement,
    modulus_digest,
    modulus_statement,
)
from fedcore.secagg.fixedpoint import Encoding, Layout

__all__ = ["JoyeLibert"]

_BLIND_BITS = 128  # statistical hiding of the additive key shares
_BATCH = 256  # ciphertexts per exponentiation batch
#: Node-side mask lists precomputed and not yet used, per process (~18 MB per million
#: parameters each with a 2048-bit N). A deployed node has one round in flight; in a
#: simulation the nodes past this many encrypt after training instead.
MAX_PRECOMPUTED = 2
_precomputed = threading.BoundedSemaphore(MAX_PRECOMPUTED)


class JoyeLibert(SecureAggregation):
    """Additively homomorphic encryption; the researcher decrypts only the sum.

    Args:
        key_size: bits of the modulus N (2048 by default; smaller sizes are for tests).
        modulus: a public biprime of ``key_size`` bits whose factors nobody holds (an int, or
            its hex string), whose SHA-256 the nodes' administrators installed; ``None``: the
            round's first node generates one (see module).
        clip, extras_clip, clip_margin, max_weight: the fixed-point encoding, as for
            :class:`~fedcore.secagg.masking.PairwiseMasking`.
    """

    name = "joye-libert"
    tolerates_dropout = False

    def __init__(self, key_size: int = 2048, modulus: int | str | None = None,
                 clip: float | None = None, extras_clip: float | None = None,
                 clip_margin: float = 1024.0, max_weight: float | None = None):
        if not isinstance(key_size, int) or key_size < 256 or key_size % 8:
            raise ConfigurationError(f"Expected key_size to be a multiple of 8 of at least 256 "
                                     f"bits (2048 for real use). Received {key_size!r}.")
        n = int(modulus, 16) if isinstance(modulus, str) else modulus
        if n is not None and (n.bit_length() != key_size or n % 2 == 0):
            raise ConfigurationError(f"Expected an odd modulus of exactly {key_size} bits. "
                                     f"Received one of {n.bit_length()} bits.")
        for key, value in (("clip", clip), ("extras_clip", extras_clip),
                           ("max_weight", max_weight), ("clip_margin", clip_margin)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ConfigurationError(f"Expected {key} to be a positive number. "
                                         f"Received {value!r}.")
        self.key_size = key_size
        self.modulus = modulus
        self.clip = clip
        self.extras_clip = extras_clip
        self.clip_margin = clip_margin
        self.max_weight = max_weight
        #: The modulus in use: given, or learned from the first round's generating node.
        self.modulus_: int | None = n
        #: The generating node's signed statement for ``modulus_`` (dealer, identity, sig).
        self.modulus_cert_: dict[str, Any] | None = None

    def wire_params(self) -> dict[str, Any]:
        """The constructor arguments for the nodes; the modulus travels apart, as bytes."""
        return {**self.get_params(), "modulus": None}  # the modulus travels as bytes

    def researcher_session(self, round: int, nodes: Sequence[str],
                           weights_hint: Mapping[str, float] | None = None,
                           reference: ParameterSet | None = None) -> ResearcherSession:
        """See :meth:`SecureAggregation.researcher_session`."""
        return _JLResearcher(self, round, nodes, weights_hint, reference)

    def node_session(self, node_id: str, options: Mapping[str, Any],
                     context: NodeContext | None = None) -> NodeSession:
        """See :meth:`SecureAggregation.node_session`."""
        return _JLNode(self, node_id, options, context)


def _int_bytes(value: int) -> bytes:
    return int(value).to_bytes((int(value).bit_length() + 8) // 8, "little", signed=True)


def _bytes_int(data: Any, max_bits: int, what: str) -> int:
    if not isinstance(data, bytes) or not 0 < len(data) <= max_bits // 8 + 2:
        raise ProtocolError(f"Malformed {what}: expected at most {max_bits // 8 + 2} bytes.")
    return int.from_bytes(data, "little", signed=True)


class _Packing:
    """Fixed-point uint64 values <-> plaintexts below N, several slots per plaintext."""

    def __init__(self, modulus: int, n_nodes: int, n_values: int):
        self.n = B.big(modulus)
        self.n2 = self.n * self.n
        self.bits = modulus.bit_length()
        self.slot = 8 + math.ceil(n_nodes.bit_length() / 8)
        self.per_ct = (self.bits - 1) // (8 * self.slot)
        self.n_values = n_values
        self.n_ct = -(-n_values // self.per_ct)
        self.ct_bytes = (2 * self.bits + 7) // 8

    def pack(self, vector: np.ndarray) -> list[int]:
        padded = np.zeros(self.n_ct * self.per_ct, dtype="<u8")
        padded[:vector.size] = vector
        rows = np.zeros((self.n_ct, self.per_ct, self.slot), dtype=np.uint8)
        rows[:, :, :8] = padded.view(np.uint8).reshape(self.n_ct, self.per_ct, 8)
        flat = rows.reshape(self.n_ct, -1)
        return [int.from_bytes(flat[i].tobytes(), "little") for i in range(self.n_ct)]

    def unpack(self, plaintexts: Sequence[int]) -> np.ndarray:
        width = self.per_ct * self.slot
        raw = b"".join(int(m).to_bytes(width, "little") for m in plaintexts)
        rows = np.frombuffer(raw, dtype=np.uint8).reshape(self.n_ct, self.per_ct, self.slot)
        low = np.ascontiguousarray(rows[:, :, :8]).view("<u8").reshape(-1)  # modulo 2^64
        return low[:self.n_values].astype(np.uint64)

    def masks(self, session: str, round: int, key: int, start: int, stop: int) -> list[Any]:
        """H(t)^key mod N^2 for t in [start, stop), batch by batch, on every core."""
        out: list[Any] = []
        for a in range(start, stop, _BATCH):
            b = min(a + _BATCH, stop)
            out.extend(B.powmod_many(self.hashes(session, round, a, b), key, self.n2))
        return out

    def hashes(self, session: str, round: int, start: int, stop: int) -> list[Any]:
        """H(t) for t in [start, stop): SHAKE-256 expanded 128 bits past N^2, reduced."""
        size = self.ct_bytes + 16
        out = []
        for t in range(start, stop):
            digest = hashlib.shake_256(C.label("jl-hash", session, round, t)).digest(size)
            out.append(B.big(int.from_bytes(digest, "little")) % self.n2)
        return out


class _JLResearcher(ResearcherSession):
    scheme: JoyeLibert

    def __init__(self, scheme: JoyeLibert, round: int, nodes: Sequence[str],
                 weights_hint: Mapping[str, float] | None, reference: ParameterSet | None):
        super().__init__(scheme, round, nodes)
        self.encoding = Encoding.choose(
            len(self.nodes), clip=scheme.clip, extras_clip=scheme.extras_clip,
            clip_margin=scheme.clip_margin, max_weight=scheme.max_weight,
            weights_hint=weights_hint, reference=reference)
        self.dealer = None if scheme.modulus_ is not None else self.nodes[0]
        self.modulus: int | None = scheme.modulus_
        self._keys: dict[str, bytes] = {}
        self._vouch: dict[str, dict[str, bytes]] = {}
        self._shares: dict[str, dict[str, bytes]] = {}
        self._layout: Layout | None = None
        self._packing: _Packing | None = None
        self._product: list[Any] = []
        self._key_sum = 0
        self._protected: list[str] = []

    def _require_all(self, have: Sequence[str], stage: str) -> None:
        missing = [n for n in self.nodes if n not in have]
        if missing:
            raise SecureAggregationError(
                f"Joye-Libert needs every node of the round, and {missing} did not answer the "
                f"{stage} (tolerates_dropout = False). Rerun the round without them, or use "
                "the 'masking' scheme, which survives drop-outs.",
                failures={n: f"no {stage}" for n in missing})

    def setup_requests(self) -> dict[str, dict[str, Any]]:
        modulus = None if self.modulus is None else self.modulus.to_bytes(
            self.scheme.key_size // 8, "little")
        cert = None if modulus is None else self.scheme.modulus_cert_
        return {n: {**self.opening(), "modulus": modulus, "modulus_cert": cert,
                    "dealer": self.dealer} for n in self.nodes}

    def add_setup(self, node: str, reply: Mapping[str, Any]) -> None:
        self._check_message(node, reply, self.nodes, "setup reply")
        key = _field(reply, "c_pk", bytes, "setup reply")
        vouch = {k: _field(reply, k, bytes, "setup reply") for k in ("identity", "sig")}
        if node == self.dealer:
            n = int.from_bytes(_field(reply, "modulus", bytes, "setup reply"), "little")
            if n.bit_length() != self.scheme.key_size or n % 2 == 0:
                raise ProtocolError(f"Expected an odd {self.scheme.key_size}-bit modulus from "
                                    f"{node!r}. Received {n.bit_length()} bits.")
            self.modulus = self.scheme.modulus_ = n
            self.scheme.modulus_cert_ = {
                "dealer": node, "identity": vouch["identity"],
                "sig": _field(reply, "modulus_sig", bytes, "setup reply")}
        self._vouch[node] = vouch
        self._keys[node] = key

    def share_requests(self) -> dict[str, dict[str, Any]]:
        self._require_all(list(self._keys), "setup")
        assert self.modulus is not None
        keys = {n: {"c_pk": k, **self._vouch[n]} for n, k in self._keys.items()}
        msg = {**self.header(), "keys": keys,
               "modulus": self.modulus.to_bytes(self.scheme.key_size // 8, "little"),
               "modulus_cert": self.scheme.modulus_cert_}
        return {n: msg for n in self.nodes}

    def add_shares(self, node: str, reply: Mapping[str, Any]) -> None:
        self._check_message(node, reply, self.nodes, "share reply")
        shares = _field(reply, "shares", dict, "share reply")
        expected = set(self.nodes) - {node}
        if set(shares) != expected or not all(isinstance(v, bytes) for v in shares.values()):
            raise ProtocolError(f"Expected sealed key shares from {node!r} for "
                                f"{sorted(expected)}. Received them for {sorted(shares)}.")
        self._shares[node] = dict(shares)

    @property
    def participants(self) -> list[str]:
        self._require_all(list(self._shares), "share phase")
        return list(self.nodes)

    def train_options(self, node: str) -> dict[str, Any]:
        if node not in self.participants:
            raise ConfigurationError(f"Expected one of this round's nodes {self.nodes}. "
                                     f"Received {node!r}.")
        return {**self.header(), "encoding": self.encoding.to_wire(),
                "shares": {j: self._shares[j][node] for j in self.nodes if j != node}}

    def add_protected(self, node: str, payload: Mapping[str, Any]) -> None:
        self._check_message(node, payload, self.nodes, "protected update")
        if node in self._protected:
            raise ProtocolError(f"Node {node!r} sent its update twice in one round.")
        layout = Layout.from_wire(_field(payload, "layout", dict, "protected update"))
        cts = _field(payload, "ciphertexts", np.ndarray, "protected update")
        assert self.modulus is not None
        bits = self.modulus.bit_length()
        key_share = _bytes_int(_field(payload, "key_share", bytes, "protected update"),
                               2 * bits + _BLIND_BITS + 64, f"key share from {node!r}")
        self.encoding.check_received(layout, node, self._layout)
        with self._timed("add_protected_s"):
            if self._layout is None:
                self._layout = layout
                self._packing = _Packing(self.modulus, len(self.nodes), layout.size)
            p = self._packing
            assert p is not None
            if cts.dtype != np.uint8 or cts.shape != (p.n_ct, p.ct_bytes):
                raise ProtocolError(f"Expected {p.n_ct} ciphertexts of {p.ct_bytes} bytes from "
                                    f"{node!r}. Received {cts.dtype} {cts.shape}.")
            values = [B.big(int.from_bytes(row.tobytes(), "little")) for row in cts]
            if not self._product:
                self._product = [v % p.n2 for v in values]
            else:
                self._product = [a * v % p.n2 for a, v in zip(self._product, values, strict=True)]
            self._key_sum += key_share
        self._protected.append(node)

    def unprotect_sum(self) -> SecureSum:
        self._require_all(self._protected, "training (encrypted update)")
        p, layout = self._packing, self._layout
        assert p is not None and layout is not None
        sk0 = -self._key_sum
        plaintexts: list[int] = []
        with self._timed("decrypt_s"):
            for start in range(0, p.n_ct, _BATCH):
                stop = min(start + _BATCH, p.n_ct)
                masks = p.masks(self.session_id, self.round, sk0, start, stop)
                for prod, mask in zip(self._product[start:stop], masks, strict=True):
                    v = prod * mask % p.n2
                    if (v - 1) % p.n:
                        raise SecureAggregationError(
                            "Joye-Libert decryption failed its check (the keys do not cancel): "
                            "a key share or ciphertext is wrong. No sum is returned.",
                            failures={n: "inconsistent keys" for n in self.nodes})
                    plaintexts.append(int((v - 1) // p.n))
        with self._timed("decode_s"):
            total = p.unpack(plaintexts)
            sums, weight, extras, report = self.encoding.decode(total, layout, len(self.nodes))
        report.update({"scheme": self.scheme.name, "nodes": len(self.nodes),
                       "survivors": list(self.nodes), "dropped": [], "recovered": [],
                       "ciphertexts": p.n_ct, "values_per_ciphertext": p.per_ct,
                       "key_size": p.bits, "bigint": B.backend(), "timings": dict(self.timings)})
        return SecureSum(sums, weight, extras, report)


class _JLNode(NodeSession):
    scheme: JoyeLibert

    def __init__(self, scheme: JoyeLibert, node_id: str, options: Mapping[str, Any],
                 context: NodeContext | None = None):
        super().__init__(scheme, node_id, options, context)
        floor = self.context.floors.min_key_bits
        if scheme.key_size < floor:
            raise ProtocolError(
                f"Expected a Joye-Libert key of at least {floor} bits (this node's policy "
                f"secagg_min_key_bits). Received key_size={scheme.key_size}. Fix: use "
                f"JoyeLibert(key_size={max(floor, 2048)}) (the default is 2048).")
        self.nodes = self._round_nodes(options)
        self._c_sk, self.c_pk = C.keypair()
        self._keys: dict[str, bytes] | None = None
        self._modulus = 0
        self._sk = 0
        self._own_share = 0
        self._share_reply: dict[str, Any] | None = None
        self._pre: Pending[list[Any]] = Pending()
        #: Seconds of the last protect: ``protect_s``, and with precomputed masks
        #: ``precompute_s`` (its thread's wall time), ``precompute_cpu_s`` (that thread's CPU
        #: time, not the pool's) and ``wait_s``.
        self.timings: dict[str, float] = {}

    @property
    def ready(self) -> bool:
        """Whether the share phase is done (the node holds its key and the modulus)."""
        return self._keys is not None

    def _statement(self, node: str, c_pk: bytes) -> bytes:
        return keys_statement(self.scheme.name, self.session_id, self.context.experiment,
                              self.round, self.nodes, node, {"c_pk": c_pk})

    def setup(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        """The node's signed sealing key; the dealer adds a modulus it made and signed."""
        signed = self.context.sign_keys(self._statement(self.node_id, self.c_pk))
        if msg.get("dealer") == self.node_id:
            if not self._modulus:
                self._modulus = B.biprime(self.scheme.key_size)  # p, q are not kept
            raw = self._modulus.to_bytes(self.scheme.key_size // 8, "little")
            cert = self.context.signer.sign(modulus_statement(
                modulus_digest(raw), self.scheme.key_size, self.node_id))
            return self._reply(c_pk=self.c_pk, modulus=raw, modulus_sig=cert, **signed)
        if msg.get("modulus") is not None:  # a known modulus: refused now if not acceptable
            self._accepted_modulus(msg)
        return self._reply(c_pk=self.c_pk, **signed)

    def _accepted_modulus(self, msg: Mapping[str, Any]) -> int:
        """The message's modulus, if the node accepts it; ``ProtocolError`` saying why not.

        Accepted: a modulus whose SHA-256 the administrator installed (``jl_moduli``), or one
        signed by the node that generated it (this node, a node of its peer list, or,
        without a peer list, the node whose identity key came with the certificate).
        """
        raw = _field(msg, "modulus", bytes, "Joye-Libert message")
        modulus = int.from_bytes(raw, "little")
        if modulus.bit_length() != self.scheme.key_size or modulus % 2 == 0:
            raise ProtocolError(f"Expected an odd {self.scheme.key_size}-bit modulus. "
                                f"Received {modulus.bit_length()} bits.")
        digest = modulus_digest(raw)
        if digest in self.context.floors.jl_moduli or modulus == self._modulus:
            return modulus
        cert = msg.get("modulus_cert")
        if not isinstance(cert, Mapping) or not isinstance(cert.get("dealer"), str):
            raise ProtocolError(
                f"Refused the Joye-Libert modulus (SHA-256 {digest[:16]}...): no node vouches "
                "for it and this node's administrator did not install it, so its factors may "
                "be known to whoever sent it. Fix: let the nodes generate the modulus "
                "(JoyeLibert(modulus=None), the default), or have every node's administrator "
                "add its SHA-256 to the policy key secagg_jl_moduli.")
        dealer = cert["dealer"]
        self.context.verify(self.node_id, dealer,
                            modulus_statement(digest, self.scheme.key_size, dealer),
                            cert.get("identity"), cert.get("sig"), "Joye-Libert modulus")
        return modulus

    def share_keys(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        raw_keys = _field(msg, "keys", dict, "share message")
        if sorted(raw_keys) != self.nodes:
            raise ProtocolError(f"Expected the public keys of every node {self.nodes}. "
                                f"Received keys for {sorted(raw_keys)}.")
        keys: dict[str, bytes] = {}
        for node, entry in raw_keys.items():
            keys[node] = _field(entry, "c_pk", bytes, "public keys")
            if node != self.node_id:  # its own is compared below; the others' first
                self.context.verify(self.node_id, node, self._statement(node, keys[node]),
                                    entry.get("identity"), entry.get("sig"), "round keys")
        if keys[self.node_id] != self.c_pk:
            raise ProtocolError("The public key relayed for this node is not its own.")
        modulus = self._accepted_modulus(msg)
        if self._share_reply is not None:
            if (keys, modulus) != (self._keys, self._modulus):
                raise ProtocolError("A second share message with other keys: refused.")
            return self._share_reply
        self._keys, self._modulus = dict(keys), modulus
        bits = 2 * modulus.bit_length()
        self._sk = secrets.randbits(bits)
        sealed = {}
        rest = self._sk
        for node in self.nodes:
            if node == self.node_id:
                continue
            r = secrets.randbits(bits + _BLIND_BITS)
            rest -= r
            sealed[node] = C.seal(self._pair_key(node), _int_bytes(r), self._ad(self.node_id, node))
        self._own_share = rest
        self._share_reply = self._reply(shares=sealed)
        return self._share_reply

    def _pair_key(self, other: str) -> bytes:
        assert self._keys is not None
        lo, hi = sorted((self.node_id, other))
        return C.agree(self._c_sk, self._keys[other],
                       C.label("jl-share-key", self.session_id, self.round, lo, hi))

    def _ad(self, sender: str, recipient: str) -> bytes:
        return C.label("jl-share", self.session_id, self.round, sender, recipient)

    def _key_tag(self) -> tuple[str, int, int, bytes]:
        """What precomputed masks are for: session, round, modulus and (a digest of) sk_i."""
        digest = hashlib.sha256(_int_bytes(self._sk)).digest()
        return (self.session_id, self.round, self._modulus, digest)

    def prepare(self, options: Mapping[str, Any], reference: ParameterSet | None = None) -> None:
        """Compute ``H(t)^{sk_i}`` for the global model's ciphertexts in a thread.

        Their number is the encoded size of the global model (the encoding's parameter layout,
        else ``reference``'s) over the values per ciphertext. Never raises: protect reports
        bad options.
        """
        try:
            self._check_session(options, "training options")
            if self._keys is None:
                return
            encoding = Encoding.from_wire(_field(options, "encoding", dict, "training options"))
            size = encoding.expected_size(reference)
        except FedcoreError:
            return
        if size is None:
            return
        p = _Packing(self._modulus, len(self.nodes), size)
        tag = (*self._key_tag(), p.n_ct)
        if self._pre.tag == tag:
            return
        self._pre.discard()
        session, round, key = self.session_id, self.round, self._sk
        self._pre.install(Background.start(
            lambda: p.masks(session, round, key, 0, p.n_ct), _precomputed,
            "the Joye-Libert masks", name="fedcore-secagg-jl", tag=tag))

    def discard(self) -> None:
        """Drop precomputed masks that :meth:`protect` has not used."""
        self._pre.discard()

    def protect(self, update: ParameterSet, weight: float, options: Mapping[str, Any],
                extras: Mapping[str, ParameterSet] | None = None) -> dict[str, Any]:
        began = time.perf_counter()
        pre = self._pre.take()  # used once, whatever happens below
        try:
            return self._protect(update, weight, options, extras, pre, began)
        finally:
            if pre is not None:
                pre.release()

    def _protect(self, update: ParameterSet, weight: float, options: Mapping[str, Any],
                 extras: Mapping[str, ParameterSet] | None, pre: Background[list[Any]] | None,
                 began: float) -> dict[str, Any]:
        self._check_session(options, "training options")
        if self._keys is None:
            raise ProtocolError("Training options arrived before the share phase: this node "
                                "has no key for the round.")
        sealed = _field(options, "shares", dict, "training options")
        key_share = self._own_share
        limit = 2 * self._modulus.bit_length() + _BLIND_BITS + 8
        for sender in self.nodes:
            if sender == self.node_id:
                continue
            if not isinstance(sealed.get(sender), bytes):
                raise ProtocolError(f"The training options lack the key share from {sender!r}.")
            plain = C.open_sealed(self._pair_key(sender), sealed[sender],
                                  self._ad(sender, self.node_id),
                                  f"key share from node {sender!r} to node {self.node_id!r}")
            key_share += _bytes_int(plain, limit, f"key share from {sender!r}")
        encoding = Encoding.from_wire(_field(options, "encoding", dict, "training options"))
        if encoding.n_nodes != len(self.nodes):
            raise ProtocolError(f"The fixed-point encoding is sized for {encoding.n_nodes} "
                                f"nodes; the round has {len(self.nodes)}.")
        if not isinstance(update, ParameterSet):
            raise ConfigurationError(f"Expected the update as a ParameterSet. "
                                     f"Received {type(update).__name__}.")
        vector, layout = encoding.encode(update, weight, extras)
        p = _Packing(self._modulus, len(self.nodes), layout.size)
        plaintexts = p.pack(vector)
        self.timings.clear()
        ready: list[Any] = []
        if pre is not None and pre.tag[:-1] == self._key_tag():
            waited = time.perf_counter()
            ready = pre.result() or []
            self.timings.update(wait_s=time.perf_counter() - waited, precompute_s=pre.seconds,
                                precompute_cpu_s=pre.cpu_seconds)
        out = np.empty((p.n_ct, p.ct_bytes), dtype=np.uint8)
        for start in range(0, p.n_ct, _BATCH):
            stop = min(start + _BATCH, p.n_ct)
            masks = ready[start:stop]
            if len(masks) < stop - start:  # beyond the precomputed ones: computed now
                masks += p.masks(self.session_id, self.round, self._sk, start + len(masks),
                                 stop)
            for t, mask in zip(range(start, stop), masks, strict=True):
                c = (1 + plaintexts[t] * p.n) * mask % p.n2
                out[t] = np.frombuffer(int(c).to_bytes(p.ct_bytes, "little"), dtype=np.uint8)
        self.timings["protect_s"] = time.perf_counter() - began
        return self._reply(ciphertexts=out, layout=layout.to_wire(),
                           key_share=_int_bytes(key_share))
