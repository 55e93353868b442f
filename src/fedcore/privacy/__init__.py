"""Differential privacy: the accountant, update-level DP, central DP.

Three flavours, each reported with its parameters and an epsilon for a given delta:

- update-level DP on the node, for any backend (:class:`UpdateDP`): the node clips its
  round's update and adds Gaussian noise; the researcher never sees the clear update;
- DP-SGD on the node for backends that offer it (``fedcore_torch.privacy.DPSGD``, through
  Opacus): per-sample gradient clipping and noise at every step;
- central DP at the researcher (:class:`CentralDP`, the ``central-dp`` aggregator): it
  clips each node's update and noises the aggregate; it trusts the researcher.

Each flavour states its neighbouring relation and calibrates the noise to its sensitivity
(``noise_multiplier`` is the noise standard deviation over the sensitivity); under node-side
DP only what the noise covers leaves the node (:class:`PrivateRelease`).

Epsilon comes from :class:`Accountant` (Renyi DP through ``dp-accounting``, the
``fedcore[dp]`` extra). A node enforces a budget per dataset with the ``dp_max_epsilon``
policy. See docs/differential-privacy.md.
"""

from fedcore.privacy.accountant import DEFAULT_ORDERS, Accountant, Event, epsilon
from fedcore.privacy.central import CentralDP
from fedcore.privacy.mechanisms import UpdateDP, add_noise, clip_update
from fedcore.privacy.release import PrivateRelease
from fedcore.privacy.spec import (
    MECHANISMS,
    RELATIONS,
    WITHHELD,
    PrivacySpec,
    dpsgd_schedule,
    train_size,
)

__all__ = [
    "DEFAULT_ORDERS",
    "MECHANISMS",
    "RELATIONS",
    "WITHHELD",
    "Accountant",
    "CentralDP",
    "Event",
    "PrivacySpec",
    "PrivateRelease",
    "UpdateDP",
    "add_noise",
    "clip_update",
    "dpsgd_schedule",
    "epsilon",
    "train_size",
]

