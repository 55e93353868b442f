"""``run.toml`` in a checkpoint folder: which key and enrolled-nodes files the run used.

``fedcore run`` and ``fedcore resume`` record them, as absolute paths (never a key), so
that ``fedcore resume FOLDER`` needs neither ``--identity`` nor ``--enrolled`` again.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from fedcore import Experiment
from fedcore._files import write_atomic
from fedcore.errors import ConfigurationError
from fedcore.wire import identity as keys

FILE = "run.toml"
_HEADER = ("# Written by `fedcore run`: the files `fedcore resume` uses, unless --identity or\n"
           "# --enrolled say otherwise. Paths only: the keys stay in their files.\n")


def _enrolled_file(enrolled: Any) -> Path | None:
    if isinstance(enrolled, Mapping):  # keys given in code: nothing to point at
        return None
    return Path(enrolled or os.environ.get("FEDCORE_NODES")
                or Path("~/.fedcore/nodes.toml")).expanduser()


def remember(exp: Experiment) -> Path | None:
    """Write ``run.toml`` into the experiment's checkpoint folder (none: nothing written)."""
    if exp.checkpoint_dir is None:
        return None
    record: dict[str, str] = {}
    if isinstance(exp.identity, (str, Path)) or exp.identity is None:
        key_file = keys.researcher_key_file(exp.identity)
        if key_file.is_file():  # in simulation nothing signs: there may be no key
            record["identity"] = str(key_file.resolve())
    enrolled = _enrolled_file(exp.enrolled)
    if enrolled is not None and enrolled.is_file():
        record["enrolled"] = str(enrolled.resolve())
    folder = Path(exp.checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return write_atomic(folder / FILE, _HEADER + tomli_w.dumps(record))


def recall(folder: Path) -> dict[str, str]:
    """What ``run.toml`` of ``folder`` records (``{}`` when there is none), checked."""
    path = folder / FILE
    if not path.is_file():
        return {}
    try:
        record = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"Cannot read {path}: {exc}. Delete it and pass --identity "
                                 "KEY and --enrolled NODES_TOML.") from exc
    found: dict[str, str] = {}
    for key, flag in (("identity", "--identity KEY"), ("enrolled", "--enrolled NODES_TOML")):
        value = record.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ConfigurationError(f"{path}: {key} should be a file path. Received: "
                                     f"{value!r}. Fix it or pass {flag}.")
        if not Path(value).is_file():  # a missing key file would be created anew: refuse
            raise ConfigurationError(
                f"{path} records the {key} file {value}, which is gone. Put it back, or "
                f"pass {flag}.")
        found[key] = value
    return found
