"""The wire format: a msgpack header followed by raw, aligned array buffers.

Layout of one frame::

    b"FCF1"  | u32 little-endian header length | msgpack header | pad | array 0 | pad | array 1 ...

The header is a msgpack map with the envelope's routing fields, the body (msgpack, with arrays
replaced by references) and one ``[dtype, shape]`` descriptor per array. Array buffers start
at 64-byte aligned offsets, so encoding is one ``memcpy`` per array and decoding builds
``numpy.frombuffer`` views on the frame without copying. Decoded arrays are read-only.

Only numeric dtypes cross the wire, named exactly as numpy's canonical ``dtype.str`` spells
them (:data:`DTYPES`); object arrays, pickle and class names never do. An array has at most
:data:`MAX_RANK` dimensions, and its elements fit the frame size limit. Whatever the bytes,
:func:`decode` raises :class:`~fedcore.errors.ProtocolError` and nothing else.
"""

from __future__ import annotations

import math
import operator
import struct
import threading
from typing import TYPE_CHECKING, Any, cast

import msgpack
import numpy as np

from fedcore.errors import ProtocolError
from fedcore.params import ParameterSet
from fedcore.wire.messages import (
    PROTOCOL_VERSION,
    Body,
    Envelope,
    Recipe,
    assemble,
    body_type,
    rebuild,
    recipe,
)
from fedcore.wire.parts import Parts

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["DEFAULT_MAX_FRAME", "DTYPES", "MAGIC", "MAX_RANK", "BatchEncoder", "decode", "encode",
           "encode_parts", "peek_header", "reply_id"]

MAGIC = b"FCF1"
DEFAULT_MAX_FRAME = 1 << 31  # 2 GiB: a 1 GiB model and its header fit with room to spare
_MAX_HEADER = 64 << 20
_ALIGN = 64
_PREFIX = struct.Struct("<4sI")
_EXT_ARRAY = 1
_EXT_PARAMS = 2
#: The dtypes an array may have on the wire, exactly as numpy's ``dtype.str`` names them
#: (both byte orders: a NIfTI file may hold big-endian data).
DTYPES = frozenset(
    {"|b1", "|i1", "|u1"}
    | {f"{order}{kind}{size}" for order in "<>" for kind in "iu" for size in (2, 4, 8)}
    | {f"{order}f{size}" for order in "<>" for size in (2, 4, 8)}
    | {f"{order}c{size}" for order in "<>" for size in (8, 16)})
MAX_RANK = 32  #: the most dimensions an array on the wire may have
_PAD = bytes(_ALIGN)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def encode_parts(env: Envelope, *, max_size: int = DEFAULT_MAX_FRAME) -> list[Buffer]:
    """Encode ``env`` into a list of buffers whose concatenation is the frame.

    Transports that can write vectored I/O send the parts without joining them.
    """
    arrays: list[np.ndarray] = []
    try:
        body = msgpack.packb(env.body.to_wire(), default=_packer_default(arrays))
    except TypeError as exc:
        raise ProtocolError(str(exc)) from exc
    return _frame_parts(env, body, arrays, max_size)


class BatchEncoder:
    """:func:`encode_parts` for envelopes made in one go, packing what they share once.

    A scatter's requests differ in a few fields (the recipient, the dataset...) and share
    the rest: the same global model, plan and arguments, the same objects in every body.
    Here a body field that holds the very object an earlier frame's field held, at the same
    place among the frame's arrays, is not packed again: its bytes are reused. The frames
    are byte for byte those of :func:`encode_parts`.

    Use one encoder for frames encoded one after another with nothing in between that may
    change the shared objects (no ``await``), then drop it: it keeps every object it saw,
    so that none is freed and its ``id`` reused while it holds the bytes.
    """

    def __init__(self, *, max_size: int = DEFAULT_MAX_FRAME):
        self.max_size = max_size
        #: ``id(value)`` -> (value, its first array's index, its bytes, its arrays).
        self._values: dict[int, tuple[Any, int, bytes, list[np.ndarray]]] = {}
        self._keys: dict[str, bytes] = {}  # field names, packed
        #: ``id`` of each array of a frame -> (those arrays, their descriptors).
        self._layouts: dict[tuple[int, ...], tuple[list[np.ndarray], list[list[Any]]]] = {}
        # msgpack's ``default`` for the frame being encoded (its arrays join that frame's).
        self._frame_default = _packer_default([])
        # One packer for every frame (what ``msgpack.packb`` makes at each call); it
        # starts empty after an exception too.
        self._pack = msgpack.Packer(default=self._default).pack

    def _default(self, obj: Any) -> Any:
        return self._frame_default(obj)

    def _descriptors(self, arrays: list[np.ndarray]) -> list[list[Any]]:
        """:func:`_descriptors`, made once for the same arrays (those of shared values)."""
        key = tuple(map(id, arrays))
        known = self._layouts.get(key)
        if known is None or not all(map(operator.is_, known[0], arrays)):
            known = self._layouts[key] = (list(arrays), _descriptors(arrays))
        return known[1]

    def encode_parts(self, env: Envelope) -> list[Buffer]:
        """The parts of ``env``'s frame, as :func:`encode_parts` makes them."""
        fields = env.body.to_wire()
        if type(fields) is not dict:  # pragma: no cover - every Body gives a dict
            return encode_parts(env, max_size=self.max_size)
        arrays: list[np.ndarray] = []
        self._frame_default = _packer_default(arrays)
        chunks = [_map_header(len(fields))]
        values, keys, pack = self._values, self._keys, self._pack
        try:
            for name, value in fields.items():
                key = keys.get(name)
                if key is None:
                    key = keys[name] = pack(name)
                chunks.append(key)
                known = values.get(id(value))
                # Its bytes name its arrays by their index in the frame: the same only if
                # they start at the same place (or there are none).
                if known is not None and known[0] is value and (
                        not known[3] or known[1] == len(arrays)):
                    chunks.append(known[2])
                    arrays.extend(known[3])
                    continue
                start = len(arrays)
                packed = pack(value)
                values[id(value)] = (value, start, packed, arrays[start:])
                chunks.append(packed)
            header = pack(_header(env, b"".join(chunks), self._descriptors(arrays)))
        except TypeError as exc:
            raise ProtocolError(str(exc)) from exc
        finally:
            self._frame_default = _packer_default([])
        return _frame_from_header(header, arrays, self.max_size)


def _map_header(n: int) -> bytes:
    """The msgpack header of a map of ``n`` entries (what ``packb`` writes before them)."""
    header = _MAP_HEADERS.get(n)
    if header is None:
        header = msgpack.Packer().pack_map_header(n)
    return header


_MAP_HEADERS = {n: msgpack.Packer().pack_map_header(n) for n in range(64)}


def _packer_default(arrays: list[np.ndarray]) -> Any:
    """The ``default`` of msgpack for a frame: arrays and parameter sets join ``arrays``."""

    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return msgpack.ExtType(_EXT_ARRAY, _ref(obj, arrays))
        if isinstance(obj, ParameterSet):
            return msgpack.ExtType(_EXT_PARAMS, _param_refs(obj, arrays))
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, (set, frozenset)):
            return sorted(obj)
        raise TypeError(
            f"Cannot send a {type(obj).__name__} in a fedcore message. Expected: str, int, "
            "float, bool, None, bytes, list, dict, numpy arrays or a ParameterSet."
        )

    return default


def _frame_parts(env: Envelope, body: bytes, arrays: list[np.ndarray], max_size: int
                 ) -> list[Buffer]:
    """The frame's parts: prefix, header (routing, array descriptors, ``body``), arrays."""
    try:
        header = msgpack.packb(_header(env, body, _descriptors(arrays)))
    except TypeError as exc:
        raise ProtocolError(str(exc)) from exc
    return _frame_from_header(header, arrays, max_size)


def _descriptors(arrays: list[np.ndarray]) -> list[list[Any]]:
    """One ``[dtype, shape]`` per array, as the header lists them."""
    return [[a.dtype.str, list(a.shape)] for a in arrays]


def _header(env: Envelope, body: bytes, descriptors: list[list[Any]]) -> dict[str, Any]:
    """The frame's header: routing, one ``[dtype, shape]`` per array, the packed body."""
    return {
        "v": env.version,
        "t": env.tag,
        "id": env.id,
        "re": env.reply_to,
        "from": env.sender,
        "to": env.recipient,
        "exp": env.experiment,
        "rnd": env.round,
        "a": descriptors,
        "b": body,
    }


def _frame_from_header(header: bytes, arrays: list[np.ndarray], max_size: int
                       ) -> list[Buffer]:
    parts: list[Buffer] = [_PREFIX.pack(MAGIC, len(header)), header]
    size = _PREFIX.size + len(header)
    for arr in arrays:
        pad = _aligned(size) - size
        if pad:
            parts.append(_PAD[:pad])
        parts.append(_piece(arr))
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


def _piece(arr: np.ndarray) -> Buffer:
    """The bytes of a C-ordered array, as a part of a frame.

    An array that is the whole of a ``bytes`` object (a
    :meth:`~fedcore.params.ParameterSet.snapshot`'s) is sent as that object, so that
    :class:`~fedcore.wire.parts.Parts` knows at once that no one can change it.
    """
    if not arr.size:
        return b""
    owner = arr.base
    if type(owner) is np.ndarray:  # a snapshot's array: a reshaped view of its bytes
        owner = owner.base
    # Contiguous, as long as its owner, inside it: exactly its bytes, from the first.
    if type(owner) is bytes and len(owner) == arr.nbytes and arr.flags.c_contiguous:
        return owner
    return arr.reshape(-1).view(np.uint8).data


def _param_refs(params: ParameterSet, arrays: list[np.ndarray]) -> bytes:
    """The ext data of a parameter set (``[[name, ref], ...]``): its arrays join ``arrays``."""
    start = len(arrays)
    for arr in params.values():
        _ref(arr, arrays)
    key = (tuple(params), start)
    packed = _PARAM_REFS.get(key)
    if packed is None:
        packed = msgpack.packb([[name, _reference(start + i)] for i, name in enumerate(key[0])])
        if len(_PARAM_REFS) >= _MAX_LAYOUTS:
            _PARAM_REFS.clear()
        _PARAM_REFS[key] = packed
    return packed


#: Packed parameter-set references, by names and first array index (the same every round).
_PARAM_REFS: dict[tuple[tuple[str, ...], int], bytes] = {}
#: An array reference on the wire is its index as a little-endian u32; the first ones ready.
_REFS = tuple(struct.pack("<I", i) for i in range(1024))
_INDEX = {ref: i for i, ref in enumerate(_REFS)}


def _reference(index: int) -> bytes:
    return _REFS[index] if index < len(_REFS) else struct.pack("<I", index)


def _ref(arr: np.ndarray, arrays: list[np.ndarray]) -> bytes:
    if arr.dtype.str not in DTYPES:
        raise TypeError(f"Only numeric arrays of the dtypes {sorted(DTYPES)} can be sent. "
                        f"Received dtype={arr.dtype} ({arr.dtype.str!r}): convert it first, "
                        "e.g. arr.astype('float64').")
    if arr.ndim > MAX_RANK:
        raise TypeError(f"Arrays of at most {MAX_RANK} dimensions can be sent. Received "
                        f"shape={arr.shape}.")
    arrays.append(np.asarray(arr, order="C"))  # keeps 0-d arrays 0-d
    return _reference(len(arrays) - 1)


def _split(frame: Buffer | Parts, max_size: int
           ) -> tuple[memoryview | _Pieces, dict[str, Any], int]:
    """The frame (one view, or its pieces), its header and where the header ends."""
    pieces: _Pieces | None = None
    if isinstance(frame, Parts):
        pieces = _Pieces(frame)
        found = pieces.locate(0, _PREFIX.size)  # the piece that holds the prefix, if one does
        view = found[0] if found is not None else memoryview(frame.head(_PREFIX.size))
        size = len(frame)
    else:
        view = memoryview(frame).cast("B")
        size = len(view)
    if size > max_size:
        raise ProtocolError(
            f"Frame of {size} bytes exceeds the limit of {max_size} bytes."
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
    if hlen > _MAX_HEADER or end > size:
        raise ProtocolError(f"Truncated frame: header of {hlen} bytes, frame of {size}.")
    if pieces is None:
        raw = view[_PREFIX.size : end]
    else:  # the piece that holds the header, else its bytes joined (not the arrays')
        found = pieces.locate(_PREFIX.size, end)
        raw = (found[0][found[1] : found[1] + hlen] if found is not None
               else memoryview(pieces.parts.head(end))[_PREFIX.size:])
    try:
        header = msgpack.unpackb(raw)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"Malformed frame header: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError("Malformed frame header: expected a map.")
    return pieces if pieces is not None else view, header, end


def peek_header(frame: Buffer | Parts, *, max_size: int = DEFAULT_MAX_FRAME) -> dict[str, Any]:
    """The routing fields of a frame (id, sender, type...) without decoding its body."""
    _, header, _ = _split(frame, max_size)
    return {k: v for k, v in header.items() if k not in ("a", "b")}


def reply_id(frame: Buffer | Parts, *, max_size: int = DEFAULT_MAX_FRAME) -> tuple[str, str]:
    """``(id, reply-to)`` of a frame that may be malformed; ``""`` for what cannot be read."""
    try:
        header = peek_header(frame, max_size=max_size)
    except ProtocolError:
        return "", ""
    def text(value: Any) -> str:
        return value if isinstance(value, str) and len(value) <= 128 else ""

    return text(header.get("id")), text(header.get("re"))


def decode(frame: Buffer | Parts, *, max_size: int = DEFAULT_MAX_FRAME) -> Envelope:
    """Decode a frame into an :class:`Envelope`; arrays are zero-copy, read-only views.

    ``frame`` may be :class:`~fedcore.transport.Parts` (in process, a frame not joined):
    each array is then a view of the part that holds it.

    Raises :class:`ProtocolError` for anything that is not a well-formed frame of this
    protocol version, and never any other exception, whatever the bytes.

    The body of a type that repeats (:attr:`~fedcore.wire.messages.Body.REPEATS`: a training
    request) whose exact bytes passed every field check before in this process is not
    checked again (the process keeps up to 4096 such bodies, 32 MiB); all else is, and
    each decode gets its own new containers.
    """
    try:
        return _decode(frame, max_size)
    except ProtocolError:
        raise
    except Exception as exc:  # a check missed a case: still the library's own error
        raise ProtocolError(f"Malformed frame ({type(exc).__name__}: {exc}).") from exc


def _decode(frame: Buffer | Parts, max_size: int) -> Envelope:
    view, header, pos = _split(frame, max_size)
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"Frame speaks protocol version {version!r}; this side speaks "
            f"{PROTOCOL_VERSION}. Run the same fedcore release on both ends."
        )
    cls = body_type(str(header.get("t")))
    arrays = _arrays(view, header.get("a"), pos, max_size)

    def ext_hook(code: int, data: bytes) -> Any:
        if code == _EXT_ARRAY:
            return _lookup(arrays, data)
        if code == _EXT_PARAMS:
            return _parameter_set(arrays, data)
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
    get = header.get
    routing: tuple[Any, ...] = (get("id"), get("re"), get("from"), get("to"), get("exp"))
    if not all(map(isinstance, routing, _STRS)) or not isinstance(get("rnd"), int):
        raise ProtocolError("Malformed frame header: routing fields have the wrong types.")
    try:
        body = _body(cls, raw_body, body_data)
    except ProtocolError:
        raise
    except (TypeError, ValueError) as exc:  # a body's own checks (__post_init__)
        raise ProtocolError(f"Malformed {cls.TAG} body: {exc}") from exc
    return assemble(Envelope, {
        "body": body, "sender": routing[2], "recipient": routing[3],
        "experiment": routing[4], "round": header["rnd"], "id": routing[0],
        "reply_to": routing[1], "version": version})


_STRS = (str,) * 5


def _body(cls: type[Body], raw: bytes, data: Any) -> Body:
    """``cls.from_wire(data)``, its checks skipped for bytes that passed them before.

    ``data`` is what ``raw`` decoded to with this frame's arrays. Whether a field passes
    its check depends on the type of its value alone, and the same bytes decode to values
    of the same types, containers and all (an array reference to an ``ndarray`` or an
    error, a parameter-set reference to a ``ParameterSet`` or an error, whatever the
    arrays): the bytes of a body of ``cls`` that passed every check pass them again. Its
    containers are new at each decode all the same, and the arrays the frame's own.
    """
    if not cls.REPEATS or len(raw) > _CHECKED.max_body:
        return cls.from_wire(data)
    how = _CHECKED.get(cls, raw)
    if how is _UNCHECKED:
        body = cls.from_wire(data)
        _CHECKED.add(cls, raw, recipe(cls, data))  # only after every check passed
        return body
    return rebuild(cls, data, cast(Recipe, how))


_UNCHECKED = object()


class _CheckedBodies:
    """The bodies that passed :meth:`Body.from_wire`'s checks, by type and exact bytes.

    Bounded in entries and in bytes (the oldest go first), bodies over ``max_body`` bytes
    never kept. Lookups are one ``dict.get`` (atomic: several event loops and threads of a
    simulation decode at once); additions take a lock, for the count of bytes.
    """

    def __init__(self, *, max_entries: int = 4096, max_bytes: int = 32 << 20,
                 max_body: int = 64 << 10):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_body = max_body
        self._recipes: dict[tuple[type[Body], bytes], Recipe] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._recipes)

    @property
    def nbytes(self) -> int:
        """The bytes of the bodies kept."""
        return self._bytes

    def get(self, cls: type[Body], raw: bytes) -> Recipe | object:
        """The recipe of the body ``raw`` of ``cls``, or ``_UNCHECKED``."""
        return self._recipes.get((cls, raw), _UNCHECKED)

    def add(self, cls: type[Body], raw: bytes, how: Recipe) -> None:
        """Remember that ``raw``, a body of ``cls``, passed every check (``how``: its recipe)."""
        if len(raw) > min(self.max_body, self.max_bytes):
            return
        key = (cls, raw)
        recipes = self._recipes
        with self._lock:
            if key in recipes:
                return
            while recipes and (len(recipes) >= self.max_entries
                               or self._bytes + len(raw) > self.max_bytes):
                oldest = next(iter(recipes))
                del recipes[oldest]
                self._bytes -= len(oldest[1])
            recipes[key] = how
            self._bytes += len(raw)

    def clear(self) -> None:
        """Forget every body."""
        with self._lock:
            self._recipes.clear()
            self._bytes = 0


#: The process's checked bodies: room for the training requests of thousands of nodes.
_CHECKED = _CheckedBodies()


def _arrays(frame: memoryview | _Pieces, descriptors: Any, pos: int, max_size: int
            ) -> list[np.ndarray]:
    arrays: list[np.ndarray] = []
    size = len(frame)
    find = frame.find if isinstance(frame, _Pieces) else None
    whole = cast(memoryview, frame)  # when there is no find
    for dtype, shape, nbytes in _layout(descriptors, max_size):
        pos = (pos + _ALIGN - 1) // _ALIGN * _ALIGN
        end = pos + nbytes
        if end > size:
            raise ProtocolError(
                f"Truncated frame: array {len(arrays)} needs bytes up to {end}, "
                f"frame has {size}."
            )
        if find is not None:
            piece, offset = find(pos, end)
            arrays.append(np.ndarray(shape, dtype, piece, offset))  # positional: faster
        else:
            arrays.append(np.ndarray(shape, dtype, whole, pos))
        pos = end
    return arrays


class _Pieces:
    """Where the bytes of a frame in parts lie: the piece and offset of a range."""

    __slots__ = ("index", "joined", "parts", "pieces", "start")

    def __init__(self, parts: Parts):
        self.parts = parts
        self.pieces = parts.pieces
        self.index = 0  # ranges come in order: the search goes on from the last piece
        self.start = 0  # where piece ``index`` starts in the frame
        self.joined: memoryview | None = None

    def __len__(self) -> int:
        return len(self.parts)

    def locate(self, pos: int, end: int) -> tuple[memoryview, int] | None:
        """The piece that holds bytes ``pos`` to ``end`` whole and where they start in it.

        ``None`` when they lie across pieces, or before the last range located.
        """
        pieces = self.pieces
        while self.index < len(pieces):
            if pos < self.start:
                return None
            piece = pieces[self.index]
            stop = self.start + len(piece)
            if end <= stop:
                return piece, pos - self.start
            self.start = stop
            self.index += 1
        return None

    def find(self, pos: int, end: int) -> tuple[memoryview, int]:
        """A buffer that holds bytes ``pos`` to ``end`` whole, and where they start in it."""
        if pos == end:
            return _EMPTY, 0
        if self.joined is None:
            if self.index < len(self.pieces) and self.start <= pos:  # the next piece?
                piece = self.pieces[self.index]
                if end <= self.start + len(piece):
                    return piece, pos - self.start
            found = self.locate(pos, end)
            if found is not None:
                return found
            # An array across pieces (not as encode_parts cuts them): the frame, joined.
            self.joined = memoryview(self.parts.join())
        return self.joined, pos


_EMPTY = memoryview(b"")


_Layout = list[tuple[np.dtype[Any], tuple[int, ...], int]]
_LAYOUTS: dict[tuple[str, int], _Layout] = {}
_MAX_LAYOUTS = 256  # distinct models in flight; past it the table starts again
_MAX_LAYOUT_KEY = 4096


def _layout(descriptors: Any, max_size: int) -> _Layout:
    """Dtype, shape and byte size of each array the descriptors name, checked.

    Every frame of a round names the same arrays, so the checked layout is kept, keyed by
    the descriptors' ``repr`` (exact for what msgpack decodes: ``1``, ``1.0`` and ``True``
    print apart), and a frame whose descriptors differ in any way is checked in full.
    """
    if not isinstance(descriptors, list):
        raise ProtocolError("Malformed frame header: array descriptors missing.")
    key = (repr(descriptors), max_size)
    layout = _LAYOUTS.get(key)
    if layout is None:
        layout = []
        for desc in descriptors:
            dtype, shape = _descriptor(desc, max_size)
            layout.append((dtype, tuple(shape), math.prod(shape) * dtype.itemsize))
        if len(key[0]) <= _MAX_LAYOUT_KEY:
            if len(_LAYOUTS) >= _MAX_LAYOUTS:
                _LAYOUTS.clear()
            _LAYOUTS[key] = layout
    return layout


def _descriptor(desc: Any, max_size: int) -> tuple[np.dtype[Any], list[int]]:
    """The dtype and shape an array descriptor ``[dtype, shape]`` names, checked."""
    if not (isinstance(desc, list) and len(desc) == 2 and isinstance(desc[1], list)):
        raise ProtocolError(f"Malformed array descriptor: expected [dtype, shape]. "
                            f"Received: {desc!r:.200}")
    name, shape = desc
    if not isinstance(name, str) or name not in DTYPES:
        raise ProtocolError(f"Array dtype {name!r:.40} is not allowed on the wire. Expected "
                            f"one of {sorted(DTYPES)}.")
    if len(shape) > MAX_RANK or not all(
            type(d) is int and 0 <= d <= max_size for d in shape):
        raise ProtocolError(f"Malformed array shape {shape!r:.200}: expected at most "
                            f"{MAX_RANK} dimensions, each from 0 to {max_size}.")
    dtype = np.dtype(name)
    if math.prod(d for d in shape if d) * dtype.itemsize > max_size:  # even if another is 0
        raise ProtocolError(f"Array of shape {shape!r:.200} and dtype {name} exceeds the "
                            f"frame size limit of {max_size} bytes.")
    return dtype, shape


def _index(data: Any) -> int:
    """The array index a reference names (a little-endian u32, or a plain integer)."""
    if type(data) is bytes:
        index = _INDEX.get(data)
        if index is not None:
            return index
    if isinstance(data, int):
        return data
    if isinstance(data, bytes) and len(data) == 4:
        return int(struct.unpack("<I", data)[0])
    raise ProtocolError("Malformed array reference in frame.")


def _lookup(arrays: list[np.ndarray], data: Any) -> np.ndarray:
    index = _index(data)
    if not 0 <= index < len(arrays):
        raise ProtocolError(f"Array reference {index} out of range ({len(arrays)} arrays).")
    return arrays[index]


#: Checked parameter-set references (names and array indices, and the largest index), by
#: their exact bytes: every frame of a model carries the same ones.
_PARAM_SETS: dict[bytes, tuple[tuple[tuple[str, int], ...], int]] = {}


def _parameter_set(arrays: list[np.ndarray], data: bytes) -> ParameterSet:
    known = _PARAM_SETS.get(data)
    if known is None:
        refs = msgpack.unpackb(data)
        if not isinstance(refs, list) or not all(
            isinstance(r, list) and len(r) == 2 and isinstance(r[0], str) for r in refs
        ):
            raise ProtocolError("Malformed parameter set in frame.")
        pairs = tuple((name, _index(ref)) for name, ref in refs)
        for _, index in pairs:
            if index < 0:
                raise ProtocolError(f"Array reference {index} out of range "
                                    f"({len(arrays)} arrays).")
        known = (pairs, max((i for _, i in pairs), default=-1))
        if len(data) <= _MAX_LAYOUT_KEY:
            if len(_PARAM_SETS) >= _MAX_LAYOUTS:
                _PARAM_SETS.clear()
            _PARAM_SETS[data] = known
    pairs, top = known
    if top >= len(arrays):
        index = next(i for _, i in pairs if i >= len(arrays))
        raise ProtocolError(f"Array reference {index} out of range ({len(arrays)} arrays).")
    # Names are str and the arrays of checked numeric dtypes: what ParameterSet checks.
    return ParameterSet._checked({name: arrays[index] for name, index in pairs})
