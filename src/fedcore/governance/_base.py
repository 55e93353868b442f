"""The governance interface: requests, decisions, policies and the chain that runs them."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class Request:
    """What a researcher asks of a node, as its policies see it.

    ``kind`` is ``"train"`` or ``"statistics"`` (a site's own policies may review other
    kinds). ``dataset`` is the registry entry the request touches (id, name, tags,
    metadata); ``n_samples`` its size. Plan fields are set for training requests.
    ``secagg`` is the secure aggregation the researcher asked for: a scheme name, or the
    request's ``secagg`` options naming it under ``"scheme"`` (``None`` or ``"plain"``:
    none). ``privacy`` is the differential privacy asked for (``TrainRequest.privacy``,
    empty: none) and ``test_ratio`` the share of samples held out, so a policy can tell
    what a round would spend before it runs.
    """

    kind: str
    researcher: str = ""
    experiment: str = ""
    round: int = 0
    dataset: Mapping[str, Any] | None = None
    n_samples: int | None = None
    plan_hash: str = ""
    plan_name: str = ""
    training_args: Mapping[str, Any] = field(default_factory=dict)
    secagg: str | Mapping[str, Any] | None = None
    privacy: Mapping[str, Any] = field(default_factory=dict)
    test_ratio: float = 0.0

    @property
    def dataset_label(self) -> str:
        """The dataset's name (or id) for messages."""
        if not self.dataset:
            return "?"
        return str(self.dataset.get("name") or self.dataset.get("id") or "?")

    @property
    def secagg_scheme(self) -> str | None:
        """The secure aggregation scheme's name; ``None`` for plain aggregation."""
        value = self.secagg
        if isinstance(value, Mapping):
            value = value.get("scheme") or value.get("name")
        scheme = str(value) if value else None
        return None if scheme in (None, "", "plain") else scheme


@dataclass(frozen=True)
class Decision:
    """A policy's answer: allow, refuse with a reason, or allow with overrides.

    ``overrides`` maps training argument names to the values the node imposes; ``privacy``
    (when not empty) is the differential privacy the node imposes instead of the request's
    (``TrainRequest.privacy``, e.g. a noise multiplier raised to the node's floor); ``notes``
    say why, one line per override, for the researcher. ``policy`` names the policy that
    refused (or the policies that overrode).
    """

    allowed: bool
    reason: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    policy: str = ""
    privacy: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def allow(cls) -> Decision:
        """Let the request through unchanged."""
        if cls is not Decision:
            return cls(True)
        # Every policy answers every request, most with this: a new decision (its dicts
        # are its own), its fields set without the frozen __init__'s call per field.
        decision = object.__new__(Decision)
        decision.__dict__.update(allowed=True, reason="", overrides={}, notes=(), policy="",
                                 privacy={})
        return decision

    @classmethod
    def refuse(cls, reason: str) -> Decision:
        """Refuse the request; the researcher sees ``reason``."""
        return cls(False, reason=reason)

    @classmethod
    def override(cls, overrides: Mapping[str, Any], notes: Iterable[str], *,
                 privacy: Mapping[str, Any] | None = None) -> Decision:
        """Let the request through with these training arguments (or its DP) replaced."""
        notes = tuple(notes)
        return cls(True, reason="; ".join(notes), overrides=dict(overrides), notes=notes,
                   privacy=dict(privacy or {}))

    def __bool__(self) -> bool:
        return self.allowed


class Policy(abc.ABC):
    """One rule of a node's governance: reviews a request, answers a :class:`Decision`.

    A site adds its own rule by subclassing this, giving it a ``name`` and passing an
    instance to ``Node(..., policies=[...])``. Policies see the training arguments as
    overridden by the policies before them in the chain.
    """

    name: ClassVar[str] = "policy"

    @abc.abstractmethod
    def review(self, request: Request) -> Decision:
        """Allow, refuse (with a reason the researcher sees) or override."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Governance:
    """A chain of policies; a request passes when every policy allows it.

    Policies run in order. The first refusal ends the review; overrides accumulate, and
    each policy sees the training arguments as the policies before it left them.
    """

    def __init__(self, policies: Iterable[Policy] = ()):
        self.policies = list(policies)

    def __repr__(self) -> str:
        return f"Governance({self.policies!r})"

    def review(self, request: Request) -> Decision:
        """The chain's decision on ``request``."""
        overrides: dict[str, Any] = {}
        privacy: dict[str, Any] = {}
        notes: list[str] = []
        names: list[str] = []
        for policy in self.policies:
            decision = policy.review(request)
            if not decision.allowed:
                return dataclasses.replace(decision, policy=decision.policy or policy.name)
            if decision.overrides or decision.privacy:
                overrides.update(decision.overrides)
                privacy = dict(decision.privacy or privacy)
                notes.extend(decision.notes)
                names.append(policy.name)
                args = {**request.training_args, **decision.overrides}
                request = dataclasses.replace(request, training_args=args,
                                              privacy=privacy or request.privacy)
        if not overrides and not privacy:
            return Decision.allow()
        return dataclasses.replace(Decision.override(overrides, notes, privacy=privacy),
                                   policy=",".join(names))
