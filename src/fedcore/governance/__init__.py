"""Node governance: a chain of policies that review every researcher request.

Each :class:`Policy` answers a :class:`Request` with a :class:`Decision`: allow, refuse with a
reason the researcher sees, or allow with overrides of the training arguments. A node runs
its requests through a :class:`Governance` chain built from its ``config.toml``
(:func:`build_governance`) and writes every decision to its audit log. A site adds its own
rules with ``Node(home, policies=[MyPolicy()])``::

    class OfficeHours(Policy):
        name = "office-hours"

        def review(self, request):
            if request.kind == "train" and not 8 <= time.localtime().tm_hour < 18:
                return Decision.refuse("This hospital trains between 08:00 and 18:00 only.")
            return Decision.allow()
"""

from fedcore.governance._base import Decision, Governance, Policy, Request
from fedcore.governance._privacy import budget_summary
from fedcore.governance.ledger import PrivacyLedger
from fedcore.governance.plans import STATUSES, PlanStore
from fedcore.governance.policies import (
    SETTINGS,
    DatasetAccess,
    MinSamples,
    PlanApproval,
    PrivacyBudget,
    SecureAggregationRequired,
    StatisticsAllowed,
    TrainingArgs,
    build_governance,
    effective_policy,
    validate_policy,
)

__all__ = [
    "SETTINGS",
    "STATUSES",
    "DatasetAccess",
    "Decision",
    "Governance",
    "MinSamples",
    "PlanApproval",
    "PlanStore",
    "Policy",
    "PrivacyBudget",
    "PrivacyLedger",
    "Request",
    "SecureAggregationRequired",
    "StatisticsAllowed",
    "TrainingArgs",
    "budget_summary",
    "build_governance",
    "effective_policy",
    "validate_policy",
]
