"""Fixed-point encoding shared by the secure-aggregation schemes.

Both schemes add integers, not floats: a node turns its weighted update into integers modulo
2^64, the scheme hides them, and the researcher decodes their sum.

**Clipping.** Every value is clipped to ``[-R, R]`` first. ``R`` is explicit: set by the
researcher (``clip=``), or chosen each round from the global model the researcher already
holds: ``R = clip_margin * max(1, max |global value|)`` (updates are full models, so their
values stay of the global model's order; this choice leaks nothing, the researcher knows the
global model). Clipped values are counted and the count (summed over the nodes, never per
node) comes back in the report: a sum is never silently corrupted.

**Bit budget** (64-bit ring: numpy ``uint64`` arithmetic wraps modulo 2^64 for free)::

    w * clip(x, -R, R)  lies in  [-W*R, W*R]            W = max_weight, n = nodes in the round
    q = rint(w * clip(x) / step)       step = 2^ceil(log2(n * W * R) - 62)
    |q| <= W*R / step <= 2^62 / n   ->   |sum of the n nodes' q| <= 2^62 (+ n/2) < 2^63

so the sum never wraps: 1 sign bit, 1 bit of headroom, log2(n) bits for the sum and the rest
for the resolution ``step`` (a power of two, so dividing by it is exact). An encoding may use a
smaller ring, ``2^b`` (``ring_bits``, whole bytes): the same budget with ``b`` for 64, so each
value fits in ``b`` bits and the step is ``2^(64 - b)`` times coarser (Joye-Libert packs
40-bit values by default; masking keeps 64). With ``R = 1``:
10 nodes and ``W = 1e4`` give ``step = 2^-45`` (2.8e-14); 1000 nodes and ``W = 1e6`` give
``2^-32`` (2.3e-10); 10 000 nodes and ``W = 1e7`` give ``2^-25`` (3.0e-8).

**Decoding** reads the sum as int64 times ``step``. It differs from the exact weighted sum of
the clipped values by at most ``(n/2 + 1024) * step`` (``error_bound``): n/2 steps of
rounding, plus float64 rounding of each product and of the decoded sum (2^-53 relative, as in
a plain float64 sum). Weights are encoded the same way (range ``W``), so the total weight is
exact for integer weights; clip counts are plain integers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcore.errors import ConfigurationError, ProtocolError
from fedcore.params import ParameterSet

__all__ = ["DEFAULT_MAX_WEIGHT", "Encoding", "FixedPoint", "Layout"]

#: Largest weight a node may use when neither ``max_weight`` nor weight hints are given.
DEFAULT_MAX_WEIGHT = float(2**20)
RING_BITS = (16, 24, 32, 40, 48, 56, 64)  # the rings an encoding may use (whole bytes)
_META = 3  # weight, values clipped in params, values clipped in extras
_CHUNK = 1 << 16
#: How :meth:`FixedPoint._encode` puts a chunk of rounded values into its words.
_Write = Callable[[np.ndarray, np.ndarray, np.ndarray], None]


def _store(words: np.ndarray, x: np.ndarray, scratch: np.ndarray) -> None:
    np.copyto(words, x, casting="unsafe")  # integers already: the conversion is exact


def _add(words: np.ndarray, x: np.ndarray, scratch: np.ndarray) -> None:
    ints = scratch[:x.size]
    np.copyto(ints, x, casting="unsafe")
    unsigned = words.view(f"u{words.dtype.itemsize}")  # wraps modulo the ring
    np.add(unsigned, ints.view(unsigned.dtype), out=unsigned)


@dataclass(frozen=True)
class FixedPoint:
    """Clip to ``[-clip, clip]``, weight, and quantise to multiples of ``2**exponent``."""

    clip: float
    exponent: int

    @classmethod
    def for_sum(cls, clip: float, n_nodes: int, max_weight: float,
                ring_bits: int = 64) -> FixedPoint:
        """The finest step at which ``n_nodes`` weighted, clipped values sum without wrapping.

        Their sum stays below ``2**(ring_bits - 1)`` in magnitude (64: the masking ring).
        """
        if not (math.isfinite(clip) and clip > 0):
            raise ConfigurationError(f"Expected a positive, finite clip range. Received {clip!r}.")
        bound = n_nodes * max_weight * clip
        return cls(float(clip), math.ceil(math.log2(bound)) - (ring_bits - 2))

    @property
    def step(self) -> float:
        """The quantum of one node's weighted value."""
        return math.ldexp(1.0, self.exponent)

    def encode_into(self, values: np.ndarray, weight: float, out: np.ndarray) -> int:
        """Write the encoding of ``weight * clip(values)`` into ``out`` (uint64 or uint32).

        Returns how many values were clipped. Non-finite values raise ``ConfigurationError``.
        Works in cache-sized chunks through one float64 buffer.
        """
        return self._encode(values, weight, out, _store)

    def add_encoding_into(self, values: np.ndarray, weight: float, out: np.ndarray) -> int:
        """Add the encoding of ``weight * clip(values)`` to ``out``, modulo its ring, in place.

        What :meth:`encode_into` then an addition give, bit for bit, in one pass over ``out``
        (a node adds its update to its precomputed mask). Returns how many values were
        clipped; non-finite values raise ``ConfigurationError`` (``out`` is then partly
        changed).
        """
        return self._encode(values, weight, out, _add)

    def _encode(self, values: np.ndarray, weight: float, out: np.ndarray,
                write: _Write) -> int:
        flat = np.asarray(values).reshape(-1)
        if flat.dtype.kind == "c":
            raise ConfigurationError("Expected real values to encode. Received complex ones: "
                                     "send their real and imaginary parts as two arrays.")
        ints = out.view(f"i{out.dtype.itemsize}")
        factor = weight / self.step  # weight / 2**e is exact; one rounding in the product
        clipped = 0
        buf = np.empty(min(_CHUNK, flat.size), dtype=np.float64)
        words = np.empty(buf.size if write is _add else 0, dtype=ints.dtype)
        for start in range(0, flat.size, _CHUNK):
            stop = min(start + _CHUNK, flat.size)
            raw, x = flat[start:stop], buf[:stop - start]
            # The extremes say whether anything is non-finite (NaN and infinities reach
            # them) or out of range (the conversion to float64 keeps the order, so they
            # are those of the float64 values): the passes that find which run only then.
            lo, hi = float(np.min(raw)), float(np.max(raw))
            if not (math.isfinite(lo) and math.isfinite(hi)):
                np.copyto(x, raw, casting="unsafe")
                bad = int(x.size - np.count_nonzero(np.isfinite(x)))
                raise ConfigurationError(
                    f"Expected finite values to encode. Received {bad} NaN or infinite "
                    "value(s): the training produced them; fix the plan (learning rate, "
                    "data) and retry."
                )
            if hi > self.clip or lo < -self.clip:
                np.copyto(x, raw, casting="unsafe")
                clipped += int(np.count_nonzero(x > self.clip)) + int(
                    np.count_nonzero(x < -self.clip))
                np.clip(x, -self.clip, self.clip, out=x)
                np.multiply(x, factor, out=x)
            else:  # read and scaled in one pass (the float64 conversion is exact)
                np.multiply(raw, factor, out=x, dtype=np.float64, casting="unsafe")
            np.rint(x, out=x)
            write(ints[start:stop], x, words)
        return clipped

    def decode(self, sums: np.ndarray) -> np.ndarray:
        """The float64 values whose encodings add up to ``sums`` (modulo 2^64; uint32: 2^32)."""
        ints = (sums.view(np.int32) if sums.dtype == np.uint32
                else np.asarray(sums, dtype=np.uint64).view(np.int64))
        out = ints.astype(np.float64)  # the plain conversion (faster than the ufunc's cast)
        np.multiply(out, self.step, out=out)  # exact: a power of two
        return out

    def decode_in_place(self, sums: np.ndarray) -> np.ndarray:
        """:meth:`decode` written over ``sums`` (contiguous 8-byte words, which it consumes).

        Returns the float64 view of their memory: no new array, and one pass over them in
        cache-sized chunks (each chunk is read into a buffer before it is overwritten).
        """
        if sums.dtype.itemsize != 8 or sums.ndim != 1 or not sums.flags.c_contiguous \
                or not sums.flags.writeable:
            raise TypeError("decode_in_place expects a writable, contiguous vector of 8-byte "
                            f"words. Received {sums.dtype} {sums.shape}.")
        ints, out = sums.view(np.int64), sums.view(np.float64)
        buf = np.empty(min(_CHUNK, sums.size), dtype=np.float64)
        for start in range(0, sums.size, _CHUNK):
            stop = min(start + _CHUNK, sums.size)
            x = buf[:stop - start]
            np.copyto(x, ints[start:stop], casting="unsafe")
            np.multiply(x, self.step, out=out[start:stop])  # exact: a power of two
        return out

    def error_bound(self, n_nodes: int) -> float:
        """Largest difference between a decoded sum of ``n_nodes`` values and the exact one."""
        return (n_nodes / 2 + 1024) * self.step


#: How :class:`Encoding` writes each array: ``FixedPoint.encode_into`` or ``.add_encoding_into``.
_Writer = Callable[[FixedPoint, np.ndarray, float, np.ndarray], int]
#: How it reads them back: ``FixedPoint.decode`` or ``.decode_in_place``.
_Reader = Callable[[FixedPoint, np.ndarray], np.ndarray]


class Layout:
    """Names and shapes of an update and its extras, in vector order.

    Dtypes do not matter: every value is encoded from float64, and sums are float64. Its
    wire form (``to_wire``) is ``{"params": [[name, shape], ...], "extras": [[extra, [[name,
    shape], ...]], ...]}``: it travels in clear (no values).
    """

    def __init__(self, params: list[tuple[str, tuple[int, ...]]],
                 extras: list[tuple[str, list[tuple[str, tuple[int, ...]]]]]):
        self.params = params
        self.extras = extras
        sizes = [math.prod(s) for _, s in params]
        sizes += [math.prod(s) for _, entries in extras for _, s in entries]
        self.n_values = sum(sizes)
        self.size = self.n_values + _META

    @classmethod
    def of(cls, update: Mapping[str, np.ndarray],
           extras: Mapping[str, Mapping[str, np.ndarray]] | None) -> Layout:
        """The layout of an update and its extras."""

        def entries(ps: Mapping[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
            return [(k, tuple(np.shape(a))) for k, a in ps.items()]

        return cls(entries(update), [(k, entries(v)) for k, v in (extras or {}).items()])

    def to_wire(self) -> dict[str, Any]:
        """Plain lists, msgpack-safe."""

        def wire(es: list[tuple[str, tuple[int, ...]]]) -> list[list[Any]]:
            return [[k, list(s)] for k, s in es]

        return {"params": wire(self.params), "extras": [[k, wire(v)] for k, v in self.extras]}

    @classmethod
    def from_wire(cls, data: Any) -> Layout:
        """Parse and check a received layout; ``ProtocolError`` when malformed."""

        def entries(es: Any) -> list[tuple[str, tuple[int, ...]]]:
            out = []
            for e in es:
                if not (isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], str)
                        and isinstance(e[1], (list, tuple))
                        and all(isinstance(d, int) and d >= 0 for d in e[1])):
                    raise ProtocolError(f"Malformed layout entry {e!r}: expected [name, shape].")
                out.append((e[0], tuple(e[1])))
            return out

        try:
            params = entries(data["params"])
            extras = [(str(k), entries(v)) for k, v in data["extras"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"Malformed update layout: {exc!r}.") from exc
        return cls(params, extras)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and self.to_wire() == other.to_wire()

    def __hash__(self) -> int:
        return hash(repr(self.to_wire()))

    def describe_difference(self, other: Layout) -> str:
        """A short account of the first difference, for error messages."""
        for what, a, b in (("parameters", self.params, other.params),
                           ("extras", self.extras, other.extras)):
            if a != b:
                return f"{what}: expected {_short(a)}, received {_short(b)}"
        return "none"


def _sign_extend(sums: np.ndarray, bits: int) -> np.ndarray:
    """Sums modulo ``2**bits`` as uint64 two's complement (what :meth:`FixedPoint.decode` reads)."""
    if bits == 64:
        return sums
    low = np.asarray(sums, dtype=np.uint64) & np.uint64((1 << bits) - 1)
    sign = np.uint64(1 << (bits - 1))
    return (low ^ sign) - sign  # wraps modulo 2^64: negative sums get their high bits set


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) < 300 else text[:300] + "..."


class Encoding:
    """The fixed-point parameters of one round, and the update <-> uint64 vector conversion.

    Built by the researcher (:meth:`choose`), sent to the nodes (:meth:`to_wire`) and rebuilt
    there (:meth:`from_wire`), so both sides quantise alike.
    """

    def __init__(self, n_nodes: int, max_weight: float, clip: float, extras_clip: float,
                 params_layout: list[list[Any]] | None = None, ring_bits: int = 64):
        if n_nodes < 1:
            raise ConfigurationError(f"Expected at least one node. Received n_nodes={n_nodes}.")
        if ring_bits not in RING_BITS:
            raise ConfigurationError(f"Expected ring_bits to be one of {RING_BITS}. "
                                     f"Received {ring_bits!r}.")
        if not (math.isfinite(max_weight) and max_weight > 0):
            raise ConfigurationError(
                f"Expected a positive, finite max_weight. Received {max_weight!r}.")
        self.n_nodes = n_nodes
        self.max_weight = float(max_weight)
        #: Sums are exact modulo ``2**ring_bits`` (64 for masking; fewer packs more values
        #: per Joye-Libert plaintext, at a coarser step).
        self.ring_bits = ring_bits
        self.values = FixedPoint.for_sum(clip, n_nodes, max_weight, ring_bits)
        self.extras = FixedPoint.for_sum(extras_clip, n_nodes, max_weight, ring_bits)
        self.weight = FixedPoint.for_sum(max_weight, n_nodes, 1.0, ring_bits)
        #: The global model's layout ([[name, shape]...]) when the researcher knows it.
        self.params_layout = params_layout

    def expected_size(self, reference: ParameterSet | None = None) -> int | None:
        """The encoded length of an update shaped like the global model, extras aside.

        From :attr:`params_layout`, else from ``reference`` (the global parameters); ``None``
        when neither is known.
        """
        if self.params_layout is not None:
            return Layout.from_wire({"params": self.params_layout, "extras": []}).size
        if isinstance(reference, ParameterSet):
            return Layout.of(reference, None).size
        return None

    @classmethod
    def choose(cls, n_nodes: int, *, clip: float | None, extras_clip: float | None,
               clip_margin: float, max_weight: float | None,
               weights_hint: Mapping[str, float] | None,
               reference: Mapping[str, np.ndarray] | None, ring_bits: int = 64) -> Encoding:
        """Pick the round's ranges: explicit values first, else from the data (see module)."""
        if clip is None:
            if reference is None:
                raise ConfigurationError(
                    "Expected a clipping range: pass clip=R to the scheme, or the current "
                    "global model as reference= so that R is chosen from it. Received neither."
                )
            peak = max((float(np.max(np.abs(a))) for a in reference.values() if np.size(a)),
                       default=0.0)
            clip = clip_margin * max(1.0, peak)
        if max_weight is None:
            hinted = [float(w) for w in (weights_hint or {}).values()]
            max_weight = max(hinted) if hinted else DEFAULT_MAX_WEIGHT
        layout = (Layout.of(reference, None).to_wire()["params"]
                  if reference is not None else None)
        return cls(n_nodes, max_weight, clip, clip if extras_clip is None else extras_clip,
                   layout, ring_bits)

    def to_wire(self) -> dict[str, Any]:
        """Msgpack-safe parameters (exponents travel, so both sides use the same steps)."""
        return {"n_nodes": self.n_nodes, "max_weight": self.max_weight,
                "clip": self.values.clip, "extras_clip": self.extras.clip,
                "exponents": [self.values.exponent, self.extras.exponent, self.weight.exponent],
                "params_layout": self.params_layout, "ring_bits": self.ring_bits}

    @classmethod
    def from_wire(cls, data: Any) -> Encoding:
        """Rebuild the researcher's encoding on a node; ``ProtocolError`` when malformed."""
        try:
            enc = cls(int(data["n_nodes"]), float(data["max_weight"]), float(data["clip"]),
                      float(data["extras_clip"]), data.get("params_layout"),
                      int(data.get("ring_bits", 64)))
            sent = [int(e) for e in data["exponents"]]
        except (KeyError, TypeError, ValueError, ConfigurationError) as exc:
            raise ProtocolError(f"Malformed fixed-point parameters: {exc}.") from exc
        if sent != [enc.values.exponent, enc.extras.exponent, enc.weight.exponent]:
            raise ProtocolError(
                f"The fixed-point steps 2^{sent} do not match the parameters received "
                f"(expected 2^{[enc.values.exponent, enc.extras.exponent, enc.weight.exponent]})."
            )
        return enc

    def check_received(self, layout: Layout, node: str, first: Layout | None) -> None:
        """Refuse a node's layout unlike the global model's or unlike the first one received."""
        if first is None:
            if self.params_layout is not None and layout.to_wire()["params"] != self.params_layout:
                ref = Layout.from_wire({"params": self.params_layout, "extras": []})
                raise ProtocolError(f"The update from {node!r} does not have the global model's "
                                    "layout: " + ref.describe_difference(Layout(layout.params, [])))
        elif layout != first:
            raise ProtocolError(f"The update from {node!r} differs in layout from the others: "
                                f"{first.describe_difference(layout)}.")

    def encode(self, update: ParameterSet, weight: float,
               extras: Mapping[str, ParameterSet] | None = None,
               dtype: type[np.unsignedinteger[Any]] = np.uint64) -> tuple[np.ndarray, Layout]:
        """The vector of ``weight * update`` (and extras, weight, clip counts).

        Of uint64, or of ``dtype`` uint32 for a 32-bit ring (half the memory and the work).
        """
        layout = self._checked_layout(update, weight, extras, np.dtype(dtype))
        out = np.empty(layout.size, dtype=dtype)
        clipped = self._write(update, weight, extras, out, FixedPoint.encode_into)
        out[-2:] = clipped
        return out, layout

    def encode_onto(self, vector: np.ndarray, update: ParameterSet, weight: float,
                    extras: Mapping[str, ParameterSet] | None = None) -> Layout:
        """Add the vector :meth:`encode` makes to ``vector`` (modulo its ring), in place.

        Bit for bit what ``encode`` then an addition give, without the encoded vector: one
        pass over ``vector`` (a node adds its update to its precomputed mask). ``vector``
        must be as long as the encoding (``ConfigurationError`` otherwise, as for what
        :meth:`encode` refuses; ``vector`` is then left unchanged, except for non-finite
        values, found part way).
        """
        layout = self._checked_layout(update, weight, extras, vector.dtype)
        if vector.shape != (layout.size,):
            raise ConfigurationError(f"Expected a vector of {layout.size} words to encode "
                                     f"onto. Received {vector.shape}.")
        clipped = self._write(update, weight, extras, vector, FixedPoint.add_encoding_into)
        np.add(vector[-2:], np.array(clipped, dtype=vector.dtype), out=vector[-2:])
        return layout

    def _checked_layout(self, update: ParameterSet, weight: float,
                        extras: Mapping[str, ParameterSet] | None, dtype: np.dtype[Any]
                        ) -> Layout:
        if dtype.itemsize * 8 < self.ring_bits:
            raise ConfigurationError(f"Expected a dtype of at least {self.ring_bits} bits for "
                                     f"this ring. Received {dtype.name}.")
        if not (isinstance(weight, (int, float, np.number)) and math.isfinite(weight)
                and 0 < weight <= self.max_weight):
            raise ConfigurationError(
                f"Expected a weight in (0, {self.max_weight:g}] (max_weight of this round). "
                f"Received {weight!r}. Raise max_weight (or pass weights_hint) on the scheme."
            )
        layout = Layout.of(update, extras)
        if self.params_layout is not None and layout.to_wire()["params"] != self.params_layout:
            expected = Layout.from_wire({"params": self.params_layout, "extras": []})
            raise ConfigurationError(
                "The update does not have the global model's layout: "
                + expected.describe_difference(Layout(layout.params, [])) + "."
            )
        if layout.n_values * self.n_nodes >= 1 << (8 * dtype.itemsize):
            raise ConfigurationError(
                f"The clip counts of {self.n_nodes} nodes' {layout.n_values} values could wrap "
                f"a {dtype.name} ring: use the 64-bit ring for a model this large.")
        return layout

    def _write(self, update: ParameterSet, weight: float,
               extras: Mapping[str, ParameterSet] | None, out: np.ndarray,
               write: _Writer) -> list[int]:
        """Encode every value and the weight into ``out`` with ``write``; the clip counts.

        ``write`` is :meth:`FixedPoint.encode_into` or :meth:`FixedPoint.add_encoding_into`.
        """
        pos = 0
        clipped = [0, 0]
        sets = [(0, self.values, update)] + [(1, self.extras, ps) for ps in (extras or {}).values()]
        for which, fp, ps in sets:
            for a in ps.values():
                size = int(np.size(a))
                clipped[which] += write(fp, np.asarray(a), float(weight), out[pos:pos + size])
                pos += size
        write(self.weight, np.array([1.0]), float(weight), out[pos:pos + 1])
        return clipped

    def decode(self, sums: np.ndarray, layout: Layout, n_summed: int
               ) -> tuple[ParameterSet, float, dict[str, ParameterSet], dict[str, Any]]:
        """Sums (float64), total weight, extras' sums and what the decoding reports."""
        return self._decode(sums, layout, n_summed, FixedPoint.decode)

    def decode_in_place(self, sums: np.ndarray, layout: Layout, n_summed: int
                        ) -> tuple[ParameterSet, float, dict[str, ParameterSet], dict[str, Any]]:
        """:meth:`decode`, the float64 sums written over ``sums``, which it consumes.

        For a caller that owns ``sums`` (a writable, contiguous vector) and drops it: with
        8-byte words the sums are views of its memory, made in one pass (no new array, see
        :meth:`FixedPoint.decode_in_place`); 4-byte words cannot hold them and are decoded
        into new arrays as by :meth:`decode`. The values are the same, bit for bit.
        """
        return self._decode(sums, layout, n_summed, FixedPoint.decode_in_place)

    def _decode(self, sums: np.ndarray, layout: Layout, n_summed: int, decode: _Reader
                ) -> tuple[ParameterSet, float, dict[str, ParameterSet], dict[str, Any]]:
        if sums.shape != (layout.size,):
            raise ProtocolError(f"Expected {layout.size} summed values. Received {sums.shape}.")
        if sums.dtype.itemsize * 8 != self.ring_bits:  # a ring narrower than its words
            sums = _sign_extend(sums, self.ring_bits)  # a new vector, 8-byte words
        if sums.dtype.itemsize != 8:  # cannot hold float64: decoded into new arrays
            decode = FixedPoint.decode
        pos = 0

        def take(entries: list[tuple[str, tuple[int, ...]]], fp: FixedPoint) -> ParameterSet:
            nonlocal pos
            out = {}
            for name, shape in entries:
                size = math.prod(shape)
                out[name] = decode(fp, sums[pos:pos + size]).reshape(shape)
                pos += size
            return ParameterSet(out)

        params = take(layout.params, self.values)
        extras = {k: take(v, self.extras) for k, v in layout.extras}
        total_weight = float(self.weight.decode(sums[pos:pos + 1])[0])
        report = {
            "clipped": {"params": int(sums[pos + 1]), "extras": int(sums[pos + 2])},
            "clip_range": {"params": self.values.clip, "extras": self.extras.clip},
            "step": {"params": self.values.step, "extras": self.extras.step},
            "error_bound": {"params": self.values.error_bound(n_summed),
                            "extras": self.extras.error_bound(n_summed)},
            "max_weight": self.max_weight,
        }
        return params, total_weight, extras, report
