"""The Gaussian mechanism on model updates, for every backend (numpy on ParameterSets).

An update is ``local - global`` over the floating-point parameters, taken jointly as one
vector: its L2 norm is clipped to ``clip``. Two such updates, from any two datasets, differ
by at most ``2 * clip`` (the *replace-one* relation: the dataset's whole contribution
replaced by any other), so that is the sensitivity, and the noise added has standard
deviation ``noise_multiplier * 2 * clip``. Integer and boolean parameters (counters such as
BatchNorm's ``num_batches_tracked``) cannot be noised: they are kept on the node, and the
released model carries the global model's values for them.

Noise comes from a generator seeded by the operating system's CSPRNG
(``np.random.default_rng(secrets.randbits(128))``) unless a generator is passed, which only
tests should do: noise a researcher can predict protects nothing.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedcore.errors import ConfigurationError
from fedcore.params import ParameterSet
from fedcore.privacy.accountant import Event, check_delta
from fedcore.privacy.spec import DEFAULT_DELTA, REPLACE_ONE, PrivacySpec

__all__ = ["UpdateDP", "add_noise", "clip_update", "secure_rng"]


def secure_rng() -> np.random.Generator:
    """A numpy generator seeded with 128 bits from the operating system's CSPRNG."""
    return np.random.default_rng(secrets.randbits(128))


def _floating(name: str, array: np.ndarray) -> bool:
    if array.dtype.kind == "c":
        raise ConfigurationError(f"Parameter {name!r} is complex; differential privacy "
                                 "handles real floating-point parameters only.")
    return array.dtype.kind == "f"


def clip_update(global_params: Mapping[str, np.ndarray], local_params: Mapping[str, Any],
                clip: float) -> tuple[dict[str, np.ndarray], float, bool]:
    """The float64 update ``local - global``, scaled so its joint L2 norm is at most ``clip``.

    Returns ``(delta, norm_before, clipped)`` where ``delta`` holds the floating-point
    parameters only. ``ValueError`` when the two layouts differ.
    """
    ParameterSet(global_params).check_layout(local_params, what="local model")
    delta = {k: np.subtract(local_params[k], g, dtype=np.float64)
             for k, g in global_params.items() if _floating(k, np.asarray(g))}
    norm = math.sqrt(math.fsum(float(np.vdot(d, d)) for d in delta.values()))
    clipped = norm > clip
    if clipped:
        scale = clip / norm
        for d in delta.values():
            d *= scale
    return delta, norm, clipped


def add_noise(arrays: dict[str, np.ndarray], sigma: float, rng: np.random.Generator
              ) -> dict[str, np.ndarray]:
    """Add N(0, sigma^2) to every value of ``arrays`` (float64, in place); returns them."""
    for d in arrays.values():
        d += rng.normal(0.0, sigma, size=d.shape)
    return arrays


def _recombine(global_params: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray],
               ) -> ParameterSet:
    """``global + delta`` for float parameters (dtype kept); the global values for the rest.

    Integer and boolean parameters cannot carry noise, so what training did to them stays
    on the node: the released model holds the global model's values.
    """
    out: dict[str, np.ndarray] = {}
    for k, g in global_params.items():
        g = np.asarray(g)
        if k in delta:
            out[k] = (g.astype(np.float64) + delta[k]).astype(g.dtype, copy=False)
        else:
            out[k] = np.array(g, copy=True)
    return ParameterSet(out)


class UpdateDP:
    """Update-level DP on the node: clip the round's whole update, add Gaussian noise.

    Applied once per round after local training, for any backend (it sees only
    ParameterSets). It protects the dataset's whole contribution to the round under the
    *replace-one* relation: whatever one record or all of them did, the clipped update lies
    within ``2 * clip`` of the update any other dataset would give, so the released update
    is the Gaussian mechanism with sensitivity ``2 * clip`` and standard deviation
    ``noise_multiplier * 2 * clip`` (:attr:`sigma`). Integer parameters are released as the
    global model's values. The node accounts it as the event ``(noise_multiplier, 1.0, 1)``
    per round it takes part in: it cannot verify how the researcher samples nodes, so it
    credits no amplification from that. The epsilon is therefore a bound for the dataset as
    a whole (a node-level guarantee), stronger than, and not comparable with, DP-SGD's
    per-record epsilon.

    Example::

        dp = UpdateDP(clip=1.0, noise_multiplier=1.1)
        params, report = dp.apply(global_params, local_params)
        report["clipped"], report["sigma"]   # keep on the node: the norm is data
        dp.sigma                             # 2.2: noise_multiplier * 2 * clip
    """

    mechanism = "update"

    def __init__(self, clip: float, noise_multiplier: float, delta: float = DEFAULT_DELTA):
        spec = PrivacySpec.parse({"mechanism": "update", "clip": clip,
                                  "noise_multiplier": noise_multiplier, "delta": delta})
        assert spec is not None
        self.clip, self.noise_multiplier = spec.clip, spec.noise_multiplier
        self.delta = check_delta(spec.delta)

    @classmethod
    def from_spec(cls, spec: PrivacySpec) -> UpdateDP:
        """The mechanism of a parsed request (``spec.mechanism`` must be ``"update"``)."""
        if spec.mechanism != "update":
            raise ConfigurationError(f"UpdateDP runs the 'update' mechanism. Received: "
                                     f"{spec.mechanism!r}")
        return cls(spec.clip, spec.noise_multiplier, spec.delta)

    def __repr__(self) -> str:
        return (f"UpdateDP(clip={self.clip!r}, noise_multiplier={self.noise_multiplier!r}, "
                f"delta={self.delta!r})")

    @property
    def sensitivity(self) -> float:
        """How far two datasets' clipped updates can lie apart: ``2 * clip`` (replace-one)."""
        return REPLACE_ONE * self.clip

    @property
    def sigma(self) -> float:
        """The noise standard deviation: ``noise_multiplier * sensitivity``."""
        return self.noise_multiplier * self.sensitivity

    def event(self) -> Event:
        """What one application costs: ``(noise_multiplier, 1.0, 1)``."""
        return Event(self.noise_multiplier, 1.0, 1)

    def apply(self, global_params: Mapping[str, np.ndarray],
              local_params: Mapping[str, Any], rng: np.random.Generator | None = None,
              ) -> tuple[ParameterSet, dict[str, Any]]:
        """The privatised local parameters, and a report of what was done.

        The report holds ``norm`` (the update's L2 norm before clipping) and ``clipped``:
        both depend on the data, so they belong in the node's audit log, never in the
        reply. ``rng`` is for tests; the default draws from a CSPRNG-seeded generator.
        """
        delta, norm, clipped = clip_update(global_params, local_params, self.clip)
        add_noise(delta, self.sigma, rng if rng is not None else secure_rng())
        params = _recombine(global_params, delta)
        report = {"mechanism": self.mechanism, "clip": self.clip,
                  "noise_multiplier": self.noise_multiplier,
                  "sensitivity": self.sensitivity, "sigma": self.sigma,
                  "delta": self.delta, "norm": norm, "clipped": clipped}
        return params, report
