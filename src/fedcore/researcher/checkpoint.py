"""Experiment checkpoints: one msgpack file per save, written atomically, read with checks."""

from __future__ import annotations

from pathlib import Path

from fedcore._files import write_atomic
from fedcore.errors import ConfigurationError, ProtocolError
from fedcore.wire import codec
from fedcore.wire.messages import Checkpoint, Envelope

__all__ = ["VERSION", "read", "write"]

#: The format of the state this fedcore writes and reads.
VERSION = 1


def write(path: str | Path, body: Checkpoint) -> Path:
    """Write ``body`` to ``path`` atomically: never a half-written checkpoint."""
    return write_atomic(Path(path), codec.encode(Envelope(body=body)))


def read(path: str | Path) -> Checkpoint:
    """The checkpoint at ``path`` (a file, or the newest ``*.fedcore`` of a folder).

    ``ConfigurationError`` says what is wrong with anything else.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.fedcore"))
        if not files:
            raise ConfigurationError(f"No *.fedcore checkpoint in {path}.")
        path = files[-1]
    try:
        body = codec.decode(path.read_bytes()).body
    except FileNotFoundError:
        raise ConfigurationError(f"No checkpoint at {path}.") from None
    except ProtocolError as exc:
        raise ConfigurationError(
            f"{path} is not a readable fedcore checkpoint ({exc}). Pass a file written by "
            "Experiment.save(), or the checkpoint folder.") from exc
    if not isinstance(body, Checkpoint):
        raise ConfigurationError(
            f"{path} is not a fedcore experiment checkpoint (it holds a "
            f"{body.TAG!r} message). Pass a file written by Experiment.save().")
    found = body.state.get("format")
    if found != VERSION:
        raise ConfigurationError(
            f"{path} is an experiment checkpoint of format {found!r}; this fedcore reads "
            f"format {VERSION}. Open it with the fedcore version that wrote it.")
    return body
