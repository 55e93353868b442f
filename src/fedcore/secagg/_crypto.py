"""Cryptographic building blocks of the schemes, all from ``cryptography``.

- X25519 key pairs and agreement, the agreed secret passed through HKDF-SHA256 with an
  ``info`` naming its purpose, the session and both parties (domain separation);
- AES-256-GCM sealing of relayed shares, the session, round, sender and recipient bound as
  associated data, so the researcher who relays them can neither read nor redirect them;
- a PRG: AES-128-CTR keystream (counter from zero; every key is fresh and used once), read as
  little-endian words of the ring (uint64, or uint32 for a 32-bit ring) and added to or
  subtracted from a vector in cache-sized chunks; :func:`apply_masks_spread` does the same on
  the idle cores, one contiguous part of the vector per core (AES-CTR and numpy's additions
  release the GIL).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcore.errors import ProtocolError
from fedcore.secagg._background import cores, pool

KEY_BYTES = 32
_NONCE = 12
_CHUNK_BYTES = 1 << 20  # 1 MiB of keystream at a time: stays in cache, one allocation
#: The rings a mask works in, by vector dtype, and the keystream words read for each.
_RINGS: dict[np.dtype[Any], np.dtype[Any]] = {np.dtype(np.uint64): np.dtype("<u8"),
                                               np.dtype(np.uint32): np.dtype("<u4")}
#: :func:`apply_masks_spread` gives a core a part only when it holds at least this many words
#: (a part of 2^18 words takes 0.1-0.3 ms per stream; handing it to a thread, ~0.05 ms).
MIN_SPREAD_WORDS = 1 << 18


def keypair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key pair: the private key object and the raw public key."""
    sk = X25519PrivateKey.generate()
    return sk, sk.public_key().public_bytes_raw()


def private_key(raw: bytes) -> X25519PrivateKey:
    """The X25519 private key of 32 raw bytes."""
    return X25519PrivateKey.from_private_bytes(raw)


def public_of(private: X25519PrivateKey) -> bytes:
    """The raw public key of an X25519 private key."""
    return private.public_key().public_bytes_raw()


def kdf(secret: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 of ``secret`` for the purpose named by ``info``."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def agree(private: X25519PrivateKey, peer_public: bytes, info: bytes,
          length: int = KEY_BYTES) -> bytes:
    """X25519 agreement between a private key and a peer's raw public key, then HKDF."""
    try:
        peer = X25519PublicKey.from_public_bytes(peer_public)
    except ValueError as exc:
        raise ProtocolError(f"Malformed X25519 public key ({len(peer_public)} bytes): {exc}"
                            ) from exc
    try:
        shared = private.exchange(peer)
    except ValueError as exc:  # a low-order point: all-zero shared secret
        raise ProtocolError(f"Unusable X25519 public key: {exc}") from exc
    return kdf(shared, info, length)


def label(*parts: object) -> bytes:
    """An unambiguous byte label from parts (used as HKDF info and AEAD associated data)."""
    return b"\x1f".join(str(p).encode() for p in ("fedcore-secagg", *parts))


def seal(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """AES-256-GCM: random nonce, then ciphertext and tag."""
    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, ad)


def open_sealed(key: bytes, blob: bytes, ad: bytes, what: str) -> bytes:
    """Open what :func:`seal` made; ``ProtocolError`` naming ``what`` when it was altered."""
    if not isinstance(blob, bytes) or len(blob) < _NONCE + 16:
        raise ProtocolError(f"Malformed {what}: expected sealed bytes.")
    try:
        return AESGCM(key).decrypt(blob[:_NONCE], blob[_NONCE:], ad)
    except InvalidTag:
        raise ProtocolError(
            f"The {what} failed authentication (AES-GCM tag mismatch): it was altered in "
            "transit, or sealed for another session, round or recipient."
        ) from None


def apply_masks(vector: np.ndarray, seeds: Sequence[tuple[bytes, int]], offset: int = 0) -> None:
    """Add (+1) or subtract (-1) the PRG stream of each 16-byte seed to ``vector``.

    ``vector`` is uint64 or uint32 (the ring, 2^64 or 2^32): the stream is read as
    little-endian words of that size, so a 32-bit ring needs half the keystream.
    ``vector[0]`` meets word ``offset`` of every stream: a mask is position by position, so
    words ``offset..offset+len`` of the streams can be applied without the ones before (the
    CTR counter starts at the block holding that word; the words before it in the block are
    dropped). Works in place, chunk by chunk: each chunk of keystream is produced into one
    reused buffer, so memory stays O(1) beyond the vector whatever the number of seeds. Both
    ``update_into`` and numpy's additions release the GIL, so this runs beside training.
    """
    if vector.dtype not in _RINGS or not vector.flags.c_contiguous:
        raise TypeError("apply_masks expects a contiguous uint64 or uint32 vector.")
    if offset < 0:
        raise ValueError(f"Expected a word offset >= 0. Received {offset}.")
    width = vector.dtype.itemsize
    block, skip = divmod(offset * width, 16)
    counter = block.to_bytes(16, "big")
    encryptors = []
    for seed, sign in seeds:
        enc = Cipher(algorithms.AES(seed), modes.CTR(counter)).encryptor()
        if skip:
            enc.update(bytes(skip))  # the words before ``offset`` in its block
        encryptors.append((enc, sign))
    n = vector.size
    chunk = _CHUNK_BYTES // width
    zeros = memoryview(bytes(width * min(chunk, max(n, 1))))
    buf = bytearray(len(zeros) + 15)  # update_into needs room for one block more
    words = np.frombuffer(buf, dtype=_RINGS[vector.dtype], count=len(zeros) // width)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        size = stop - start
        part = vector[start:stop]
        for enc, sign in encryptors:
            enc.update_into(zeros[:width * size], buf)
            if sign > 0:
                np.add(part, words[:size], out=part)
            else:
                np.subtract(part, words[:size], out=part)


def parallelism() -> int:
    """How many parts :func:`apply_masks_spread` cuts a vector into: the cores that are idle.

    The caller's core plus the cores the 1-minute load average leaves idle, at most
    :func:`cores`. On a machine whose cores are all busy, handing a part to another thread
    costs more than it saves (the thread and then the caller wait for the scheduler: 10
    keystreams over 1M values took 11-15 ms spread against 7-11 ms on one thread at a
    load average of 19 on 2 cores).
    """
    n = cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - no load average on Windows
        return n
    return max(1, min(n, round(n - load) + 1))




def apply_masks_spread(vector: np.ndarray, seeds: Sequence[tuple[bytes, int]],
                       offset: int = 0) -> None:
    """:func:`apply_masks` on the idle cores: the same result, sooner where cores are spare.

    The vector is cut into one contiguous part per idle core (:func:`parallelism`; each of
    at least :data:`MIN_SPREAD_WORDS` words, else it stays whole on the calling thread); part ``k``
    starting at word ``a`` gets words ``offset + a...`` of every stream, so every word meets
    the keystream words it meets in :func:`apply_masks`. The calling thread masks the first
    part and returns once every part is done, also when one raises.
    """
    if vector.dtype not in _RINGS or not vector.flags.c_contiguous:
        raise TypeError("apply_masks expects a contiguous uint64 or uint32 vector.")
    parts = min(parallelism(), vector.size // MIN_SPREAD_WORDS)
    if parts < 2:
        apply_masks(vector, seeds, offset)
        return
    step = -(-vector.size // parts)
    futures: list[Future[None]] = [
        pool().submit(apply_masks, vector[start:start + step], seeds, offset + start)
        for start in range(step, vector.size, step)]
    try:
        apply_masks(vector[:step], seeds, offset)
    finally:
        for future in futures:
            future.result()


def combined_mask(seeds: Sequence[tuple[bytes, int]], size: int,
                  dtype: type[np.unsignedinteger[Any]] = np.uint64) -> np.ndarray:
    """The sum (modulo the ring) of the signed PRG streams of ``seeds``: ``size`` words.

    Adding it to a vector gives what :func:`apply_masks` gives, in one pass over the vector.
    """
    mask = np.zeros(size, dtype=dtype)
    apply_masks(mask, seeds)
    return mask
