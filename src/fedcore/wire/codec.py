"""The wire format: a msgpack header followed by raw, aligned array buffers.

Layout of one frame::

    b"FCF1"  | u32 little-endian header length | msgpack header | pad | array 0 | pad | array 1 ...

The header is a msgpack map with the envelope's routing fields, the body (msgpack, with arrays
replaced by references) and one ``[dtype, shape]`` descriptor per array. Array buffers start
at 64-byte aligned offsets, so encoding is one ``memcpy`` per array and decoding builds
``numpy.frombuffer`` views on the frame without copying. Decoded arrays are read-only.

Only numeric dtypes cross the wire; object arrays, pickle and class names never do.
"""

from __future__ import annotations

import math
import re
import struct
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from fedcore.errors import ProtocolError
from fedcore.params import ParameterSet
from fedcore.wire.messages import PROTOCOL_VERSION, Envelope, body_type

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["DEFAULT_MAX_FRAME", "MAGIC", "decode", "encode", "encode_parts", "peek_header"]

MAGIC = b"FCF1"
DEFAULT_MAX_FRAME = 1 << 31  # 2 GiB: a 1 GiB model and its header fit with room to spare
_MAX_HEADER = 64 << 20
_ALIGN = 64
_PREFIX = struct.Struct("<4sI")
_EXT_ARRAY = 1
_EXT_PARAMS = 2
_DTYPE = re.compile(r"^[<>|=]?[biufc][1-9][0-9]?$")
_PAD = bytes(_ALIGN)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def encode_parts(env: Envelope, *, max_size: int = DEFAULT_MAX_FRAME) -> list[Buffer]:
    """Encode ``env`` into a list of buffers whose concatenation is the frame.

    Transports that can write vectored I/O send the parts without joining them.
    """
    arrays: list[np.ndarray] = []

    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return msgpack.ExtType(_EXT_ARRAY, _ref(obj, arrays))
        if isinstance(obj, ParameterSet):
            refs = [[name, _ref(arr, arrays)] for name, arr in obj.items()]
            return msgpack.ExtType(_EXT_PARAMS, msgpack.packb(refs))
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, (set, frozenset)):
            return sorted(obj)
        raise TypeError(
            f"Cannot send a {type(obj).__name__} in a fedcore message. Expected: str, int, "
            "float, bool, None, bytes, list, dict, numpy arrays or a ParameterSet."
        )

    try:
        body = msgpack.packb(env.body.to_wire(), default=default)
        header = msgpack.packb(
            {
                "v": env.version,
                "t": env.tag,
                "id": env.id,
                "re": env.reply_to,
                "from": env.sender,
                "to": env.recipient,
                "exp": env.experiment,
                "rnd": env.round,
                "a": [[a.dtype.str, list(a.shape)] for a in arrays],
                "b": body,
            }
        )
    except TypeError as exc:
        raise ProtocolError(str(exc)) from exc
    parts: list[Buffer] = [_PREFIX.pack(MAGIC, len(header)), header]
    size = _PREFIX.size + len(header)
    for arr in arrays:
        pad = _aligned(size) - size
        if pad:
            parts.append(_PAD[:pad])
        parts.append(arr.reshape(-1).view(np.uint8).data if arr.size else b"")
        size += pad + arr.nbytes
    if size > max_size:
        raise ProtocolError(
            f"Frame of {size} bytes exceeds the limit of {max_size} bytes. Send a smaller "
            "model, or raise max_frame_size on both ends."
        )
    return parts


def encode(env: Envelope, *, max_size: int = DEFAULT_MAX_FRAME) -> bytes:
    """Encode ``env`` into one frame (bytes)."""
    return b"".join(encode_parts(env, max_size=max_size))


def _ref(arr: np.ndarray, arrays: list[np.ndarray]) -> bytes:
    if arr.dtype.kind not in "biufc":
        raise TypeError(f"Only numeric arrays can be sent. Received dtype={arr.dtype}")
    arrays.append(np.asarray(arr, order="C"))  # keeps 0-d arrays 0-d
    return struct.pack("<I", len(arrays) - 1)


def _split(frame: Buffer, max_size: int) -> tuple[memoryview, dict[str, Any], int]:
    view = memoryview(frame).cast("B")
    if len(view) > max_size:
        raise ProtocolError(
            f"Frame of {len(view)} bytes exceeds the limit of {max_size} bytes."
        )
    if len(view) < _PREFIX.size:
        raise ProtocolError(f"Truncated frame: {len(view)} bytes, shorter than its prefix.")
    magic, hlen = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise ProtocolError(
            f"Not a fedcore frame: it starts with {bytes(magic)!r}, expected {MAGIC!r}. "
            "(fedcore never accepts pickle or other encodings.)"
        )
    end = _PREFIX.size + hlen
    if hlen > _MAX_HEADER or end > len(view):
        raise ProtocolError(f"Truncated frame: header of {hlen} bytes, frame of {len(view)}.")
    try:
        header = msgpack.unpackb(view[_PREFIX.size : end])
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"Malformed frame header: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError("Malformed frame header: expected a map.")
    return view, header, end


def peek_header(frame: Buffer, *, max_size: int = DEFAULT_MAX_FRAME) -> dict[str, Any]:
    """The routing fields of a frame (id, sender, type...) without decoding its body."""
    _, header, _ = _split(frame, max_size)
    return {k: v for k, v in header.items() if k not in ("a", "b")}


def decode(frame: Buffer, *, max_size: int = DEFAULT_MAX_FRAME) -> Envelope:
    """Decode a frame into an :class:`Envelope`; arrays are zero-copy, read-only views.

    Raises :class:`ProtocolError` for anything that is not a well-formed frame of this
    protocol version.
    """
    view, header, pos = _split(frame, max_size)
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"Frame speaks protocol version {version!r}; this side speaks "
            f"{PROTOCOL_VERSION}. Run the same fedcore release on both ends."
        )
    cls = body_type(str(header.get("t")))
    arrays = _arrays(view, header.get("a"), pos)

    def ext_hook(code: int, data: bytes) -> Any:
        if code == _EXT_ARRAY:
            return _lookup(arrays, data)
        if code == _EXT_PARAMS:
            refs = msgpack.unpackb(data)
            if not isinstance(refs, list) or not all(
                isinstance(r, list) and len(r) == 2 and isinstance(r[0], str) for r in refs
            ):
                raise ProtocolError("Malformed parameter set in frame.")
            return ParameterSet((name, _lookup(arrays, ref)) for name, ref in refs)
        raise ProtocolError(f"Unknown extension type {code} in frame.")

    raw_body = header.get("b")
    if not isinstance(raw_body, bytes):
        raise ProtocolError("Malformed frame: the body is missing.")
    try:
        body_data = msgpack.unpackb(raw_body, ext_hook=ext_hook)
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"Malformed {cls.TAG} body: {exc}") from exc
    routing: dict[str, Any] = {k: header.get(k) for k in ("id", "re", "from", "to", "exp")}
    if not all(isinstance(v, str) for v in routing.values()) or not isinstance(
        header.get("rnd"), int
    ):
        raise ProtocolError("Malformed frame header: routing fields have the wrong types.")
    return Envelope(
        body=cls.from_wire(body_data),
        sender=routing["from"],
        recipient=routing["to"],
        experiment=routing["exp"],
        round=header["rnd"],
        id=routing["id"],
        reply_to=routing["re"],
        version=version,
    )


def _arrays(view: memoryview, descriptors: Any, pos: int) -> list[np.ndarray]:
    if not isinstance(descriptors, list):
        raise ProtocolError("Malformed frame header: array descriptors missing.")
    arrays: list[np.ndarray] = []
    for desc in descriptors:
        if not (
            isinstance(desc, list)
            and len(desc) == 2
            and isinstance(desc[0], str)
            and _DTYPE.match(desc[0])
            and isinstance(desc[1], list)
            and all(isinstance(d, int) and d >= 0 for d in desc[1])
        ):
            raise ProtocolError(f"Malformed or non-numeric array descriptor: {desc!r}")
        dtype = np.dtype(desc[0])
        count = math.prod(desc[1])
        pos = _aligned(pos)
        end = pos + count * dtype.itemsize
        if end > len(view):
            raise ProtocolError(
                f"Truncated frame: array {len(arrays)} needs bytes up to {end}, "
                f"frame has {len(view)}."
            )
        arrays.append(np.frombuffer(view, dtype=dtype, count=count, offset=pos).reshape(desc[1]))
        pos = end
    return arrays


def _lookup(arrays: list[np.ndarray], data: Any) -> np.ndarray:
    if isinstance(data, int):
        index = data
    elif isinstance(data, bytes) and len(data) == 4:
        index = struct.unpack("<I", data)[0]
    else:
        raise ProtocolError("Malformed array reference in frame.")
    if not 0 <= index < len(arrays):
        raise ProtocolError(f"Array reference {index} out of range ({len(arrays)} arrays).")
    return arrays[index]
