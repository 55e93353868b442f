"""Shamir's t-of-n secret sharing over the prime field GF(2^256 + 297).

The prime is above 2^256, so a secret of up to 32 bytes (a key, a seed) is one field element
and each share is one element (33 bytes). Splitting evaluates one random polynomial of degree
``t - 1`` per secret at every recipient's x (Horner's rule on Python integers: a round's
few secrets and recipients make a few hundred products, where numpy object arrays cost
more than the arithmetic); combining interpolates at 0 from ``t`` shares and checks that
every further share lies on the same polynomial, so a corrupted share is caught instead of
yielding a wrong secret (barycentric interpolation: O(t) per further share after O(t^2)
once, so a round of 1000 members recovers in about half a second).
"""

from __future__ import annotations

import operator
import secrets as _secrets
from collections.abc import Mapping, Sequence

__all__ = ["PRIME", "SHARE_BYTES", "ShareError", "combine", "combine_bytes", "split",
           "split_bytes"]

#: The field's prime: the smallest prime above 2^256.
PRIME = 2**256 + 297
#: Bytes of one share element on the wire.
SHARE_BYTES = 33


class ShareError(ValueError):
    """Shares are too few, malformed or inconsistent; ``x`` names the bad share, if known."""

    def __init__(self, message: str, x: int | None = None):
        super().__init__(message)
        self.x = x


def split(values: Sequence[int], t: int, xs: Sequence[int]) -> list[list[int]]:
    """Shares of every secret in ``values`` for the recipients at ``xs``.

    Returns ``shares[r][s]``: recipient ``xs[r]``'s share of secret ``values[s]``. Any ``t``
    recipients recover the secrets; fewer learn nothing about them.
    """
    if not 1 <= t <= len(xs):
        raise ShareError(f"Expected 1 <= t <= {len(xs)} recipients. Received t={t}.")
    if len(set(xs)) != len(xs) or not all(0 < x < PRIME for x in xs):
        raise ShareError(f"Expected distinct, non-zero x coordinates. Received {list(xs)}.")
    if not all(0 <= v < PRIME for v in values):
        raise ShareError("Secrets must be field elements (0 <= value < PRIME).")
    # highest degree first, for Horner's rule; the secret is the constant term
    polys = [[_secrets.randbelow(PRIME) for _ in range(t - 1)][::-1] + [int(v)]
             for v in values]
    out = []
    for x in xs:
        row = []
        for poly in polys:
            acc = 0
            for c in poly:
                acc = (acc * x + c) % PRIME
            row.append(acc)
        out.append(row)
    return out


def _inverses(values: Sequence[int]) -> list[int]:
    """``1 / v mod PRIME`` of every (non-zero) value, with one modular inversion in all."""
    prefix = [1]  # Montgomery's trick
    for v in values:
        prefix.append(prefix[-1] * v % PRIME)
    inv = pow(prefix[-1], -1, PRIME)  # 1 / (v_0 ... v_{n-1})
    out = [0] * len(values)
    for k in range(len(values) - 1, -1, -1):
        out[k] = inv * prefix[k] % PRIME  # inv is 1 / (v_0 ... v_k) here
        inv = inv * values[k] % PRIME
    return out


class _Interpolation:
    """Lagrange interpolation through fixed x coordinates, in barycentric form.

    The weights ``w_k = 1 / prod_{m != k} (x_k - x_m)`` are computed once (O(t^2)); then the
    coefficients at any ``z`` outside ``xs`` take O(t): ``l_k(z) = L(z) w_k / (z - x_k)`` with
    ``L(z) = prod_m (z - x_m)``. Checking every further share of a large round costs O(t)
    each instead of O(t^2) (1000 members: seconds, not minutes).
    """

    def __init__(self, xs: Sequence[int]):
        self.xs = list(xs)
        dens = []
        for k, xk in enumerate(self.xs):
            den = 1
            for m, xm in enumerate(self.xs):
                if m != k:
                    den = den * (xk - xm) % PRIME
            dens.append(den)
        self.weights = _inverses(dens)

    def coefficients(self, z: int) -> list[int]:
        """``l_k`` with ``P(z) = sum_k l_k P(xs[k])`` for every polynomial of degree < t."""
        gaps = [(z - x) % PRIME for x in self.xs]  # non-zero: z is not one of xs
        whole = 1
        for g in gaps:
            whole = whole * g % PRIME
        return [whole * w % PRIME * inv % PRIME
                for w, inv in zip(self.weights, _inverses(gaps), strict=True)]


def combine(points: Mapping[int, Sequence[int]], t: int) -> list[int]:
    """The secrets whose shares are ``points`` (``x -> [share of each secret]``).

    Uses the ``t`` smallest x; every other point is checked against the interpolated
    polynomial. Raises :class:`ShareError` when fewer than ``t`` points are given, when they
    disagree in length, or when a further point is inconsistent (a corrupted share).
    """
    if len(points) < t:
        raise ShareError(f"Expected at least t={t} shares. Received {len(points)}.")
    xs = sorted(points)
    lengths = {len(points[x]) for x in xs}
    if len(lengths) != 1:
        raise ShareError(f"Shares hold different numbers of secrets: {sorted(lengths)}.")
    base = xs[:t]
    # per secret, its t shares
    columns = list(zip(*([int(v) for v in points[x]] for x in base), strict=True))
    through = _Interpolation(base)

    def at(z: int) -> list[int]:
        lam = through.coefficients(z)
        return [sum(map(operator.mul, lam, ys)) % PRIME for ys in columns]

    for x in xs[t:]:
        if at(x) != [int(v) % PRIME for v in points[x]]:
            raise ShareError(f"The share at x={x} is inconsistent with the others.", x)
    return at(0)


def split_bytes(secrets: Sequence[bytes], t: int, xs: Sequence[int]) -> list[bytes]:
    """Like :func:`split` for byte strings of at most 32 bytes; each share is bytes.

    A recipient's share of ``len(secrets)`` secrets is ``len(secrets) * SHARE_BYTES`` bytes.
    """
    for s in secrets:
        if len(s) > 32:
            raise ShareError(f"Secrets are at most 32 bytes. Received {len(s)}.")
    shares = split([int.from_bytes(s, "big") for s in secrets], t, xs)
    return [b"".join(v.to_bytes(SHARE_BYTES, "big") for v in row) for row in shares]


def combine_bytes(points: Mapping[int, bytes], t: int, sizes: Sequence[int]) -> list[bytes]:
    """Recover byte secrets of the given ``sizes`` from shares made by :func:`split_bytes`."""
    expected = len(sizes) * SHARE_BYTES
    parsed = {}
    for x, blob in points.items():
        if not isinstance(blob, bytes) or len(blob) != expected:
            raise ShareError(f"Expected a share of {expected} bytes at x={x}. "
                             f"Received {len(blob) if isinstance(blob, bytes) else blob!r}.", x)
        parsed[x] = [int.from_bytes(blob[i:i + SHARE_BYTES], "big")
                     for i in range(0, expected, SHARE_BYTES)]
    values = combine(parsed, t)
    out = []
    for v, size in zip(values, sizes, strict=True):
        if v >= 1 << (8 * size):
            raise ShareError("A recovered secret does not fit its size: shares are corrupted.")
        out.append(v.to_bytes(size, "big"))
    return out
