"""The privacy budget policy: differential privacy required, and epsilon capped per dataset."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedcore.errors import ConfigurationError
from fedcore.governance._base import Decision, Policy, Request
from fedcore.privacy.accountant import Accountant, check_delta, epsilon
from fedcore.privacy.spec import DEFAULT_DELTA, PrivacySpec, train_size

if TYPE_CHECKING:
    from fedcore.governance.ledger import PrivacyLedger

__all__ = ["PrivacyBudget", "budget_summary", "check_budget"]

_ASK = ('privacy={"mechanism": "update", "clip": 1.0, "noise_multiplier": 1.1} (any '
        'backend) or {"mechanism": "dp-sgd", ...} (torch)')


def _number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def check_budget(key: str, value: Any) -> float | dict[str, float]:
    """The policy value of ``dp_max_epsilon``, checked (``ConfigurationError`` says why)."""
    if isinstance(value, Mapping):
        if value and all(isinstance(k, str) and _number(v) and v > 0
                         for k, v in value.items()):
            return {k: float(v) for k, v in value.items()}
    elif _number(value) and value > 0:
        return float(value)
    raise ConfigurationError(
        f"{key} must be a number > 0 (every dataset's budget) or a table of dataset id or "
        f'name -> number > 0, e.g. {key} = {{ "*" = 8, "diabetes-2024" = 3 }}. Received: '
        f"{value!r}")


class PrivacyBudget(Policy):
    """Requires differential privacy and caps the epsilon each dataset may spend.

    ``max_epsilon`` is the most a dataset may spend in total at ``delta``: a number for
    every dataset, or a mapping of dataset id or name (``"*"``: the others) to a number;
    ``None`` for no cap. A dataset with a cap trains only with DP; ``required`` asks for DP
    without a cap. ``min_noise_multiplier`` is the least noise a request may ask for: below
    it the noise is raised to it (``on_excess="clamp"``, the researcher told) or the request
    refused (``"refuse"``). Before a round runs, its cost is computed from the request's
    parameters (as the floor left them), the dataset's size, the test split and the training
    arguments (as the policies before this one left them), and composed with what the
    dataset already spent (``ledger``).
    """

    name = "privacy-budget"

    def __init__(self, ledger: PrivacyLedger, *,
                 max_epsilon: float | Mapping[str, float] | None = None,
                 delta: float = 1e-5, required: bool = False,
                 min_noise_multiplier: float | None = None, on_excess: str = "clamp"):
        self.ledger = ledger
        self.max_epsilon = (dict(max_epsilon) if isinstance(max_epsilon, Mapping)
                            else max_epsilon)
        self.delta = check_delta(delta)
        self.required = required
        self.min_noise_multiplier = min_noise_multiplier
        self.on_excess = on_excess

    def __repr__(self) -> str:
        return (f"PrivacyBudget(max_epsilon={self.max_epsilon!r}, delta={self.delta!r}, "
                f"required={self.required!r}, "
                f"min_noise_multiplier={self.min_noise_multiplier!r})")

    def _floor(self, spec: PrivacySpec) -> tuple[PrivacySpec, Decision | None]:
        """``spec`` with its noise raised to the node's floor, and the decision that says so.

        The decision is a refusal (``on_excess="refuse"``), an override (the noise was
        raised) or ``None`` (the request's noise is at or above the floor).
        """
        floor = self.min_noise_multiplier
        if floor is None or spec.noise_multiplier >= floor:
            return spec, None
        if self.on_excess == "refuse":
            return spec, Decision.refuse(
                f"privacy noise_multiplier={spec.noise_multiplier:g} is below this node's "
                f"minimum of {floor:g} (policy dp_min_noise_multiplier); this node refuses "
                f"such requests. Ask for noise_multiplier={floor:g} or more.")
        raised = dataclasses.replace(spec, noise_multiplier=float(floor))
        return raised, Decision.override({}, [
            f"privacy noise_multiplier {spec.noise_multiplier:g} raised to this node's "
            f"minimum {floor:g} (policy dp_min_noise_multiplier)"], privacy=raised.to_dict())

    def limit(self, dataset: Mapping[str, Any] | None) -> float | None:
        """The budget of ``dataset`` (its registry entry); ``None`` when uncapped."""
        if not isinstance(self.max_epsilon, Mapping):
            return self.max_epsilon
        ds = dataset or {}
        for key in (ds.get("id"), ds.get("name"), "*"):
            if key in self.max_epsilon:
                return float(self.max_epsilon[key])
        return None

    def overspent(self, dataset: Mapping[str, Any] | None,
                  events: Sequence[Any]) -> str | None:
        """Why releasing a round that spent ``events`` would cross ``dataset``'s budget.

        ``None`` when it fits (or the dataset has no cap). The node asks this after training,
        before the update leaves it: :meth:`review` predicts a round's cost from its
        arguments, and a backend's DP-SGD may take a slightly different schedule (TF's fixed
        batches of ``batch_size / n`` against Opacus's Poisson rate ``1 / ceil(n / batch)``).
        """
        limit = self.limit(dataset)
        if limit is None or dataset is None:
            return None
        accountant = self.ledger.accountant(str(dataset.get("id")))
        after = accountant.epsilon_with(events, self.delta)
        if after <= limit:
            return None
        spent = accountant.epsilon(self.delta)
        return (f"Dataset {dataset.get('name') or dataset.get('id')!r} would exceed its privacy "
                f"budget on this node: the round trained, but it spent more than predicted "
                f"(epsilon total {after:.4g} of {limit:g} at delta {self.delta:g}, {spent:.4g} "
                "spent before it), so its update is withheld and nothing is recorded as "
                "spent. Ask for more noise or fewer steps, or ask the node's administrator "
                "for a larger budget.")

    def review(self, request: Request) -> Decision:  # noqa: D102
        if request.kind == "statistics":
            return self._review_statistics(request)
        if request.kind != "train":
            return Decision.allow()
        label, limit = request.dataset_label, self.limit(request.dataset)
        try:
            spec = PrivacySpec.parse(request.privacy)
        except ConfigurationError as exc:
            return Decision.refuse(f"The request's differential privacy is invalid: {exc}")
        if spec is None:
            if limit is not None:
                return Decision.refuse(
                    f"Dataset {label!r} has a privacy budget on this node (epsilon "
                    f"{limit:g} at delta {self.delta:g}, policy dp_max_epsilon), so it trains "
                    f"only with differential privacy. Ask for it with {_ASK}.")
            if self.required:
                return Decision.refuse(
                    "This node trains only with differential privacy (policy dp_required) "
                    f"and the request asks for none. Ask for it with {_ASK}.")
            return Decision.allow()
        spec, floored = self._floor(spec)
        if floored is not None and not floored.allowed:
            return floored
        allowed = floored or Decision.allow()
        if limit is None or request.dataset is None:
            return allowed
        try:
            events = spec.events(
                n_train=train_size(int(request.n_samples or 0), request.test_ratio),
                training_args=request.training_args)
        except ConfigurationError as exc:
            return Decision.refuse(f"The request's differential privacy is invalid: {exc}")
        accountant = self.ledger.accountant(str(request.dataset.get("id")))
        spent = accountant.epsilon(self.delta)
        after = accountant.epsilon_with(events, self.delta)
        if after <= limit:
            return allowed
        alone = epsilon(events, self.delta)
        remaining = max(limit - spent, 0.0)
        return Decision.refuse(
            f"Dataset {label!r} would exceed its privacy budget on this node: it has spent "
            f"epsilon {spent:.4g} of {limit:g} (delta {self.delta:g}, policy dp_max_epsilon), "
            f"{remaining:.4g} remains, and this round ({spec.mechanism}, noise_multiplier "
            f"{spec.noise_multiplier:g}) would cost {alone:.4g} on its own, bringing the total "
            f"to {after:.4g}. Ask for more noise or fewer steps, or ask the node's "
            "administrator for a larger budget.")


    def _review_statistics(self, request: Request) -> Decision:
        """Statistics of a dataset with a budget: only noised, and while the budget lasts.

        ``privacy["events"]`` are the Gaussian releases the node will make (set by the node).
        """
        label, limit = request.dataset_label, self.limit(request.dataset)
        if limit is None or request.dataset is None:
            return Decision.allow()
        events = request.privacy.get("events") if request.privacy else None
        if not events:
            return Decision.refuse(
                f"Dataset {label!r} has a privacy budget on this node (epsilon {limit:g} at "
                f"delta {self.delta:g}, policy dp_max_epsilon), so it answers statistics only "
                "with differential privacy, charged to that budget. Ask with "
                "FederatedStatistics(..., privacy=True).")
        accountant = self.ledger.accountant(str(request.dataset.get("id")))
        spent, after = accountant.epsilon(self.delta), accountant.epsilon_with(events,
                                                                                self.delta)
        if after <= limit:
            return Decision.allow()
        return Decision.refuse(
            f"Dataset {label!r} would exceed its privacy budget on this node: it has spent "
            f"epsilon {spent:.4g} of {limit:g} (delta {self.delta:g}, policy dp_max_epsilon) "
            f"and these statistics would bring it to {after:.4g}. Ask for fewer variables "
            "or queries, or ask the node's administrator for a larger budget.")


def budget_summary(ledger: PrivacyLedger, datasets: Iterable[Mapping[str, Any]],
                   policy: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each dataset's spent and remaining budget under ``policy`` (the node's, effective).

    One row per dataset entry: ``dataset`` (id), ``name``, ``epsilon_spent`` and
    ``epsilon_limit`` (``None``: no cap) at ``delta`` (policy ``dp_delta``),
    ``epsilon_remaining``, ``dp_rounds`` and ``last_round_at`` (``None``: never).
    """
    delta = float(policy.get("dp_delta") or DEFAULT_DELTA)
    budget = PrivacyBudget(ledger, max_epsilon=policy.get("dp_max_epsilon"), delta=delta)
    entries = {e["dataset"]: e for e in ledger.list()}
    rows = []
    for ds in datasets:
        entry = entries.get(ds["id"], {})
        spent = Accountant(entry.get("events") or []).epsilon(delta)
        limit = budget.limit(ds)
        rows.append({"dataset": ds["id"], "name": ds.get("name", ""), "epsilon_spent": spent,
                     "epsilon_limit": limit,
                     "epsilon_remaining": None if limit is None else max(limit - spent, 0.0),
                     "delta": delta, "dp_rounds": int(entry.get("rounds", 0)),
                     "last_round_at": entry.get("updated_at")})
    return rows
