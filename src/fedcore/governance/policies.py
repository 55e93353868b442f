"""The built-in node policies, the policy settings of ``config.toml`` and the default chain.

A node's policy is a set of top-level keys of its ``config.toml`` (see :data:`SETTINGS`);
:func:`build_governance` turns them into a :class:`~fedcore.governance.Governance` chain:

statistics gate -> dataset access -> minimum samples -> plan approval -> secure aggregation
-> training-argument caps -> privacy budget -> the site's own policies.
"""

from __future__ import annotations

import difflib
import math
import time
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedcore.errors import ConfigurationError
from fedcore.governance._base import Decision, Governance, Policy, Request
from fedcore.governance._privacy import PrivacyBudget, check_budget
from fedcore.governance.ledger import TABLE as LEDGER_TABLE
from fedcore.governance.ledger import PrivacyLedger
from fedcore.plan.training import LocalTraining

if TYPE_CHECKING:
    from fedcore.governance.plans import PlanStore

__all__ = [
    "SETTINGS",
    "DatasetAccess",
    "MinSamples",
    "PlanApproval",
    "PrivacyBudget",
    "SecureAggregationRequired",
    "Setting",
    "StatisticsAllowed",
    "TrainingArgs",
    "build_governance",
    "effective_policy",
    "parse_setting",
    "validate_policy",
]


# --- settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One policy key of ``config.toml``: its type, default (``None``: no limit) and meaning."""

    key: str
    type: str  # "bool", "int", "number", "choice", "access", "fraction", "budget", "digests"
    default: Any
    help: str
    minimum: int = 0
    choices: tuple[str, ...] = ()


SETTINGS: dict[str, Setting] = {s.key: s for s in [
    Setting("approval_required", "bool", True,
            "train only plans whose hash an administrator approved"),
    Setting("max_epochs", "int", None, "most epochs a round may train (training_args "
            "'epochs')", minimum=1),
    Setting("max_updates", "int", None, "most optimiser steps a round may take "
            "(training_args 'num_updates', for plans that take it, e.g. torch)", minimum=1),
    Setting("batch_size_min", "int", None, "smallest batch_size allowed", minimum=1),
    Setting("batch_size_max", "int", None, "largest batch_size allowed (also imposed when "
            "the researcher gives none)", minimum=1),
    Setting("on_excess", "choice", "clamp", "a request outside a cap is 'clamp'ed to it "
            "(and the researcher told) or 'refuse'd", choices=("clamp", "refuse")),
    Setting("allow_gpu", "bool", True, "let plans train on a GPU"),
    Setting("plan_isolation", "choice", "auto", "where researchers' code runs: 'process' (a "
            "worker process that cannot read the node's key, config or other datasets), "
            "'none' (the node's own process: unsafe for a deployed node), 'auto' (a worker "
            "process on a network, in-process in simulation)",
            choices=("auto", "process", "none")),
    Setting("min_samples", "int", 0, "never train on a dataset with fewer samples"),
    Setting("dataset_access", "access", None, "table: researcher id (or \"*\" for anyone) "
            "-> dataset ids or names they may use; absent: every dataset"),
    Setting("secagg_required", "bool", False, "train, and answer statistics, only for "
            "requests protected by a secure-aggregation session this node set up (a scheme "
            "other than 'plain')"),
    Setting("secagg_min_members", "int", 3, "secure aggregation: fewest nodes in a round "
            "this node takes part in (the sum of fewer reveals too much)", minimum=2),
    Setting("secagg_min_key_bits", "int", 2048, "secure aggregation: smallest Joye-Libert "
            "modulus, in bits", minimum=256),
    Setting("secagg_jl_moduli", "digests", None, "secure aggregation: SHA-256 digests of "
            "published Joye-Libert moduli this node accepts beside the ones nodes generate "
            "(`fedcore-node secagg jl-modulus` makes one)"),
    Setting("dp_required", "bool", False, "train only with differential privacy (update-level "
            "DP or DP-SGD in the request)"),
    Setting("dp_max_epsilon", "budget", None, "privacy budget: most epsilon a dataset may "
            "spend in total (at dp_delta); a number, or a table of dataset id or name (\"*\" "
            "for the others) -> number; implies dp_required"),
    Setting("dp_delta", "fraction", 1e-5, "the delta at which the privacy budget is counted"),
    Setting("dp_min_noise_multiplier", "number", None, "smallest noise_multiplier a request's "
            "DP (update-level or DP-SGD) may ask for: below it the noise is raised to it "
            "(on_excess 'clamp', the researcher told) or the request refused"),
    Setting("statistics", "bool", True, "answer federated statistics requests"),
    Setting("min_count", "int", 5, "statistics: the fewest records a shared count may single "
            "out (smaller cells withheld, too fine or differencing queries refused)"),
    Setting("allow_min_max", "bool", False, "statistics: share minima and maxima (each is "
            "one record's value)"),
    Setting("statistics_dp", "bool", False, "statistics: answer only with differential "
            "privacy (Gaussian noise charged to the dataset's privacy budget); a dataset "
            "with a budget (dp_max_epsilon) answers only so in any case"),
    Setting("statistics_noise", "number", 10.0, "statistics under differential privacy: "
            "the noise multiplier (noise standard deviation over each sum's sensitivity)"),
    Setting("max_requests_per_s", "int", 100, "most requests a second taken from one "
            "researcher key on a network (bursts of twice that); more are refused",
            minimum=1),
]}


def _check_bool(setting: Setting, value: Any) -> Any:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{setting.key} must be true or false. Received: {value!r}")
    return value


def _check_int(setting: Setting, value: Any) -> Any:
    if not isinstance(value, int) or isinstance(value, bool) or value < setting.minimum:
        raise ConfigurationError(f"{setting.key} must be a whole number >= {setting.minimum}. "
                                 f"Received: {value!r}")
    return value


def _check_number(setting: Setting, value: Any) -> Any:
    if not _is_number(value) or value <= 0:
        raise ConfigurationError(f"{setting.key} must be a number > 0. Received: {value!r}")
    return float(value)


def _check_fraction(setting: Setting, value: Any) -> Any:
    if not _is_number(value) or not 0 < value < 1:
        raise ConfigurationError(f"{setting.key} must be a number in (0, 1), e.g. 1e-5. "
                                 f"Received: {value!r}")
    return float(value)


def _check_choice(setting: Setting, value: Any) -> Any:
    if value not in setting.choices:
        raise ConfigurationError(
            f"{setting.key} must be one of {list(setting.choices)}. Received: {value!r}")
    return value


def _check_access(setting: Setting, value: Any) -> Any:
    if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, (list, tuple))
            and all(isinstance(d, str) for d in v) for k, v in value.items()):
        raise ConfigurationError(
            f"{setting.key} must be a table of researcher name -> list of dataset ids or "
            f'names, e.g. {setting.key} = {{ "*" = ["diabetes-2024"] }}. Received: {value!r}')
    return {k: list(v) for k, v in value.items()}


def _check_digests(setting: Setting, value: Any) -> Any:
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(d, str) and len(d) == 64 and _is_hex(d) for d in value):
        raise ConfigurationError(
            f"{setting.key} must be a list of SHA-256 digests (64 hex digits each), as printed "
            f"by `fedcore-node secagg jl-modulus`. Received: {value!r}")
    return [d.lower() for d in value]


#: How each type of setting is checked (and cleaned).
_CHECKS: dict[str, Any] = {
    "bool": _check_bool, "int": _check_int, "number": _check_number,
    "fraction": _check_fraction, "choice": _check_choice, "access": _check_access,
    "digests": _check_digests,
    "budget": lambda setting, value: check_budget(setting.key, value),
}


def _check(setting: Setting, value: Any) -> Any:
    return _CHECKS[setting.type](setting, value)


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _unknown(key: str) -> ConfigurationError:
    close = difflib.get_close_matches(key, SETTINGS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigurationError(f"Unknown policy key {key!r}.{hint} Known keys: "
                              f"{', '.join(SETTINGS)}")


def validate_policy(values: Mapping[str, Any]) -> dict[str, Any]:
    """Check policy keys and values; returns them cleaned. ``ConfigurationError`` says why."""
    cleaned: dict[str, Any] = {}
    for key, value in values.items():
        if key not in SETTINGS:
            raise _unknown(key)
        cleaned[key] = _check(SETTINGS[key], value)
    lo, hi = cleaned.get("batch_size_min"), cleaned.get("batch_size_max")
    if lo is not None and hi is not None and lo > hi:
        raise ConfigurationError(
            f"batch_size_min ({lo}) is above batch_size_max ({hi}): no batch size fits.")
    return cleaned


def effective_policy(config: Mapping[str, Any]) -> dict[str, Any]:
    """Every policy setting of a node's configuration, defaults filled (``None``: no limit).

    Keys of ``config`` that are not policy settings (the node's id, name, other features'
    settings) are left out.
    """
    given = validate_policy({k: v for k, v in config.items() if k in SETTINGS})
    return {key: given.get(key, s.default) for key, s in SETTINGS.items()}


def suspicious_keys(config: Mapping[str, Any]) -> list[str]:
    """Keys of ``config`` that look like misspelt policy keys (and so have no effect)."""
    return [f"{k!r} (did you mean {c[0]!r}?)" for k in config if k not in SETTINGS
            for c in [difflib.get_close_matches(k, SETTINGS, n=1, cutoff=0.85)] if c]


def parse_setting(key: str, text: str) -> Any:
    """A value typed on the command line for ``key``: TOML syntax, or a bare word.

    ``none`` (or nothing) means "back to the default". A list of dataset names may be given
    comma-separated for one researcher as ``dataset_access.RESEARCHER=a,b``.
    """
    if key not in SETTINGS:
        raise _unknown(key)
    if text.strip().lower() in ("", "none", "null", "default"):
        return None
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    if SETTINGS[key].type == "bool" and isinstance(value, str) and value.lower() in (
            "yes", "no", "on", "off"):
        value = value.lower() in ("yes", "on")
    return value


# --- policies -------------------------------------------------------------------------------


class StatisticsAllowed(Policy):
    """Refuses statistics requests on a node that does not answer them.

    With ``dp_only`` (policy ``statistics_dp``), exact ones are refused too.
    """

    name = "statistics"

    def __init__(self, allowed: bool = True, dp_only: bool = False):
        self.allowed, self.dp_only = allowed, dp_only

    def review(self, request: Request) -> Decision:  # noqa: D102
        if request.kind != "statistics":
            return Decision.allow()
        if not self.allowed:
            return Decision.refuse("This node does not answer statistics requests "
                                   "(its policy sets statistics = false).")
        if self.dp_only and not request.privacy:
            return Decision.refuse(
                "This node answers statistics only with differential privacy (policy "
                "statistics_dp). Ask with FederatedStatistics(..., privacy=True).")
        return Decision.allow()


class DatasetAccess(Policy):
    """Lets each researcher use only the datasets listed for them (or for ``"*"``)."""

    name = "dataset-access"

    def __init__(self, access: Mapping[str, Sequence[str]] | None = None):
        self.access = {k: list(v) for k, v in (access or {}).items()}

    def review(self, request: Request) -> Decision:  # noqa: D102
        if not self.access or request.dataset is None:
            return Decision.allow()
        allowed = set(self.access.get("*", [])) | set(self.access.get(request.researcher, []))
        ds = request.dataset
        if "*" in allowed or {ds.get("id"), ds.get("name")} & allowed:
            return Decision.allow()
        return Decision.refuse(
            f"Researcher {request.researcher!r} may not use dataset "
            f"{request.dataset_label!r} on this node (policy dataset_access). Ask the node's "
            "administrator for access.")


class MinSamples(Policy):
    """Never lets a request touch a dataset with fewer than ``minimum`` samples."""

    name = "min-samples"

    def __init__(self, minimum: int = 0):
        self.minimum = int(minimum)

    def review(self, request: Request) -> Decision:  # noqa: D102
        if self.minimum <= 0 or request.dataset is None:
            return Decision.allow()
        n = request.n_samples
        if n is None or n < self.minimum:
            held = "an unknown number of" if n is None else str(n)
            return Decision.refuse(
                f"Dataset {request.dataset_label!r} has {held} samples; this node uses only "
                f"datasets of at least {self.minimum} samples (policy min_samples).")
        return Decision.allow()


class PlanApproval(Policy):
    """Lets a training plan run only when an administrator approved its SHA-256."""

    name = "plan-approval"

    def __init__(self, plans: PlanStore):
        self.plans = plans

    def review(self, request: Request) -> Decision:  # noqa: D102
        if request.kind != "train":
            return Decision.allow()
        sha, label = request.plan_hash, request.plan_name or "plan"
        entry = self.plans.find(sha) or {}
        status = entry.get("status", "unknown")
        if status == "approved":
            return Decision.allow()
        if status == "pending":
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry["submitted_at"]))
            return Decision.refuse(
                f"Plan {sha} ({label}) is awaiting review by this node's administrator "
                f"(submitted {when}). Experiment.plan_status() tells when it is decided.")
        if status == "rejected":
            note = entry.get("note") or "no reason given"
            return Decision.refuse(
                f"Plan {sha} ({label}) was rejected by this node's administrator: {note}")
        reason = (f"Plan {sha} ({label}) is not approved on this node: it was never "
                  "submitted for review. Submit it with Experiment.submit_plan() and ask the "
                  "node's administrator to approve it.")
        approved = [e["sha256"] for e in self.plans.list(status="approved")
                    if e["entry"] == request.plan_name]
        if approved:
            reason += (f" (An approved version of {label} exists, {approved[-1][:12]}: this "
                       "plan's source differs from it.)")
        return Decision.refuse(reason)


class SecureAggregationRequired(Policy):
    """Refuses training and statistics requests not protected by secure aggregation.

    ``Request.secagg`` is the scheme of the session the node itself holds and will protect
    the update with (the node resolves it from its own sessions, bound to the researcher's
    key, experiment and round; never from a name the request writes). Without one, or with
    the ``plain`` identity scheme, the request is refused: the node fails closed rather than
    send an update, or statistics, the researcher can read.
    """

    name = "secure-aggregation"

    def review(self, request: Request) -> Decision:  # noqa: D102
        if request.kind in ("train", "statistics") and request.secagg_scheme is None:
            given = "plain aggregation" if request.secagg else "none"
            fix = ("Run the experiment with a secure aggregation scheme such as 'masking' or "
                   "'joye-libert'." if request.kind == "train" else
                   "Ask with a secure aggregation scheme: FederatedStatistics(..., "
                   "secagg='masking') or 'joye-libert'.")
            return Decision.refuse(
                f"This node requires secure aggregation (policy secagg_required) and the "
                f"request uses {given}. {fix}")
        return Decision.allow()


class TrainingArgs(Policy):
    """Caps epochs, optimiser steps and batch size, and keeps plans off the GPU if asked.

    ``on_excess="clamp"`` trains with the cap and reports the override to the researcher;
    ``"refuse"`` refuses the request. A missing ``num_updates`` or ``batch_size`` gets the
    node's maximum; ``use_gpu`` is turned off on a node that does not allow the GPU.
    """

    name = "training-args"

    def __init__(self, *, max_epochs: int | None = None, max_updates: int | None = None,
                 batch_size_min: int | None = None, batch_size_max: int | None = None,
                 allow_gpu: bool = True, on_excess: str = "clamp"):
        self.max_epochs, self.max_updates = max_epochs, max_updates
        self.batch_size_min, self.batch_size_max = batch_size_min, batch_size_max
        self.allow_gpu, self.on_excess = allow_gpu, on_excess

    def review(self, request: Request) -> Decision:  # noqa: D102
        if request.kind != "train" or (
                self.allow_gpu and self.max_epochs is None and self.max_updates is None
                and self.batch_size_min is None and self.batch_size_max is None):
            return Decision.allow()  # nothing to check (the default policy)
        limits = [(key, lo, hi, lo_name, hi_name) for key, lo, hi, lo_name, hi_name in (
            ("epochs", None, self.max_epochs, "", "max_epochs"),
            ("num_updates", None, self.max_updates, "", "max_updates"),
            ("batch_size", self.batch_size_min, self.batch_size_max, "batch_size_min",
             "batch_size_max")) if lo is not None or hi is not None]
        if not limits and self.allow_gpu:
            return Decision.allow()
        try:  # the common keys only: the plan, loaded later, checks its own
            training = LocalTraining.common(request.training_args)
        except ConfigurationError as exc:
            return Decision.refuse(str(exc))
        overrides: dict[str, Any] = {}
        notes: list[str] = []
        for key, lo, hi, lo_name, hi_name in limits:
            if key not in training.explicit:
                if hi is not None and key != "epochs":
                    overrides[key] = hi
                    notes.append(f"{key} not given: set to this node's maximum {hi}")
                continue
            value = getattr(training, key)
            bound, word = ((hi, "maximum") if hi is not None and value > hi else
                           (lo, "minimum") if lo is not None and value < lo else (None, ""))
            if bound is None:
                continue
            limit = hi_name if word == "maximum" else lo_name
            if self.on_excess == "refuse":
                return Decision.refuse(
                    f"training_args {key}={value} is outside this node's {word} of {bound} "
                    f"(policy {limit}); this node refuses such requests. Ask for {key}="
                    f"{bound} or {'less' if word == 'maximum' else 'more'}.")
            overrides[key] = bound
            notes.append(f"{key} {value} clamped to this node's {word} {bound} (policy {limit})")
        if not self.allow_gpu and "use_gpu" in training.explicit and training.use_gpu:
            overrides["use_gpu"] = False
            notes.append("use_gpu turned off: this node does not allow the GPU")
        return Decision.override(overrides, notes) if overrides else Decision.allow()


# --- the default chain ----------------------------------------------------------------------


def build_governance(policy: Mapping[str, Any], plans: PlanStore,
                     extra: Iterable[Policy] = (), *, ledger: PrivacyLedger | None = None,
                     ) -> Governance:
    """The node's chain for an :func:`effective_policy`, with the site's own policies last.

    ``ledger`` holds what each dataset spent of its privacy budget; by default it is the
    ``privacy`` table of the database ``plans`` live in.
    """
    chain: list[Policy] = [StatisticsAllowed(policy["statistics"], policy["statistics_dp"]),
                           DatasetAccess(policy["dataset_access"]),
                           MinSamples(policy["min_samples"])]
    if policy["approval_required"]:
        chain.append(PlanApproval(plans))
    if policy["secagg_required"]:
        chain.append(SecureAggregationRequired())
    chain.append(TrainingArgs(
        max_epochs=policy["max_epochs"], max_updates=policy["max_updates"],
        batch_size_min=policy["batch_size_min"], batch_size_max=policy["batch_size_max"],
        allow_gpu=policy["allow_gpu"], on_excess=policy["on_excess"]))
    if policy.get("dp_required") or policy.get("dp_max_epsilon") is not None or \
            policy.get("dp_min_noise_multiplier") is not None:
        if ledger is None:
            ledger = PrivacyLedger(plans.sibling_table(LEDGER_TABLE))
        chain.append(PrivacyBudget(ledger, max_epsilon=policy.get("dp_max_epsilon"),
                                   delta=policy.get("dp_delta") or 1e-5,
                                   required=bool(policy.get("dp_required")),
                                   min_noise_multiplier=policy.get("dp_min_noise_multiplier"),
                                   on_excess=policy.get("on_excess") or "clamp"))
    chain.extend(extra)
    return Governance(chain)


class Refuse(Policy):
    """Refuses everything with one reason (a node whose policy cannot be read fails closed)."""

    name = "invalid-policy"

    def __init__(self, reason: str):
        self.reason = reason

    def review(self, request: Request) -> Decision:  # noqa: D102
        return Decision.refuse(self.reason)
