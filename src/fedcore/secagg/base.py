"""The SecureAggregation interface, its session objects, and the identity scheme.

A scheme is configured by its constructor (:meth:`SecureAggregation.get_params`). Each round
it opens a :class:`ResearcherSession` on the researcher and, from the first message the
researcher sends, a :class:`NodeSession` on every node (:func:`open_node_session` resolves
the scheme by name through the ``fedcore.secagg`` registry). Sessions hold the state between
phases; every phase takes and returns plain, msgpack-safe data (dicts of bytes, ints, floats,
str, lists, numpy arrays, ParameterSets) and does no I/O, so any transport can carry them.

A round, from the researcher's side (an empty dict of requests means: skip that exchange)::

    s = scheme.researcher_session(round, nodes, weights_hint=..., reference=global_params)
    for node, msg in s.setup_requests().items():       # node: open_node_session(node, msg)
        s.add_setup(node, <node's session.answer("setup", msg)>)
    for node, msg in s.share_requests().items():
        s.add_shares(node, <session.answer("share_keys", msg)>)
    for node in s.participants:                        # with the training request
        options = s.train_options(node)                # node: session.protect(update, w, options)
        s.add_protected(node, <payload>)
    for node, msg in s.unmask_requests().items():
        s.add_unmask(node, <session.answer("unmask", msg)>)
    sums, total_weight, extras_sums, report = s.unprotect_sum()
"""

from __future__ import annotations

import abc
import inspect
import math
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, NamedTuple

import numpy as np

from fedcore.errors import ConfigurationError, ProtocolError, SecureAggregationError
from fedcore.params import ParameterSet
from fedcore.secagg.context import NodeContext

__all__ = ["PHASES", "NodeSession", "PlainAggregation", "ResearcherSession",
           "SecureAggregation", "SecureSum", "open_node_session"]

#: Exchanges a node may be asked to answer (besides ``protect``, which runs with training).
PHASES = ("setup", "share_keys", "unmask")


class SecureSum(NamedTuple):
    """What :meth:`ResearcherSession.unprotect_sum` returns (a tuple: unpack it)."""

    sums: ParameterSet
    total_weight: float
    extras: dict[str, ParameterSet]
    report: dict[str, Any]


class SecureAggregation(abc.ABC):
    """A way to let the researcher learn only the weighted sum of the nodes' updates.

    ``tolerates_dropout`` says whether the sum survives nodes that drop out after the setup.
    """

    name: ClassVar[str] = ""
    tolerates_dropout: ClassVar[bool] = False
    #: Whether a node's session opens with a ``setup`` exchange. A node protects an update
    #: only with a session it set up itself; schemes without a setup (the identity) open
    #: theirs with the training request.
    has_setup: ClassVar[bool] = True

    def get_params(self) -> dict[str, Any]:
        """Constructor arguments, for inspection, cloning and checkpoints."""
        sig = inspect.signature(type(self).__init__)
        return {k: getattr(self, k) for k in sig.parameters if k != "self" and hasattr(self, k)}

    def wire_params(self) -> dict[str, Any]:
        """The constructor arguments a node rebuilds the scheme from (msgpack-safe)."""
        return self.get_params()

    @abc.abstractmethod
    def researcher_session(self, round: int, nodes: Sequence[str],
                           weights_hint: Mapping[str, float] | None = None,
                           reference: ParameterSet | None = None) -> ResearcherSession:
        """Open the researcher's side of one round among ``nodes``.

        ``weights_hint`` (node -> expected weight, e.g. sample counts from the search) sets the
        largest weight the fixed-point encoding must hold; ``reference`` (the current global
        model) sets the clipping range when the scheme has none, and the expected layout.
        """

    @abc.abstractmethod
    def node_session(self, node_id: str, options: Mapping[str, Any],
                     context: NodeContext | None = None) -> NodeSession:
        """Open a node's side of the round described by the researcher's first message.

        ``context`` holds the node's floors, identity key and peer list (default: the safe
        floors, a key made for the session, no peer list).
        """

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


def scheme_of(value: str | SecureAggregation | None) -> SecureAggregation | None:
    """What a researcher passes as ``secagg=``: a scheme, its registered name, or ``None``.

    ``ConfigurationError`` for anything else (an unknown name: the registry says which exist).
    """
    from fedcore import plugins  # lazy: plugins imports nothing of ours at module load

    if isinstance(value, str):
        value = plugins.load("secagg", value)()
    if value is not None and not isinstance(value, SecureAggregation):
        raise ConfigurationError(
            "Expected a fedcore.secagg scheme or its name ('masking', 'joye-libert'), or "
            f"None. Received: secagg={value!r}")
    return value


def open_node_session(node_id: str, options: Mapping[str, Any],
                      context: NodeContext | None = None) -> NodeSession:
    """A node's session from the first secure-aggregation message of a round.

    The scheme is looked up by ``options["scheme"]`` in the ``fedcore.secagg`` registry and
    built from ``options["params"]``; anything malformed, or below the node's floors in
    ``context``, raises ``ProtocolError``.
    """
    from fedcore import plugins  # lazy: plugins imports nothing of ours at module load

    name = _field(options, "scheme", str, "secure-aggregation options")
    params = _field(options, "params", dict, "secure-aggregation options")
    try:
        cls = plugins.load("secagg", name)
        scheme = cls(**params)
    except (TypeError, ConfigurationError) as exc:
        raise ProtocolError(f"Cannot build the secure-aggregation scheme {name!r} from the "
                            f"researcher's options: {exc}") from exc
    if not isinstance(scheme, SecureAggregation):
        raise ProtocolError(f"{name!r} is not a secure-aggregation scheme.")
    try:
        return scheme.node_session(node_id, options, context)
    except ConfigurationError as exc:  # parameters this node does not accept
        raise ProtocolError(str(exc)) from exc


def _field(msg: Any, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """``msg[key]``, checked to be of ``kind``; ``ProtocolError`` naming it otherwise."""
    if not isinstance(msg, Mapping):
        raise ProtocolError(f"Expected the {what} as a map. Received {type(msg).__name__}.")
    if key not in msg:
        raise ProtocolError(f"The {what} lacks the field {key!r}.")
    value = msg[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ProtocolError(f"Expected {what}[{key!r}] to be {name}. "
                            f"Received {type(value).__name__}.")
    return value


def _node_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(n, str) for n in value):
        raise ProtocolError(f"Expected {what} as a list of node ids. Received {value!r}.")
    return list(value)


class ResearcherSession(abc.ABC):
    """The researcher's side of one round; its methods are the phases, in order."""

    def __init__(self, scheme: SecureAggregation, round: int, nodes: Sequence[str]):
        nodes = list(nodes)
        if not nodes or not all(isinstance(n, str) and n for n in nodes):
            raise ConfigurationError(f"Expected a non-empty list of node ids. Received {nodes!r}.")
        if len(set(nodes)) != len(nodes):
            raise ConfigurationError(f"Node ids must be unique. Received {nodes!r}.")
        self.scheme = scheme
        self.round = int(round)
        self.nodes: list[str] = sorted(nodes)
        self.session_id = secrets.token_hex(16)
        self.timings: dict[str, float] = {}

    def header(self) -> dict[str, Any]:
        """Fields every message of this session carries."""
        return {"scheme": self.scheme.name, "session": self.session_id, "round": self.round}

    def opening(self) -> dict[str, Any]:
        """What a node needs to open its session: the header, the scheme's parameters, nodes."""
        return {**self.header(), "params": self.scheme.wire_params(), "nodes": self.nodes}

    @property
    @abc.abstractmethod
    def participants(self) -> list[str]:
        """The nodes that must train and protect their update (after the setup exchanges)."""

    def setup_requests(self) -> dict[str, dict[str, Any]]:
        """Phase 1: node -> setup message (each node answers with its public keys)."""
        return {}

    def add_setup(self, node: str, reply: Mapping[str, Any]) -> None:
        """Record a node's answer to the setup message."""
        raise ProtocolError(f"The {self.scheme.name!r} scheme has no setup phase.")

    def share_requests(self) -> dict[str, dict[str, Any]]:
        """Phase 2: node -> message with every node's public keys (answered with shares)."""
        return {}

    def add_shares(self, node: str, reply: Mapping[str, Any]) -> None:
        """Record a node's encrypted shares, to be relayed to their recipients."""
        raise ProtocolError(f"The {self.scheme.name!r} scheme has no share phase.")

    @abc.abstractmethod
    def train_options(self, node: str) -> dict[str, Any]:
        """Phase 3: what ``node`` needs to protect its update (sent with its training request)."""

    @abc.abstractmethod
    def add_protected(self, node: str, payload: Mapping[str, Any]) -> None:
        """Fold one node's protected payload in (streamed: memory O(model))."""

    def unmask_requests(self) -> dict[str, dict[str, Any]]:
        """Phase 4: node -> unmask message, for the nodes whose payload arrived."""
        return {}

    def add_unmask(self, node: str, reply: Mapping[str, Any]) -> None:
        """Record a node's answer to the unmask message."""
        raise ProtocolError(f"The {self.scheme.name!r} scheme has no unmask phase.")

    @abc.abstractmethod
    def unprotect_sum(self) -> SecureSum:
        """Phase 5: sums = sum of weight_i * update_i (float64), total weight, extras, report.

        Raises :class:`SecureAggregationError` when the scheme cannot produce the sum; it
        never returns a wrong one.
        """

    @contextmanager
    def _timed(self, key: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start

    def _check_message(self, node: str, msg: Any, among: Sequence[str], what: str) -> None:
        if node not in among:
            raise ProtocolError(f"Expected a {what} from one of {sorted(among)}. "
                                f"Received one from {node!r}.")
        if _field(msg, "session", str, what) != self.session_id:
            raise ProtocolError(f"The {what} from {node!r} belongs to session "
                                f"{msg['session']!r}, not to this round's ({self.session_id}).")


class NodeSession(abc.ABC):
    """A node's side of one round; :meth:`answer` runs the phase a researcher asks for."""

    def __init__(self, scheme: SecureAggregation, node_id: str, options: Mapping[str, Any],
                 context: NodeContext | None = None):
        self.scheme = scheme
        self.node_id = node_id
        #: The node's floors, identity key and peer list for this session.
        self.context = context or NodeContext()
        self.session_id: str = _field(options, "session", str, "secure-aggregation options")
        self.round: int = _field(options, "round", int, "secure-aggregation options")

    @property
    def ready(self) -> bool:
        """Whether the setup exchanges are done and :meth:`protect` can run."""
        return True

    def _round_nodes(self, options: Mapping[str, Any]) -> list[str]:
        """The round's nodes from a setup message, sorted and checked against the floors.

        ``ProtocolError`` without this node, with fewer members than the node accepts, or
        (with a peer list) with members the node does not know.
        """
        nodes = sorted(_node_list(_field(options, "nodes", list, "setup message"),
                                  "the round's nodes"))
        if len(set(nodes)) != len(nodes):
            raise ProtocolError(f"The round's nodes must be distinct. Received {nodes}.")
        if self.node_id not in nodes:
            raise ProtocolError(f"This node ({self.node_id!r}) is not among the round's nodes "
                                f"{nodes}.")
        self.context.check_members(self.node_id, nodes)
        return nodes

    def answer(self, phase: str, msg: Mapping[str, Any]) -> dict[str, Any]:
        """Run ``phase`` (one of :data:`PHASES`) on the researcher's message."""
        if phase not in PHASES:
            raise ProtocolError(f"Unknown secure-aggregation phase {phase!r}. "
                                f"Expected one of {PHASES}.")
        self._check_session(msg, phase)
        result: dict[str, Any] = getattr(self, phase)(msg)
        return result

    def setup(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        """Phase 1: generate this round's key pairs; return the public keys."""
        raise ProtocolError(f"The {self.scheme.name!r} scheme has no setup phase.")

    def share_keys(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        """Phase 2: from every node's public keys, return encrypted shares for each."""
        raise ProtocolError(f"The {self.scheme.name!r} scheme has no share phase.")

    @abc.abstractmethod
    def protect(self, update: ParameterSet, weight: float, options: Mapping[str, Any],
                extras: Mapping[str, ParameterSet] | None = None) -> dict[str, Any]:
        """Phase 3: the payload that hides ``weight * update`` (and extras) from the researcher."""

    def prepare(self, options: Mapping[str, Any], reference: ParameterSet | None = None) -> None:
        """Start, in the background, what :meth:`protect` will need, while the node trains.

        ``options`` are the training options ``protect`` will receive, ``reference`` the
        global model the update is shaped like. It never raises: ``protect`` reports bad
        options. ``protect`` uses the result or, without one, does the work itself, with the
        same payload either way. Default: nothing to prepare.
        """
        return None

    def discard(self) -> None:
        """Drop what :meth:`prepare` made and :meth:`protect` has not used (default: none)."""
        return None

    def unmask(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        """Phase 4: the shares the researcher needs to remove the masks."""
        raise ProtocolError(f"The {self.scheme.name!r} scheme has no unmask phase.")

    def _check_session(self, msg: Any, what: str) -> None:
        got = _field(msg, "session", str, f"{what} message")
        if got != self.session_id:
            raise ProtocolError(f"The {what} message belongs to session {got!r}; this node's "
                                f"session for round {self.round} is {self.session_id!r}.")

    def _reply(self, **fields: Any) -> dict[str, Any]:
        return {"session": self.session_id, "node": self.node_id, **fields}


def _check_weight(weight: Any) -> float:
    if not (isinstance(weight, (int, float, np.number)) and not isinstance(weight, bool)
            and math.isfinite(weight) and weight > 0):
        raise ConfigurationError(f"Expected a positive, finite weight. Received {weight!r}.")
    return float(weight)


def _check_parameter_sets(extras: Any, what: str) -> dict[str, ParameterSet]:
    if extras is None:
        return {}
    if not isinstance(extras, Mapping) or not all(
            isinstance(k, str) and isinstance(v, ParameterSet) for k, v in extras.items()):
        raise ConfigurationError(f"Expected {what} as a dict of name -> ParameterSet. "
                                 f"Received {type(extras).__name__}.")
    return dict(extras)


class PlainAggregation(SecureAggregation):
    """The identity scheme: each node's update travels in clear; the researcher sums it.

    Same interface as the secure schemes, so a round has one code path whatever the scheme.
    """

    name = "plain"
    tolerates_dropout = True
    has_setup = False

    def researcher_session(self, round: int, nodes: Sequence[str],
                           weights_hint: Mapping[str, float] | None = None,
                           reference: ParameterSet | None = None) -> ResearcherSession:
        """See :meth:`SecureAggregation.researcher_session`."""
        return _PlainResearcher(self, round, nodes, reference)

    def node_session(self, node_id: str, options: Mapping[str, Any],
                     context: NodeContext | None = None) -> NodeSession:
        """See :meth:`SecureAggregation.node_session`."""
        return _PlainNode(self, node_id, options, context)


class _PlainResearcher(ResearcherSession):
    def __init__(self, scheme: SecureAggregation, round: int, nodes: Sequence[str],
                 reference: ParameterSet | None):
        super().__init__(scheme, round, nodes)
        self._reference = reference
        self._sums: dict[str, np.ndarray] = {}
        self._extras: dict[str, dict[str, np.ndarray]] = {}
        self._weight = 0.0
        self._received: list[str] = []

    @property
    def participants(self) -> list[str]:
        return list(self.nodes)

    def train_options(self, node: str) -> dict[str, Any]:
        if node not in self.nodes:
            raise ConfigurationError(f"Expected one of this round's nodes {self.nodes}. "
                                     f"Received {node!r}.")
        return self.opening()

    def add_protected(self, node: str, payload: Mapping[str, Any]) -> None:
        self._check_message(node, payload, self.nodes, "protected update")
        if node in self._received:
            raise ProtocolError(f"Node {node!r} sent its update twice in one round.")
        params = _field(payload, "params", ParameterSet, "protected update")
        weight = _field(payload, "weight", (int, float), "protected update")
        try:
            weight = _check_weight(weight)
            extras = _check_parameter_sets(payload.get("extras") or None, "extras")
        except ConfigurationError as exc:
            raise ProtocolError(f"Update from {node!r}: {exc}") from exc
        with self._timed("add_protected_s"):
            reference = self._reference or (ParameterSet(self._sums) if self._sums else None)
            if reference is not None:
                try:
                    reference.check_layout(params, what=f"update from node {node!r}")
                except ValueError as exc:
                    raise ProtocolError(str(exc)) from exc
            if self._received and set(extras) != set(self._extras):
                raise ProtocolError(f"Update from {node!r} carries extras {sorted(extras)}; "
                                    f"expected {sorted(self._extras)} as the others.")
            for k, ps in extras.items():
                if k in self._extras:
                    try:
                        ParameterSet(self._extras[k]).check_layout(ps, what=f"extra {k!r}")
                    except ValueError as exc:
                        raise ProtocolError(f"Update from {node!r}: {exc}") from exc
            _accumulate(self._sums, params, weight)
            for k, ps in extras.items():
                _accumulate(self._extras.setdefault(k, {}), ps, weight)
            self._weight += weight
        self._received.append(node)

    def unprotect_sum(self) -> SecureSum:
        if not self._received:
            raise SecureAggregationError("No node's update arrived: nothing to sum.",
                                         failures={n: "no update" for n in self.nodes})
        report = {"scheme": self.scheme.name, "nodes": len(self._received),
                  "survivors": sorted(self._received),
                  "dropped": sorted(set(self.nodes) - set(self._received)),
                  "recovered": [], "clipped": {"params": 0, "extras": 0},
                  "step": {"params": 0.0, "extras": 0.0},
                  "error_bound": {"params": 0.0, "extras": 0.0}, "timings": dict(self.timings)}
        extras = {k: ParameterSet(v) for k, v in self._extras.items()}
        return SecureSum(ParameterSet(self._sums), self._weight, extras, report)


def _accumulate(sums: dict[str, np.ndarray], ps: ParameterSet, weight: float) -> None:
    for k, a in ps.items():
        if k in sums:
            sums[k] += np.multiply(a, weight, dtype=np.float64)
        else:
            sums[k] = np.multiply(a, weight, dtype=np.float64)


class _PlainNode(NodeSession):
    def protect(self, update: ParameterSet, weight: float, options: Mapping[str, Any],
                extras: Mapping[str, ParameterSet] | None = None) -> dict[str, Any]:
        self._check_session(options, "training options")
        if not isinstance(update, ParameterSet):
            raise ConfigurationError(f"Expected the update as a ParameterSet. "
                                     f"Received {type(update).__name__}.")
        return self._reply(params=update, weight=_check_weight(weight),
                           extras=_check_parameter_sets(extras, "extras"))
