"""The policy page's form: one field per setting, typed as a data manager would type it.

Each setting of :data:`fedcore.governance.SETTINGS` becomes one field whose widget follows
its type (a yes/no choice, a list of choices, a number, lines of ``name: values``). An empty
field means the default. What the form sends is parsed and checked field by field, so a
mistake is reported next to its own field; nothing is saved unless every field is right.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedcore.errors import ConfigurationError
from fedcore.governance import SETTINGS
from fedcore.governance.policies import parse_setting, validate_policy

__all__ = ["Field", "fields", "parse_form"]

_LINES = {"access", "budget", "digests"}  # settings typed as lines in a text area
_SPLIT = re.compile(r"[,\s]+")


@dataclass(frozen=True)
class Field:
    """One setting as the form shows it."""

    key: str
    type: str
    widget: str  # "yesno", "select", "number", "lines"
    text: str  # the value as typed in the field ("" = the default)
    default: str  # the default, in words
    help: str
    example: str
    choices: tuple[str, ...] = ()
    error: str = ""


def fields(policy: Mapping[str, Any], *, typed: Mapping[str, str] | None = None,
           errors: Mapping[str, str] | None = None) -> list[Field]:
    """The form's fields for the settings written in ``policy`` (or as ``typed``)."""
    out = []
    for key, s in SETTINGS.items():
        text = typed[key] if typed is not None and key in typed else _text(s.type,
                                                                        policy.get(key))
        widget = ("yesno" if s.type == "bool" else "select" if s.type == "choice"
                  else "lines" if s.type in _LINES else "number")
        out.append(Field(key=key, type=s.type, widget=widget, text=text,
                         default=_default(s.type, s.default), help=s.help,
                         example=_EXAMPLES.get(s.type, ""), choices=s.choices,
                         error=(errors or {}).get(key, "")))
    return out


def parse_form(form: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``(values, errors)`` from the submitted fields: ``None`` values restore defaults.

    ``errors`` maps a setting to what is wrong with its field, in words that say how to fix
    it; the values are then not to be saved.
    """
    values: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for key, s in SETTINGS.items():
        text = str(form.get(key, "")).strip()
        try:
            value = _parse(key, s.type, text)
            if value is not None:
                validate_policy({key: value})
        except ConfigurationError as exc:
            errors[key] = str(exc)
            continue
        values[key] = value
    if not errors:
        try:  # checks across fields (batch_size_min <= batch_size_max)
            validate_policy({k: v for k, v in values.items() if v is not None})
        except ConfigurationError as exc:
            errors[next((k for k in SETTINGS if k in str(exc)), "")] = str(exc)
    return values, errors


def _parse(key: str, kind: str, text: str) -> Any:
    if not text:
        return None
    if kind == "access":
        return _table(key, text, "'RESEARCHER: DATASET, DATASET' (\"*\" for anyone), e.g. "
                      "'alice: diabetes-2024'",
                      lambda names: [d for d in _SPLIT.split(names) if d])
    if kind == "budget":
        if ":" not in text and "\n" not in text:
            return _number(key, text)
        return _table(key, text, "'DATASET: EPSILON' (\"*\" for the others), e.g. "
                      "'diabetes-2024: 3'", lambda value: _number(key, value))
    if kind == "digests":
        return [d for d in _SPLIT.split(text) if d]
    if kind in ("int", "number", "fraction"):
        return _number(key, text)
    return parse_setting(key, text)


def _table(key: str, text: str, expected: str, value: Any) -> dict[str, Any]:
    """Lines of ``NAME: VALUE`` as a table (the values checked by the setting)."""
    table: dict[str, Any] = {}
    for n, line in _lines(text):
        name, sep, rest = line.partition(":")
        if not sep or not name.strip():
            raise ConfigurationError(
                f"{key}, line {n}: expected {expected}. Received: {line!r}")
        table[name.strip()] = value(rest.strip())
    return table


def _number(key: str, text: str) -> int | float | str:
    try:
        number = float(text)
    except ValueError:
        return text  # the setting's own check says what it expects
    return int(number) if re.fullmatch(r"[+-]?\d+", text) else number


def _lines(text: str) -> list[tuple[int, str]]:
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _text(kind: str, value: Any) -> str:
    """A setting's value as typed in its field."""
    if value is None:
        return ""
    if kind == "bool":
        return "true" if value else "false"
    if kind == "access":
        return "\n".join(f"{who}: {', '.join(names)}" for who, names in value.items())
    if kind == "budget" and isinstance(value, Mapping):
        return "\n".join(f"{name}: {eps:g}" for name, eps in value.items())
    if kind == "digests":
        return "\n".join(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _default(kind: str, value: Any) -> str:
    if value is None:
        return "no limit" if kind not in _LINES else "none"
    return _text(kind, value) or "none"


_EXAMPLES = {
    "access": "one line per researcher, e.g. alice: diabetes-2024, cohort-b (* for anyone)",
    "budget": "a number for every dataset, or lines such as diabetes-2024: 3 and *: 8",
    "digests": "one SHA-256 digest per line (fedcore-node secagg jl-modulus prints them)",
    "fraction": "a number between 0 and 1, e.g. 1e-5",
}
