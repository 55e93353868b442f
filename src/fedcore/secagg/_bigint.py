"""Big-integer arithmetic for Joye-Libert: gmpy2 when installed, Python ints otherwise.

``pip install -c constraints.txt ".[secagg-fast]"`` installs gmpy2; without it the same code runs on
Python's integers (about 8x slower for 4096-bit modular exponentiations), and the first use
logs one line saying so.

With gmpy2, :func:`powmod_many` spreads a long list over a thread pool of ``os.cpu_count()``
workers (gmpy2 releases the GIL while it exponentiates); Python's integers hold the GIL, so
without gmpy2 it stays on the calling thread.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from fedcore.errors import install_hint
from fedcore.secagg._background import pool

try:
    import gmpy2
except ImportError:  # pragma: no cover - exercised by a subprocess test that blocks gmpy2
    gmpy2 = None

log = logging.getLogger("fedcore.secagg")
_noted = False
#: A list is split across the pool only when every worker gets at least this many bases
#: (one 4096-bit exponentiation takes ~16 ms; handing a chunk to a thread, ~0.1 ms).
MIN_CHUNK = 4


def backend() -> str:
    """``"gmpy2"`` or ``"python"``: which integers the scheme computes with."""
    global _noted
    if gmpy2 is None and not _noted:
        _noted = True
        log.warning("gmpy2 is not installed: Joye-Libert computes with Python integers, about "
                    "8x slower. %s.", install_hint("secagg-fast"))
    return "python" if gmpy2 is None else "gmpy2"


def big(value: int) -> Any:
    """``value`` as the fastest integer type available."""
    return gmpy2.mpz(value) if gmpy2 is not None else int(value)


def workers() -> int:
    """How many threads :func:`powmod_many` uses for a long list: the CPU count (gmpy2), or 1."""
    return 1 if gmpy2 is None else max(1, os.cpu_count() or 1)


def powmod_many(bases: Sequence[Any], exponent: int, modulus: Any) -> list[Any]:
    """``[b ** exponent % modulus for b in bases]`` (a negative exponent inverts), in order.

    With gmpy2 and at least ``2 * MIN_CHUNK`` bases, the list is cut into one contiguous chunk
    per worker (at most :func:`workers`), exponentiated in parallel, and put back together.
    """
    if gmpy2 is None:
        return [pow(int(b), exponent, int(modulus)) for b in bases]
    items, e = list(bases), big(exponent)
    parts = min(workers(), len(items) // MIN_CHUNK)
    if parts < 2:
        return list(gmpy2.powmod_base_list(items, e, modulus))
    step = -(-len(items) // parts)
    chunks = [items[i:i + step] for i in range(0, len(items), step)]
    futures = [pool().submit(gmpy2.powmod_base_list, c, e, modulus) for c in chunks[1:]]
    out = list(gmpy2.powmod_base_list(chunks[0], e, modulus))  # the caller works too
    for future in futures:
        out.extend(future.result())
    return out


def _is_probable_prime(n: int, rounds: int = 40) -> bool:
    if gmpy2 is not None:
        return bool(gmpy2.is_prime(n, rounds))
    if n < 2:
        return False
    for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(rounds):
        x = pow(secrets.randbelow(n - 3) + 2, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _random_prime(bits: int) -> int:
    while True:  # top two bits set: the product of two such primes has exactly 2*bits bits
        candidate = secrets.randbits(bits) | (3 << (bits - 2)) | 1
        if _is_probable_prime(candidate):
            return candidate


def biprime(bits: int) -> int:
    """A fresh modulus N = p*q of exactly ``bits`` bits; p and q are forgotten at once.

    Sizes of 1024 bits and more come from ``cryptography``'s RSA key generation; smaller ones
    (for tests only) from a Miller-Rabin search.
    """
    if bits >= 1024:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        return int(key.private_numbers().public_numbers.n)
    while True:
        n = _random_prime(bits // 2) * _random_prime(bits - bits // 2)
        if n.bit_length() == bits:
            return n
