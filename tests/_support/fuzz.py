"""Mutated frames for the decoder fuzz tests: seeded, so a failure replays exactly.

Three kinds of mutation, in turn, of valid frames of every message type:

- bytes: flipped bits, overwritten or inserted bytes, truncation (mostly stops at the prefix
  or the msgpack header: cheap refusals);
- header: one routing field, array descriptor or the body replaced by a hostile value
  (dtype strings numpy rejects or misreads, shapes of 70 dimensions or with a dimension of
  2**63, negative or float dimensions, unknown tags, wrong types);
- body: one field of the body replaced by a value of another type, or a nested structure
  made odd (array references out of range, unknown extension codes, deep nesting).

Every mutated frame is re-encoded with a valid prefix, so most reach the array and body
decoding, where a decoder's missed cases hide.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import msgpack

from fedcore.wire import codec
from fedcore.wire.messages import Body, Envelope, message_types

__all__ = ["HOSTILE_DTYPES", "HOSTILE_SHAPES", "frames"]

HOSTILE_DTYPES: list[Any] = [
    "f3", "<f8\n", "<f8 ", "<f16", "<c32", "O", "|O", "|V8", "<M8", "<m8", "|S4", "<U1",
    "b1", "<b1", "=f8", "f8", "i", "", "<", "<f0", "<f99", "float64", "d", "e" * 200, 8,
    None, b"<f8", ["<f8"], {"t": 1}, 1.5, True,
]
HOSTILE_SHAPES: list[Any] = [
    [2] * 70, [1] * 65, [0] * 40, [0, 2 ** 63], [2 ** 63], [2 ** 64 - 1],
    [0, 2 ** 64 - 1, 2 ** 64 - 1],
    [-1], [-(2 ** 63)], [1.5], ["3"], [None], [True], [[2]], {"0": 1}, "3", 3, None,
    [2 ** 31, 2 ** 31, 0], [1 << 40, 0], [64] * 8,
]
_VALUES: list[Any] = [
    None, True, 0, -1, 2 ** 63, -(2 ** 63), 2 ** 64 - 1, 1.5, float("nan"), float("inf"), "",
    "x" * 300, b"", b"\x00" * 40, [], [None], {}, {"": None}, {"a": {"b": [1, {"c": []}]}},
    [[[[[[[[[[1]]]]]]]]]], msgpack.ExtType(1, b"\xff\xff\xff\xff"),
    msgpack.ExtType(1, b"\x01"), msgpack.ExtType(2, b"\x91\x92\xa1w\xce\x00\x00\x00\x63"),
    msgpack.ExtType(2, b"not msgpack"), msgpack.ExtType(9, b"?"),
    msgpack.ExtType(1, struct.pack("<I", 0)),
]
_ROUTING = ["v", "t", "id", "re", "from", "to", "exp", "rnd", "a", "b"]


def frames(samples: Mapping[str, Body], n: int, seed: int) -> Iterator[bytes]:
    """``n`` mutated frames of ``samples``' bodies, the same ones for the same seed."""
    rng = random.Random(seed)
    bases = [codec.encode(Envelope(body, sender="researcher", recipient="site",
                                   experiment="exp-1", round=1))
             for body in samples.values()]
    heads = [_header(frame) for frame in bases]
    tags = [*message_types(), "format-disk", ""]
    for i in range(n):
        which = rng.randrange(len(bases))
        kind = i % 3
        if kind == 0:
            yield _bytes(rng, bases[which])
        elif kind == 1:
            yield _rebuild(bases[which], _mutate_header(rng, dict(heads[which]), tags))
        else:
            yield _rebuild(bases[which], _mutate_body(rng, dict(heads[which])))


def _header(frame: bytes) -> dict[str, Any]:
    hlen = struct.unpack_from("<I", frame, 4)[0]
    return dict(msgpack.unpackb(frame[8:8 + hlen]))


def _rebuild(frame: bytes, header: dict[str, Any]) -> bytes:
    """``frame`` with its header replaced: the arrays' bytes follow at their old offsets."""
    hlen = struct.unpack_from("<I", frame, 4)[0]
    new = msgpack.packb(header)
    return codec.MAGIC + struct.pack("<I", len(new)) + new + frame[8 + hlen:]


def _bytes(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    how = rng.randrange(4)
    if how == 0:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how == 1:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif how == 2:
        pos = rng.randrange(len(data))
        data[pos:pos] = rng.randbytes(rng.randint(1, 16))
    else:
        del data[rng.randrange(len(data)):]
    return bytes(data)


def _mutate_header(rng: random.Random, header: dict[str, Any], tags: list[str]) -> dict:
    field = rng.choice([*_ROUTING, "a", "a", "a", "t"])
    if field == "a":
        descriptors = [list(d) for d in header.get("a") or [["<f8", [3]]]]
        pick = rng.randrange(len(descriptors))
        how = rng.randrange(4)
        if how == 0:
            descriptors[pick][0] = rng.choice(HOSTILE_DTYPES)
        elif how == 1:
            descriptors[pick][1] = rng.choice(HOSTILE_SHAPES)
        elif how == 2:
            descriptors[pick] = rng.choice([[], ["<f8"], ["<f8", [1], 3], "<f8", None, 7])
        else:
            descriptors.append([rng.choice(["<f8", "|u1", "<i4"]), rng.choice(HOSTILE_SHAPES)])
        header["a"] = descriptors
    elif field == "t":
        header["t"] = rng.choice(tags)
    else:
        header[field] = rng.choice(_VALUES)
    return header


def _mutate_body(rng: random.Random, header: dict[str, Any]) -> dict[str, Any]:
    try:
        body = msgpack.unpackb(header["b"], ext_hook=msgpack.ExtType)
    except Exception:
        return header
    if isinstance(body, dict) and body and rng.random() < 0.85:
        key = rng.choice(list(body))
        body[key] = _deep_replace(rng, body[key])
    else:
        body = rng.choice(_VALUES)
    header["b"] = msgpack.packb(body)
    return header


def _deep_replace(rng: random.Random, value: Any) -> Any:
    """``value`` with one nested element (or itself) replaced by a hostile value."""
    if isinstance(value, dict) and value and rng.random() < 0.7:
        key = rng.choice(list(value))
        return {**value, key: _deep_replace(rng, value[key])}
    if isinstance(value, list) and value and rng.random() < 0.7:
        pos = rng.randrange(len(value))
        return [*value[:pos], _deep_replace(rng, value[pos]), *value[pos + 1:]]
    return rng.choice(_VALUES)
