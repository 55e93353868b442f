"""Training plans: pending first, highlighted source, hash, diff, approve or reject."""

from __future__ import annotations

import functools

from flask import Blueprint, abort, flash, g, redirect, render_template, request, url_for
from markupsafe import Markup
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import DiffLexer, PythonLexer
from werkzeug.wrappers import Response

from fedcore.errors import ConfigurationError
from fedcore_node.gui.auth import admin_required, governance

bp = Blueprint("plans", __name__, url_prefix="/plans")

_FORMATTER = HtmlFormatter(linenos="table", cssclass="highlight")
_DIFF_FORMATTER = HtmlFormatter(cssclass="highlight")


@functools.cache
def _css() -> str:
    return str(_FORMATTER.get_style_defs(".highlight"))


def highlight_css() -> Response:
    """Pygments' colours, served from here (the CSP allows no inline style)."""
    return Response(_css(), mimetype="text/css")


@bp.route("/")
def index() -> str:
    """Every submitted plan, pending ones first."""
    return render_template("plans.html", plans=governance().plans())


@bp.route("/<sha256>")
def show(sha256: str) -> str:
    """One plan: its hash, its source highlighted, a diff with an earlier version."""
    gov = governance()
    try:
        entry = gov.plan(sha256)
    except ConfigurationError as exc:
        abort(404, str(exc))
    files = {name: Markup(highlight(text, PythonLexer(), _FORMATTER))
             for name, text in sorted(entry.get("files", {}).items())}
    versions = gov.versions(entry)
    against = request.args.get("against") or (versions[0]["sha256"] if versions else "")
    diff = None
    if against:
        if against not in {v["sha256"] for v in versions}:
            abort(404, f"No other version {against!r} of this plan.")
        text = gov.diff(entry["sha256"], against)
        diff = Markup(highlight(text, DiffLexer(), _DIFF_FORMATTER)) if text else ""
    return render_template("plan.html", plan=entry, files=files, versions=versions,
                           against=against, diff=diff)


def _note() -> str:
    return request.form.get("note", "").strip()


@bp.route("/<sha256>/approve", methods=["POST"])
@admin_required
def approve(sha256: str) -> Response:
    """Approve a plan: the node will run it from the next round on."""
    governance().approve(sha256, user=g.login.user, note=_note())
    flash(f"Approved plan {sha256[:12]}.", "info")
    return redirect(url_for("plans.show", sha256=sha256))


@bp.route("/<sha256>/reject", methods=["POST"])
@admin_required
def reject(sha256: str) -> Response:
    """Reject a plan; the note is the reason the researcher sees."""
    note = _note()
    if not note:
        flash("Say why in the note: the researcher sees it.", "error")
        return redirect(url_for("plans.show", sha256=sha256))
    governance().reject(sha256, user=g.login.user, note=note)
    flash(f"Rejected plan {sha256[:12]}.", "info")
    return redirect(url_for("plans.show", sha256=sha256))
