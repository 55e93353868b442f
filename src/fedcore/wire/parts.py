"""A message handed over in pieces, by reference: what in-process transports deliver.

Here rather than in :mod:`fedcore.transport` so that decoding a frame
(:mod:`fedcore.wire.codec`) imports no event loop; :mod:`fedcore.transport` re-exports it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from fedcore.params import immutable

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["Parts", "head"]


class Parts:
    """One message handed over in pieces, by reference: a frame that no one joined.

    Every piece is immutable (``bytes``, or a view of ``bytes``: an array decoded from a
    frame, or a :meth:`~fedcore.params.ParameterSet.snapshot`); a piece that is not is
    copied into ``bytes`` when the message is made, so a message never changes after it was
    sent, as if its bytes had been joined. ``len()`` is its size in bytes. A receiver that
    needs one buffer calls :meth:`join`; :func:`fedcore.wire.codec.decode` reads the pieces
    as they are (arrays that each lie in one piece are views of it, without a copy). Only
    in-process transports make them: nothing leaves the process.
    """

    __slots__ = ("nbytes", "pieces")

    def __init__(self, pieces: Sequence[Buffer]):
        views = []
        for piece in pieces:
            if type(piece) is bytes:  # a frame's prefix, header and padding: read-only bytes
                if piece:
                    views.append(memoryview(piece))
                continue
            view = memoryview(piece).cast("B")
            if not len(view):
                continue
            if type(view.obj) is bytes:  # a view of bytes (encode_parts' usual pieces)
                views.append(view)  # read-only: bytes export no writable buffer
            else:
                views.append(view.toreadonly() if immutable(view) else
                             memoryview(view.tobytes()))
        #: The pieces, read-only views of immutable memory, none empty.
        self.pieces: tuple[memoryview, ...] = tuple(views)
        self.nbytes = sum(map(len, views))

    def __len__(self) -> int:
        return self.nbytes

    def join(self) -> bytes:
        """The message as one ``bytes`` object (a copy)."""
        return b"".join(self.pieces)

    def head(self, n: int) -> bytes:
        """The first ``n`` bytes (or fewer, for a shorter message)."""
        return head(self.pieces, n)


def head(pieces: Iterable[memoryview], n: int) -> bytes:
    """The first ``n`` bytes of the message made of ``pieces`` (fewer, if it is shorter)."""
    out = b""
    for piece in pieces:
        out += bytes(piece[:n - len(out)])
        if len(out) >= n:
            break
    return out
