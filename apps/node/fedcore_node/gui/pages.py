"""Status, datasets, policy, audit log and users pages."""

from __future__ import annotations

import time
from typing import Any

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from werkzeug.wrappers import Response

from fedcore.errors import DatasetError, FedcoreError
from fedcore.node import Node
from fedcore.wire.identity import fingerprint
from fedcore_node.gui._policy_form import fields, parse_form
from fedcore_node.gui.auth import admin_required, governance

bp = Blueprint("pages", __name__)

# Audit events that describe a training round on this node (a governance refusal is a
# "decision" record with allowed=false).
_ROUND_EVENTS = {"trained", "train-failed", "train-refused"}


def _is_round_event(record: dict[str, Any]) -> bool:
    if record.get("event") in _ROUND_EVENTS:
        return True
    return (record.get("event") == "decision" and record.get("kind") == "train"
            and not record.get("allowed", True))


def _node() -> Node:
    node: Node = current_app.extensions["fedcore_node"]
    return node


@bp.app_template_filter("when")
def _when(value: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(value)))
    except (TypeError, ValueError):
        return ""


@bp.route("/")
def status() -> str:
    """The node, the federation it serves, and its recent rounds."""
    node = _node()
    gov = governance()
    records = gov.audit_records()
    rounds = [r for r in records if _is_round_event(r)][-20:][::-1]
    started = [r for r in records if r.get("event") in ("started", "stopped")]
    serving = started[-1] if started and started[-1]["event"] == "started" else None
    pending = sum(1 for p in gov.plans() if p["status"] == "pending")
    try:
        approval = bool(node.policy["approval_required"])
    except FedcoreError:  # an invalid config.toml: the node refuses everything meanwhile
        approval = None
    return render_template(
        "status.html", rounds=rounds, serving=serving, pending=pending, approval=approval,
        n_datasets=len(node.datasets.list()),
        trusted=[(name, fingerprint(key)) for name, key in node.trusted_researchers.items()],
    )


# --- datasets -------------------------------------------------------------------------------

@bp.route("/datasets")
def datasets() -> str:
    """Every registered dataset, and (for admins) the form to add one."""
    return render_template("datasets.html", datasets=_node().datasets.list(),
                           budgets=governance().budgets())


@bp.route("/datasets/<dataset_id>")
def dataset(dataset_id: str) -> str:
    """One dataset's metadata, as researchers see it, and its local details."""
    node = _node()
    try:
        entry = node.datasets.get(dataset_id)
    except DatasetError as exc:
        abort(404, str(exc))
    public = node.datasets.public({**entry, "available": True}, min_count=node.min_count)
    return render_template("dataset.html", entry=entry, public=public,
                           budget=governance().budgets().get(dataset_id))


@bp.route("/datasets", methods=["POST"])
@admin_required
def dataset_add() -> Response:
    """Register a dataset from a file on the node."""
    form = request.form
    tags = [t for t in form.get("tags", "").split(",") if t.strip()]
    entry = _node().datasets.add(form.get("name", "").strip(), tags, form.get("path", ""),
                                 kind=form.get("kind") or None,
                                 description=form.get("description", ""),
                                 by=g.login.user)  # audited with the change
    flash(f"Registered {entry['name']!r} as {entry['id']} "
          f"({entry['metadata'].get('n_samples', '?')} samples).", "info")
    return redirect(url_for("pages.datasets"))


@bp.route("/datasets/<dataset_id>/remove", methods=["POST"])
@admin_required
def dataset_remove(dataset_id: str) -> Response:
    """Forget a dataset."""
    _node().datasets.remove(dataset_id, by=g.login.user)
    flash(f"Removed {dataset_id}.", "info")
    return redirect(url_for("pages.datasets"))


# --- policy ---------------------------------------------------------------------------------

@bp.route("/policy")
def policy() -> str:
    """The node's policy: a form of every setting for admins, a table for the others."""
    gov = governance()
    return render_template("policy.html", fields=fields(gov.policy_values()),
                           text=gov.policy_text())


@bp.route("/policy", methods=["POST"])
@admin_required
def policy_save() -> Any:
    """Save the policy form: every field is checked first; a mistake is shown at its field."""
    gov = governance()
    typed = {k: str(v) for k, v in request.form.items()}
    values, errors = parse_form(typed)
    if not errors:
        try:
            gov.set_policy_values(values, user=g.login.user)
        except FedcoreError as exc:
            errors = {"": str(exc)}
    if errors:
        flash(f"Not saved: {len(errors)} field(s) to correct, marked below.", "error")
        return render_template("policy.html", fields=fields({}, typed=typed, errors=errors),
                               text=gov.policy_text(), form_error=errors.get("", "")), 400
    flash("Policy saved.", "info")
    return redirect(url_for("pages.policy"))


# --- audit ----------------------------------------------------------------------------------

@bp.route("/audit")
def audit() -> str:
    """The audit log, newest first, optionally filtered by event."""
    records = governance().audit_records()
    event = request.args.get("event", "")
    events = sorted({str(r.get("event", "")) for r in records})
    shown = [r for r in records if not event or r.get("event") == event]
    limit = 500
    return render_template("audit.html", records=shown[::-1][:limit], total=len(shown),
                           limit=limit, events=events, event=event)


@bp.route("/audit/verify", methods=["POST"])
def audit_verify() -> Response:
    """Check the audit log's hash chain and show the outcome above the log."""
    intact, detail = governance().verify_audit()
    flash(("Audit log intact. " if intact else "Audit log BROKEN. ") + detail,
          "info" if intact else "error")
    return redirect(url_for("pages.audit"))


# --- users ----------------------------------------------------------------------------------

@bp.route("/users")
@admin_required
def users() -> str:
    """GUI accounts and their roles."""
    return render_template("users.html", users=governance().users())


@bp.route("/users", methods=["POST"])
@admin_required
def user_add() -> Response:
    """Create an account."""
    form = request.form
    name = form.get("username", "").strip()
    governance().add_user(name, form.get("password", ""), form.get("role", "read-only"))
    flash(f"User {name!r} created.", "info")
    return redirect(url_for("pages.users"))
