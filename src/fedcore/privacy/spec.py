"""What differential privacy a researcher asks of a node, and what a round of it costs.

The researcher puts a plain dict in ``TrainRequest.privacy``; :meth:`PrivacySpec.parse`
checks it. ``noise_multiplier`` is always the noise standard deviation divided by the
mechanism's L2 sensitivity (``std = noise_multiplier * sensitivity``), the convention of
``dp-accounting`` and Opacus, so the accountant's epsilon is the one of the noise applied.
Two mechanisms run on the node:

- ``"update"`` (update-level DP, any backend): after local training, the node clips the L2
  norm of its whole update to ``clip`` and adds Gaussian noise. Neighbouring datasets are
  *replace-one*: the dataset's whole contribution replaced by any other, so two clipped
  updates differ by up to ``2 * clip``, the sensitivity, and the noise's standard deviation
  is ``noise_multiplier * 2 * clip``. One Gaussian mechanism per round over the dataset's
  whole contribution: the event ``(noise_multiplier, 1.0, 1)``.
- ``"dp-sgd"`` (backends that declare it, e.g. torch through Opacus): every optimiser step
  clips each sample's gradient to ``clip`` and adds noise of standard deviation
  ``noise_multiplier * clip``; batches are Poisson samples and neighbours differ by adding
  or removing one sample (sensitivity ``clip``). With ``n`` training samples and batch
  size ``B`` the sample rate is ``1 / ceil(n / B)`` and an epoch ``ceil(n / B)`` steps
  (Opacus's own rule), capped by ``num_updates``: the event ``(noise_multiplier, rate,
  steps)``.

Both costs are known before training from the parameters and the dataset size, which is
how a node's budget policy refuses a round before it runs. Under either mechanism the
node releases only what the mechanism covers (see :data:`WITHHELD`).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedcore.errors import ConfigurationError
from fedcore.plan.training import LocalTraining
from fedcore.privacy.accountant import Event, check_delta, epsilon

__all__ = ["DEFAULT_DELTA", "MECHANISMS", "RELATIONS", "REPLACE_ONE", "WITHHELD", "PrivacySpec",
           "dpsgd_schedule", "train_size"]

#: Mechanisms a node runs: update-level DP and DP-SGD.
MECHANISMS = ("update", "dp-sgd")
#: How many times the clipping norm two neighbouring contributions can differ by when one
#: is replaced by any other: two vectors of norm at most ``clip`` lie up to ``2 * clip`` apart.
REPLACE_ONE = 2.0
#: Each mechanism's neighbouring relation and its sensitivity in units of ``clip``.
RELATIONS = {"update": ("replace-one", REPLACE_ONE), "dp-sgd": ("add-remove-one", 1.0)}
#: What a node under DP never replies, because no noise covers it: the evaluation metrics
#: of the global and the local model, what training reported (loss...), and the loss of
#: its progress messages.
WITHHELD = ("metrics_global", "metrics_local", "train_stats", "progress_loss")
DEFAULT_DELTA = 1e-5
_KEYS = ("mechanism", "noise_multiplier", "clip", "delta")
_ALIASES = {"max_grad_norm": "clip"}  # Opacus's name for the per-sample clipping norm
_EXAMPLE = ('{"mechanism": "update", "clip": 1.0, "noise_multiplier": 1.1, '
            '"delta": 1e-5}')


def _positive(key: str, value: Any) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0):
        raise ConfigurationError(f"privacy[{key!r}] must be a number > 0. Received: "
                                 f"{value!r}")
    return float(value)


@dataclass(frozen=True)
class PrivacySpec:
    """Checked DP parameters of a training request (see the module docstring)."""

    mechanism: str
    noise_multiplier: float
    clip: float
    delta: float = DEFAULT_DELTA

    @classmethod
    def parse(cls, value: PrivacySpec | Mapping[str, Any] | None) -> PrivacySpec | None:
        """The spec of ``TrainRequest.privacy``; ``None`` when empty (no DP asked).

        ``ConfigurationError`` says what is wrong: unknown mechanism or key, a missing or
        non-positive ``clip`` or ``noise_multiplier`` (no noise is no privacy), ``delta``
        outside (0, 1).
        ``max_grad_norm`` is accepted for ``clip``.
        """
        if not value:
            return None
        if isinstance(value, PrivacySpec):
            return value
        if not isinstance(value, Mapping):
            raise ConfigurationError(f"privacy must be a dict such as {_EXAMPLE}. "
                                     f"Received: {value!r}")
        given = dict(value)
        for alias, key in _ALIASES.items():
            if alias in given:
                if key in given and given[key] != given[alias]:
                    raise ConfigurationError(
                        f"privacy gives both {key!r} ({given[key]!r}) and {alias!r} "
                        f"({given[alias]!r}); give one.")
                given[key] = given.pop(alias)
        for key in given:
            if key not in _KEYS:
                close = difflib.get_close_matches(key, _KEYS, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigurationError(f"Unknown privacy key {key!r}.{hint} Expected keys: "
                                         f"{', '.join(_KEYS)}.")
        mechanism = given.get("mechanism")
        if mechanism not in MECHANISMS:
            raise ConfigurationError(
                f"privacy['mechanism'] must be one of {list(MECHANISMS)} (central DP is an "
                f"aggregator on the researcher's side: 'central-dp'). Received: "
                f"{mechanism!r}")
        for key in ("noise_multiplier", "clip"):
            if key not in given:
                raise ConfigurationError(f"privacy needs {key!r}, e.g. {_EXAMPLE}.")
        return cls(mechanism=mechanism,
                   noise_multiplier=_positive("noise_multiplier", given["noise_multiplier"]),
                   clip=_positive("clip", given["clip"]),
                   delta=check_delta(given.get("delta", DEFAULT_DELTA)))

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as in ``TrainRequest.privacy``."""
        return {"mechanism": self.mechanism, "noise_multiplier": self.noise_multiplier,
                "clip": self.clip, "delta": self.delta}

    @property
    def relation(self) -> str:
        """The neighbouring relation: ``"replace-one"`` (update) or ``"add-remove-one"``."""
        return RELATIONS[self.mechanism][0]

    @property
    def sensitivity(self) -> float:
        """The L2 sensitivity: ``2 * clip`` for update-level DP, ``clip`` for DP-SGD."""
        return RELATIONS[self.mechanism][1] * self.clip

    @property
    def sigma(self) -> float:
        """The noise standard deviation: ``noise_multiplier * sensitivity``."""
        return self.noise_multiplier * self.sensitivity

    def reply(self, events: Iterable[Event | Sequence[Any]],
              total_events: Iterable[Event | Sequence[Any]] | None = None) -> dict[str, Any]:
        """What ``TrainReply.privacy`` carries for a round that spent ``events``.

        The parameters, the neighbouring ``relation`` and ``sensitivity`` the noise was
        calibrated to, ``events``, ``epsilon`` (this round alone) and ``epsilon_total``
        (``total_events``: every round of the dataset so far, this one included; ``None``
        when not given), both at this spec's ``delta``, and ``withheld``: the reply fields
        left empty because no noise covers them. Nothing data-dependent.
        """
        spent = [Event.coerce(e) for e in events]
        total = None if total_events is None else epsilon(total_events, self.delta)
        return {**self.to_dict(), "relation": self.relation,
                "sensitivity": self.sensitivity, "events": [list(e) for e in spent],
                "epsilon": epsilon(spent, self.delta), "epsilon_total": total,
                "withheld": list(WITHHELD)}

    def events(self, *, n_train: int,
               training_args: LocalTraining | Mapping[str, Any] | None = None) -> list[Event]:
        """What one round costs: the accountant events, known before training.

        ``n_train`` is the number of training samples (after the test split, see
        :func:`train_size`); ``training_args`` (a :class:`~fedcore.plan.LocalTraining`, or
        the mapping it is parsed from) give DP-SGD's ``epochs`` (default 1), ``batch_size``
        (32) and ``num_updates`` (no cap), the values the plan trains with.
        """
        if self.mechanism == "update":
            return [Event(self.noise_multiplier, 1.0, 1)]
        training = (training_args if isinstance(training_args, LocalTraining)
                    else LocalTraining.common(training_args))
        rate, steps = dpsgd_schedule(n_train, batch_size=training.batch_size or 32,
                                     epochs=training.epochs,
                                     num_updates=training.num_updates)
        return [Event(self.noise_multiplier, rate, steps)] if steps else []


def dpsgd_schedule(n_train: int, *, batch_size: Any = 32, epochs: Any = 1,
                   num_updates: Any = None) -> tuple[float, int]:
    """``(sample_rate, steps)`` of DP-SGD with Poisson batches, as Opacus runs it.

    Opacus samples each record with probability ``1 / len(loader)`` (``len(loader) =
    ceil(n / batch_size)``) and draws ``int(1 / rate)`` batches an epoch.
    """
    for key, value in (("batch_size", batch_size), ("epochs", epochs)):
        if not _count(value) or value < 1:
            raise ConfigurationError(f"training_args[{key!r}] must be a whole number >= 1 "
                                     f"for DP-SGD. Received: {value!r}")
    if num_updates is not None and (not _count(num_updates) or num_updates < 0):
        raise ConfigurationError("training_args['num_updates'] must be a whole number >= 0. "
                                 f"Received: {num_updates!r}")
    if n_train <= 0:
        return 1.0, 0
    rate = 1 / math.ceil(n_train / int(batch_size))
    steps = int(epochs) * int(1 / rate)
    if num_updates is not None:
        steps = min(steps, int(num_updates))
    return rate, steps


def train_size(n_samples: int, test_ratio: float) -> int:
    """How many of ``n_samples`` train after the node's test split (as ``Dataset.split``)."""
    n_test = int(round(n_samples * test_ratio))
    if test_ratio > 0 and n_samples > 1:
        n_test = min(max(n_test, 1), n_samples - 1)
    return n_samples - n_test


def _count(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return math.isfinite(value) and value.is_integer()
    return isinstance(value, int)
