"""Typed, versioned message bodies and the envelope that routes them.

Every body is a frozen dataclass registered under a stable type tag. Changes are additive:
a decoder ignores fields it does not know and fills missing optional ones with defaults, so
an older peer can read a newer peer's message. Nothing here names a Python class on the wire:
the tag is looked up in this module's own registry.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import operator
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from fedcore.errors import ProtocolError
from fedcore.params import ParameterSet

__all__ = [
    "PROTOCOL_VERSION",
    "Body",
    "Checkpoint",
    "Envelope",
    "ErrorReply",
    "Ping",
    "PlanStatus",
    "PlanStatusRequest",
    "PlanSubmit",
    "Pong",
    "SearchReply",
    "SecaggReply",
    "SecaggRequest",
    "SearchRequest",
    "StatsReply",
    "StatsRequest",
    "TrainProgress",
    "TrainReply",
    "TrainRequest",
    "assemble",
    "body_type",
    "message_types",
    "rebuild",
    "recipe",
]

PROTOCOL_VERSION = 1

_REGISTRY: dict[str, type[Body]] = {}
_B = TypeVar("_B", bound="type[Body]")


def message(tag: str) -> typing.Callable[[_B], _B]:
    """Register a frozen dataclass as a message body under ``tag`` (a stable wire name)."""

    def register(cls: _B) -> _B:
        if tag in _REGISTRY:
            raise ValueError(f"Message tag {tag!r} is already used by {_REGISTRY[tag].__name__}")
        cls.TAG = tag
        _REGISTRY[tag] = cls
        return cls

    return register


def body_type(tag: str) -> type[Body]:
    """The body class registered under ``tag``; ``ProtocolError`` when there is none."""
    try:
        return _REGISTRY[tag]
    except KeyError:
        raise ProtocolError(
            f"Unknown message type {tag!r}. Known types: {sorted(_REGISTRY)}. "
            "The peer may run a newer fedcore: upgrade this side."
        ) from None


def message_types() -> dict[str, type[Body]]:
    """Every registered message type, by tag."""
    return dict(_REGISTRY)


@dataclass(frozen=True)
class Body:
    """Base of every message body."""

    TAG: ClassVar[str] = ""
    #: Whether a sender sends bodies of this type byte for byte again and again (a node gets
    #: the same training request every round): the decoder then remembers which bodies'
    #: bytes passed :meth:`from_wire`'s checks (see :func:`fedcore.wire.codec.decode`). Only
    #: for types that keep :meth:`from_wire` as it is here.
    REPEATS: ClassVar[bool] = False

    def to_wire(self) -> dict[str, Any]:
        """The body's fields as a dict (arrays and ParameterSets stay as they are)."""
        return {name: getattr(self, name) for name in _names(type(self))}

    @classmethod
    def from_wire(cls, data: Any) -> Body:
        """Build the body from decoded fields, checking the types of known fields."""
        if not isinstance(data, dict):
            raise ProtocolError(f"{cls.TAG} body must be a map. Received: {type(data).__name__}")
        names, checks = _checks(cls)
        # As every sender writes it: each field, in order, and nothing else. All checks in
        # one pass; a failing one is named by the loop below.
        if tuple(data) == names and all(map(operator.call, checks, data.values())):
            return assemble(cls, data)
        values: dict[str, Any] = {}
        get = data.get
        for name, required, expected, check, default in _fields(cls):
            value = get(name, _MISSING)
            if value is _MISSING:
                if required:
                    raise ProtocolError(f"{cls.TAG} body lacks the required field {name!r}.")
                values[name] = default()
                continue
            if not check(value):
                raise ProtocolError(
                    f"{cls.TAG}.{name} must be {_type_name(expected)}. "
                    f"Received: {type(value).__name__}"
                )
            values[name] = value
        return assemble(cls, values)


#: How :meth:`Body.from_wire` filled a body's fields from a map it accepted: ``None`` when
#: the map names exactly the fields, in order (the map is the fields); else one entry per
#: field, ``None`` where the map has it, the maker of its default where it lacks it.
Recipe = tuple[Callable[[], Any] | None, ...] | None


def recipe(cls: type[Body], data: dict[str, Any]) -> Recipe:
    """How :meth:`Body.from_wire` of ``cls`` filled the fields from ``data`` (which it accepted).

    :func:`rebuild` then builds the same body from a map that decoded from the same bytes,
    with no check: every check's answer depends on the types of the map's values only.
    """
    names = _names(cls)
    if tuple(data) == names:
        return None
    return tuple(None if name in data else default
                 for name, _, _, _, default in _fields(cls))


def rebuild(cls: type[Body], data: dict[str, Any], how: Recipe) -> Body:
    """The body :meth:`Body.from_wire` makes of ``data``, which decoded from bytes it accepted.

    ``how`` is what :func:`recipe` told of those bytes' map: ``data`` is a new map of the same
    keys and the same types of values (new containers, arrays of the frame at hand).
    """
    if how is None:
        return assemble(cls, data)
    return assemble(cls, {name: data[name] if make is None else make()
                          for name, make in zip(_names(cls), how, strict=True)})


def assemble(cls: type[_D], values: dict[str, Any]) -> _D:
    """``cls(**values)``, for a dataclass (a body, an envelope) and every one of its fields.

    A frozen dataclass sets each field through ``object.__setattr__``; one without a
    ``__post_init__`` (where nothing runs but those assignments) gets its fields in one
    update of its ``__dict__`` instead: the same object, ~1.5 us sooner for a reply of 14
    fields. ``values`` must name every field, in order, and nothing else.
    """
    plain = _PLAIN.get(cls)
    if plain is None:
        plain = _PLAIN[cls] = not hasattr(cls, "__post_init__") and not hasattr(
            cls, "__slots__") and all(f.init for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    if not plain:
        return cls(**values)
    built = object.__new__(cls)
    built.__dict__.update(values)
    return built


#: Whether each class is built by :func:`assemble`'s update of its ``__dict__``.
_PLAIN: dict[type, bool] = {}
_D = TypeVar("_D")


_MISSING = object()  # a field the body does not have
_FIELDS: dict[type, list[tuple[str, bool, Any, Callable[[Any], bool], Callable[[], Any]]]] = {}
_NAMES: dict[type, tuple[str, ...]] = {}


def _names(cls: type) -> tuple[str, ...]:
    """The field names of a body class, in order (read once per class)."""
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def _fields(cls: type) -> list[tuple[str, bool, Any, Callable[[Any], bool], Callable[[], Any]]]:
    """Each field of a body class: name, whether required, its type, its checker, default.

    The default is what makes it: its ``default_factory``, or a function returning it.
    """
    spec = _FIELDS.get(cls)
    if spec is None:
        hints = _hints(cls)
        spec = _FIELDS[cls] = [
            (f.name, f.default is dataclasses.MISSING
             and f.default_factory is dataclasses.MISSING, hints[f.name],
             _checker(hints[f.name]), _default_maker(f)) for f in dataclasses.fields(cls)]
    return spec


_CHECKS: dict[type, tuple[tuple[str, ...], tuple[Callable[[Any], bool], ...]]] = {}


def _checks(cls: type) -> tuple[tuple[str, ...], tuple[Callable[[Any], bool], ...]]:
    """The field names of a body class and the checker of each, in order."""
    found = _CHECKS.get(cls)
    if found is None:
        found = _CHECKS[cls] = (_names(cls), tuple(spec[3] for spec in _fields(cls)))
    return found


def _default_maker(f: dataclasses.Field[Any]) -> Callable[[], Any]:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory
    return functools.partial(_same, f.default)


def _same(value: Any) -> Any:
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _matches(value: Any, expected: Any) -> bool:
    return _checker(expected)(value)


_CHECKERS: dict[Any, Callable[[Any], bool]] = {}


def _checker(expected: Any) -> Callable[[Any], bool]:
    """A function telling whether a decoded value is of the type ``expected``.

    Built once per type: every frame's fields are checked with it.
    """
    try:
        return _CHECKERS[expected]
    except KeyError:
        pass
    except TypeError:  # an unhashable annotation: built each time
        return _build_checker(expected)
    check = _CHECKERS[expected] = _build_checker(expected)
    return check


def _build_checker(expected: Any) -> Callable[[Any], bool]:
    origin = typing.get_origin(expected)
    if origin is typing.Union or origin is types.UnionType:
        options = [_checker(arg) for arg in typing.get_args(expected)]
        return lambda value: any(check(value) for check in options)
    if expected is Any:
        return lambda value: True
    if expected is type(None):
        return lambda value: value is None
    base = origin or expected
    if base is float:
        return lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return lambda value: isinstance(value, int) and not isinstance(value, bool)
    args = typing.get_args(expected)
    if base is list:  # the elements too: a handler may hash or sort them
        if not args:
            return lambda value: isinstance(value, (list, tuple))
        if args[0] is str:  # isinstance per element in C, no frame
            return lambda value: isinstance(value, (list, tuple)) and all(
                map(isinstance, value, _REPEAT_STR))
        item = _item_checker(args[0])
        return lambda value: isinstance(value, (list, tuple)) and all(map(item, value))
    if base is dict:
        if not args:
            return lambda value: isinstance(value, dict)
        # Keys, then values, each in one C-level pass (the checks have no side effects):
        # no generator frame per item on every frame of every node; str keys by
        # isinstance itself (no frame per key either).
        key = _item_checker(args[0]) if args[0] is not str else None
        val = _item_checker(args[1])
        if key is None and args[1] is Any:
            return lambda value: isinstance(value, dict) and all(
                map(isinstance, value, _REPEAT_STR))
        if key is None and args[1] is float:  # numbers: their exact types first, in C
            return lambda value: isinstance(value, dict) and all(
                map(isinstance, value, _REPEAT_STR)) and (
                _NUMBERS.issuperset(map(type, value.values()))
                or all(map(val, value.values())))
        if key is None:
            return lambda value: isinstance(value, dict) and all(
                map(isinstance, value, _REPEAT_STR)) and all(map(val, value.values()))
        if args[1] is Any:  # the values need no check: the keys only
            return lambda value: isinstance(value, dict) and all(map(key, value))
        return lambda value: isinstance(value, dict) and all(map(key, value)) and all(
            map(val, value.values()))
    return lambda value: isinstance(value, base)


_REPEAT_STR = itertools.repeat(str)  # endless: map() stops with the checked container
#: The exact types a ``float`` element passes as (``bool`` is not one; a subclass of
#: ``int`` or ``float`` is checked as it always was).
_NUMBERS = frozenset({int, float, type(None)})


def _item_checker(expected: Any) -> Callable[[Any], bool]:
    """:func:`_checker` for an element of a container (a missing number may be None)."""
    if expected is Any:
        return lambda value: True
    if expected is float:  # one call per element, not two
        return lambda value: value is None or (
            isinstance(value, (int, float)) and not isinstance(value, bool))
    return _checker(expected)


def _type_name(expected: Any) -> str:
    return getattr(expected, "__name__", None) or str(expected)


def new_id() -> str:
    """A fresh message id: 128 random bits from the OS, as 32 hex digits.

    The same source and length as ``uuid.uuid4().hex`` (which fixes 6 of the bits) without
    building a ``UUID`` object: ~0.3 instead of ~2.7 us, twice per node and round.
    """
    return os.urandom(16).hex()


def new_ids(n: int) -> list[str]:
    """``n`` fresh message ids, as :func:`new_id` makes them, from one read of the OS source.

    One system call for a scatter's requests instead of one each (a thread that makes a
    system call lets go of the GIL, and may wait to take it back).
    """
    digits = os.urandom(16 * n).hex()
    return [digits[i:i + 32] for i in range(0, 32 * n, 32)]


@dataclass(frozen=True)
class Envelope:
    """Routing around a body: who sent it, to whom, for which experiment and round."""

    body: Body
    sender: str = ""
    recipient: str = ""
    experiment: str = ""
    round: int = 0
    id: str = field(default_factory=new_id)
    reply_to: str = ""
    version: int = PROTOCOL_VERSION

    @property
    def tag(self) -> str:
        """The body's wire type tag."""
        return self.body.TAG

    def reply(self, body: Body, *, sender: str = "") -> Envelope:
        """An envelope answering this one: routing reversed, ``reply_to`` set."""
        return Envelope(
            body=body,
            sender=sender or self.recipient,
            recipient=self.sender,
            experiment=self.experiment,
            round=self.round,
            reply_to=self.id,
        )


# --- bodies ---------------------------------------------------------------------------------


@message("ping")
@dataclass(frozen=True)
class Ping(Body):
    """Liveness probe; a node answers with :class:`Pong`."""


@message("pong")
@dataclass(frozen=True)
class Pong(Body):
    """A node's identity and capabilities."""

    node_id: str
    name: str = ""
    fedcore_version: str = ""
    backends: list[str] = field(default_factory=list)


@message("search")
@dataclass(frozen=True)
class SearchRequest(Body):
    """Ask which datasets carry all of these tags."""

    tags: list[str]


@message("search-reply")
@dataclass(frozen=True)
class SearchReply(Body):
    """Matching datasets (metadata only, never a path) and every tag the node holds."""

    node_id: str
    datasets: list[dict[str, Any]] = field(default_factory=list)
    available_tags: list[str] = field(default_factory=list)


@message("train")
@dataclass(frozen=True)
class TrainRequest(Body):
    """Run one round of training of a shipped plan on one dataset."""

    REPEATS = True  # the researcher's BatchEncoder makes a node's body the same every round

    plan: dict[str, Any]
    params: ParameterSet
    dataset_id: str
    model_args: dict[str, Any] = field(default_factory=dict)
    training_args: dict[str, Any] = field(default_factory=dict)
    data_info: dict[str, Any] = field(default_factory=dict)
    test_ratio: float = 0.0
    seed: int = 0
    evaluate_global: bool = True
    evaluate_local: bool = True
    #: Options for the node's side of the aggregation algorithm (``Aggregator.round_options``:
    #: ``{"name": "fedprox", "mu": 0.01}``...); empty for plain FedAvg.
    algorithm: dict[str, Any] = field(default_factory=dict)
    #: Differential privacy the researcher asks for (``{"mechanism": "update", "clip": 1.0,
    #: "noise_multiplier": 1.1, "delta": 1e-5}``...); empty: none. Node policy may require it.
    privacy: dict[str, Any] = field(default_factory=dict)
    #: The secure-aggregation scheme and this round's session options; empty: plain sums.
    secagg: dict[str, Any] = field(default_factory=dict)
    #: Fine-tune after federation: train ``params`` further on this node only, keep the
    #: result on the node, evaluate it on the node's test split, and reply with ``params``
    #: unchanged.
    fine_tune: bool = False
    #: A fitted transform the node applies to its tabular dataset before splitting,
    #: training and evaluating (``Preprocessing.to_wire()``: numbers and categories only).
    preprocessing: dict[str, Any] = field(default_factory=dict)


@message("train-reply")
@dataclass(frozen=True)
class TrainReply(Body):
    """A node's local update with what the researcher needs to weigh and judge it."""

    params: ParameterSet
    n_samples: int
    n_test: int = 0
    metrics_global: dict[str, float] = field(default_factory=dict)
    metrics_local: dict[str, float] = field(default_factory=dict)
    train_stats: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    #: Training arguments the node's policy imposed (e.g. ``{"epochs": 5}``), and why.
    overrides: dict[str, Any] = field(default_factory=dict)
    policy_notes: list[str] = field(default_factory=list)
    #: What the node's side of the algorithm returns besides ``params`` (e.g. SCAFFOLD's
    #: control-variate delta), handed to ``Aggregator.add``.
    extras: dict[str, Any] = field(default_factory=dict)
    #: What differential privacy cost on this node: mechanism, parameters, epsilon spent
    #: this round and in total for the dataset, delta.
    privacy: dict[str, Any] = field(default_factory=dict)
    #: The protected update when the round uses secure aggregation (``params`` is empty
    #: then): the payload of :meth:`fedcore.secagg.NodeSession.protect`.
    secagg: dict[str, Any] = field(default_factory=dict)


@message("train-progress")
@dataclass(frozen=True)
class TrainProgress(Body):
    """Sent by a node while it trains (``reply_to`` = the training request), at most ~1/s.

    ``loss`` is the mean training loss since the previous report (``None`` when the plan
    reports none); ``fraction`` the share of the local work done, when known.
    """

    step: int
    epoch: int = 0
    loss: float | None = None
    samples: int = 0
    elapsed_s: float = 0.0
    fraction: float | None = None


@message("secagg")
@dataclass(frozen=True)
class SecaggRequest(Body):
    """One exchange of a secure-aggregation round (``phase``: setup, share_keys, unmask)."""

    phase: str
    payload: dict[str, Any]


@message("secagg-reply")
@dataclass(frozen=True)
class SecaggReply(Body):
    """A node's answer to a :class:`SecaggRequest`."""

    payload: dict[str, Any]


@message("error")
@dataclass(frozen=True)
class ErrorReply(Body):
    """A request failed on the node; ``kind`` says whose fault and what can be done.

    Kinds: ``protocol`` (bad frame), ``governance`` (refused), ``plan`` (the plan raised),
    ``dataset`` (missing or unavailable), ``internal`` (a node bug).
    """

    kind: str
    message: str
    exc_type: str = ""
    traceback: str = ""


@message("checkpoint")
@dataclass(frozen=True)
class Checkpoint(Body):
    """An experiment saved to disk (same codec as the wire: no pickle)."""

    state: dict[str, Any]
    params: ParameterSet | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    aggregator_state: dict[str, Any] = field(default_factory=dict)


@message("stats")
@dataclass(frozen=True)
class StatsRequest(Body):
    """Ask for statistics of one dataset's variables (see :mod:`fedcore.researcher.statistics`).

    Each query is a map: ``variable`` (a column of a table, a modality of a medical folder,
    ``"intensity"`` for an image folder), ``shift`` (a float: sums are of ``x - shift``),
    ``min_max`` (bool: also the extremes, where the node's policy allows), ``edges``
    (float64 histogram bin edges, or None for no histogram) and ``bounds`` (``[low, high]``:
    under differential privacy values are clipped to them; default the edges' range).
    """

    dataset_id: str
    queries: list[dict[str, Any]]
    #: Under secure aggregation: the session's protection options (``SecureRound.options``)
    #: and ``split``, the power of two at which sums are cut in two exact parts
    #: (:func:`fedcore.node.statistics.protect_statistics`); empty: replies in clear.
    secagg: dict[str, Any] = field(default_factory=dict)
    #: ``{"mechanism": "gaussian"}`` asks for differentially private answers (the node sets
    #: the noise and charges the dataset's privacy budget); empty: exact answers.
    privacy: dict[str, Any] = field(default_factory=dict)


@message("stats-reply")
@dataclass(frozen=True)
class StatsReply(Body):
    """One result per query, in order, under the node's minimum count per cell.

    A result's ``additive`` map holds only sums (counts, sums and sums of squares of the
    shifted values, histogram counts), so replies of several nodes add up to the pooled
    statistics: a sum-only secure aggregation can combine them. Cells the node withheld are
    zero there and counted (never located) in ``withheld``; ``min`` and ``max`` are None
    unless shared.
    """

    node_id: str
    results: list[dict[str, Any]]
    min_count: int = 0
    #: Under secure aggregation: the protected payload of the additive statistics; then
    #: ``results`` is empty (nothing of one node travels in clear).
    secagg: dict[str, Any] = field(default_factory=dict)
    #: Under differential privacy: ``mechanism``, ``noise_multiplier``, ``steps`` (Gaussian
    #: releases charged), ``epsilon`` and ``delta`` (the dataset's total spent, after it).
    privacy: dict[str, Any] = field(default_factory=dict)


@message("plan-submit")
@dataclass(frozen=True)
class PlanSubmit(Body):
    """Submit a training plan (a bundle's wire form) for review; answered by PlanStatus."""

    plan: dict[str, Any]
    message: str = ""


@message("plan-status")
@dataclass(frozen=True)
class PlanStatusRequest(Body):
    """Ask where a plan (by SHA-256) stands in a node's review; answered by PlanStatus."""

    plan_hash: str


@message("plan-status-reply")
@dataclass(frozen=True)
class PlanStatus(Body):
    """A plan's review on one node: ``approved``, ``pending``, ``rejected`` or ``unknown``.

    ``note`` is the administrator's (the reason of a rejection); ``approval_required``
    tells whether the node runs unapproved plans at all.
    """

    node_id: str
    plan_hash: str
    status: str
    note: str = ""
    approval_required: bool = True
    submitted_at: float | None = None
    reviewed_at: float | None = None
