"""The one place the GUI calls the node's governance: plans, policy, users, audit chain.

Pages use this adapter only, so a change in the governance API touches this file alone.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from fedcore.node import Node

#: Password hashes (argon2id, 64 MiB each) the GUI computes at once, by default.
DEFAULT_PASSWORD_CHECKS = 2


class PasswordsBusy(Exception):
    """Every password-hashing slot is taken: the request should be retried in a moment."""


class Governance:
    """What the GUI needs of a node, in the GUI's own terms.

    At most ``password_checks`` password hashes run at once (each takes 64 MiB and a CPU
    for a fraction of a second); a call that would start one more raises
    :class:`PasswordsBusy` at once instead of queueing, so a burst of logins cannot grow the
    GUI's memory or stack up threads.
    """

    def __init__(self, node: Node, *, password_checks: int = DEFAULT_PASSWORD_CHECKS):
        if password_checks < 1:
            raise ValueError(f"password_checks must be >= 1. Received: {password_checks!r}")
        self.node = node
        self._hashing = threading.BoundedSemaphore(password_checks)

    @contextlib.contextmanager
    def _hash_slot(self) -> Iterator[None]:
        if not self._hashing.acquire(blocking=False):
            raise PasswordsBusy("Too many password checks at once.")
        try:
            yield
        finally:
            self._hashing.release()

    # --- users ------------------------------------------------------------------------------

    def has_users(self) -> bool:
        """Whether any GUI user exists (the first admin is created from the CLI)."""
        return bool(self.node.users.list())

    def check_password(self, user: str, password: str) -> str | None:
        """The role of ``user`` when ``password`` is right, else None (audited as ``login``)."""
        if not user or not password:
            return None
        with self._hash_slot():
            return self.node.users.verify(user, password)

    def role_of(self, user: str) -> str | None:
        """The current role of ``user``; None when the account no longer exists."""
        for entry in self.node.users.list():
            if entry["username"] == user:
                return str(entry["role"])
        return None

    def users(self) -> list[dict[str, Any]]:
        """Every account: ``username``, ``role``, ``created`` (never a password hash)."""
        return list(self.node.users.list())

    def add_user(self, user: str, password: str, role: str) -> None:
        """Create an account (audited as ``user-added``)."""
        with self._hash_slot():
            self.node.users.add(user, password, role)

    def set_password(self, user: str, password: str) -> None:
        """Replace the password of ``user`` (audited as ``password-changed``)."""
        with self._hash_slot():
            self.node.users.set_password(user, password)

    # --- plans ------------------------------------------------------------------------------

    def plans(self) -> list[dict[str, Any]]:
        """Every submitted plan: pending first, then newest first."""
        entries = self.node.plans.list()
        entries.sort(key=lambda e: (e["status"] != "pending", -e["submitted_at"]))
        return entries

    def plan(self, sha256: str) -> dict[str, Any]:
        """One plan's entry, with its source files (``ConfigurationError`` if unknown)."""
        return self.node.plans.get(sha256)

    def approve(self, sha256: str, *, user: str, note: str) -> None:
        """Approve a plan (audited as ``plan-approved``)."""
        self.node.plans.approve(sha256, by=user, note=note)

    def reject(self, sha256: str, *, user: str, note: str) -> None:
        """Reject a plan; the researcher sees ``note`` (audited as ``plan-rejected``)."""
        self.node.plans.reject(sha256, by=user, note=note)

    def versions(self, entry: dict[str, Any]) -> list[dict[str, Any]]:
        """Other submissions of the same plan class, newest first: what a diff compares with."""
        return [e for e in self.node.plans.list()[::-1]
                if e["sha256"] != entry["sha256"] and e["entry"] == entry["entry"]]

    def diff(self, sha256: str, against: str) -> str:
        """Unified diff of a plan's source against another version's."""
        return self.node.plans.diff(sha256, against)

    # --- policy -----------------------------------------------------------------------------

    def policy_text(self) -> str:
        """The node's policy settings as TOML, for the editor."""
        return self.node.policy_toml()

    def set_policy_text(self, text: str, *, user: str) -> dict[str, Any]:
        """Validate and save an edited policy; ``ConfigurationError`` says what is wrong."""
        return self.node.set_policy_toml(text, by=user)

    def policy_values(self) -> dict[str, Any]:
        """The policy settings written in ``config.toml`` (a key left out: its default)."""
        from fedcore.governance import SETTINGS

        return {k: v for k, v in self.node.config.items() if k in SETTINGS}

    def set_policy_values(self, values: dict[str, Any], *, user: str) -> dict[str, Any]:
        """Save every setting at once (``None``: the default), checked, written, audited."""
        return self.node.set_policy(by=user, **values)

    @staticmethod
    def policy_settings() -> list[Any]:
        """Every policy key, its type, default and meaning (the editor's reference)."""
        from fedcore.governance import SETTINGS

        return list(SETTINGS.values())

    # --- privacy budget ---------------------------------------------------------------------

    def budgets(self) -> dict[str, dict[str, Any]]:
        """Each dataset's privacy budget row (spent, limit, remaining epsilon), by its id.

        Empty when the policy cannot be read (the node refuses everything meanwhile).
        """
        from fedcore.errors import ConfigurationError
        from fedcore.governance import PrivacyLedger, budget_summary

        try:
            policy = self.node.policy
        except ConfigurationError:
            return {}
        rows = budget_summary(PrivacyLedger(self.node.db), self.node.datasets.list(), policy)
        return {r["dataset"]: r for r in rows}

    # --- audit ------------------------------------------------------------------------------

    def audit(self, event: str, **fields: Any) -> None:
        """Record a GUI event in the node's audit log."""
        self.node.audit(event, **fields)

    def audit_records(self) -> list[dict[str, Any]]:
        """Every audit record, oldest first."""
        return self.node.audit_log()

    def verify_audit(self) -> tuple[bool, str]:
        """Check the audit log's hash chain: (intact, what was found)."""
        report = self.node.verify_audit()
        return bool(report), str(report)
