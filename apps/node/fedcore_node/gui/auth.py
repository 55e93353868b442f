"""Log in and out, server-side sessions, roles, and the login throttle."""

from __future__ import annotations

import functools
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar, cast

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.wrappers import Response

from fedcore_node.gui._governance import Governance

bp = Blueprint("auth", __name__)

F = TypeVar("F", bound=Callable[..., Any])

# Endpoints reachable without logging in.
_PUBLIC = {"auth.login", "static", "highlight_css"}


@dataclass
class Login:
    """One logged-in browser."""

    user: str
    role: str
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def is_admin(self) -> bool:
        """Whether this user may change anything."""
        return self.role == "admin"


class SessionStore:
    """Sessions kept in memory: the cookie carries only a random id.

    A session ends after ``lifetime`` without a request, at logout, and when the server
    restarts; a stolen cookie is useless after any of them.
    """

    def __init__(self, lifetime: timedelta):
        self.lifetime = lifetime.total_seconds()
        self._lock = threading.Lock()
        self._sessions: dict[str, Login] = {}

    def open(self, user: str, role: str) -> str:
        """Start a session; returns its id."""
        sid = secrets.token_urlsafe(32)
        with self._lock:
            self._expire()
            self._sessions[sid] = Login(user, role)
        return sid

    def get(self, sid: str | None) -> Login | None:
        """The live session ``sid``, its idle clock restarted; None when it has expired."""
        if not sid:
            return None
        with self._lock:
            self._expire()
            login = self._sessions.get(sid)
            if login is not None:
                login.last_seen = time.monotonic()
            return login

    def close(self, sid: str | None) -> None:
        """End a session."""
        with self._lock:
            self._sessions.pop(sid or "", None)

    def close_user(self, user: str) -> None:
        """End every session of ``user`` (after a password change, say)."""
        with self._lock:
            for sid in [s for s, login in self._sessions.items() if login.user == user]:
                del self._sessions[sid]

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, login in self._sessions.items()
                    if now - login.last_seen > self.lifetime]:
            del self._sessions[sid]


class LoginThrottle:
    """Slows password guessing: after ``limit`` failures, a user name is locked a while."""

    def __init__(self, limit: int = 5, lock_seconds: float = 60.0):
        self.limit = limit
        self.lock_seconds = lock_seconds
        self._lock = threading.Lock()
        self._failures: dict[str, tuple[int, float]] = {}

    def locked_for(self, user: str) -> float:
        """Seconds until ``user`` may try again (0 when it may now)."""
        with self._lock:
            count, since = self._failures.get(user, (0, 0.0))
            if count < self.limit:
                return 0.0
            left = self.lock_seconds - (time.monotonic() - since)
            if left <= 0:
                del self._failures[user]
                return 0.0
            return left

    def failed(self, user: str) -> None:
        """Count a failed attempt."""
        with self._lock:
            count, _ = self._failures.get(user, (0, 0.0))
            self._failures[user] = (count + 1, time.monotonic())

    def succeeded(self, user: str) -> None:
        """Forget the failures of ``user``."""
        with self._lock:
            self._failures.pop(user, None)


def _sessions() -> SessionStore:
    return cast(SessionStore, current_app.extensions["fedcore_sessions"])


def governance() -> Governance:
    """The adapter to the node's governance for the current app."""
    return cast(Governance, current_app.extensions["fedcore_governance"])


def load_user() -> Response | None:
    """Before every request: find the session's user, or send the browser to log in."""
    g.login = login = _sessions().get(session.get("sid"))
    if login is not None:
        # The role is read afresh: a demoted or deleted account loses its rights at once.
        role = governance().role_of(login.user)
        if role is None:
            _sessions().close(session.get("sid"))
            g.login = None
        else:
            login.role = role
    if g.login is None and request.endpoint not in _PUBLIC:
        if request.method == "GET":
            return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
        abort(401, "Your session has expired. Log in again.")
    return None


def admin_required(view: F) -> F:
    """Let only administrators through; read-only users get 403."""
    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if g.login is None or not g.login.is_admin:
            abort(403, "This needs an administrator; your account is read-only.")
        return view(*args, **kwargs)
    return cast(F, wrapped)


def template_context() -> dict[str, Any]:
    """Variables every template sees."""
    node = current_app.extensions["fedcore_node"]
    return {"login": g.get("login"), "node": node}


def _safe_next(target: str | None) -> str:
    # Only paths on this site: never an absolute URL an attacker could slip in.
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("pages.status")


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    """The login form; on success a new session replaces whatever the browser had."""
    gov = governance()
    if not gov.has_users():
        return render_template("no_users.html", home=gov.node.home), 503
    if request.method == "GET":
        return render_template("login.html", next=request.args.get("next", ""))
    user = request.form.get("username", "").strip()
    password = request.form.get("password", "")
    throttle = current_app.extensions["fedcore_throttle"]
    wait = throttle.locked_for(user)
    if wait:
        flash(f"Too many failed attempts. Try again in {int(wait) + 1} s.", "error")
        return render_template("login.html", next=request.form.get("next", "")), 429
    role = gov.check_password(user, password)  # the users module audits the attempt
    if role is None:
        throttle.failed(user)
        flash("Wrong user name or password.", "error")
        return render_template("login.html", next=request.form.get("next", "")), 401
    throttle.succeeded(user)
    _sessions().close(session.get("sid"))
    session.clear()  # no fixation: the old session (and its CSRF token) is dropped
    session.permanent = True
    session["sid"] = _sessions().open(user, role)
    return redirect(_safe_next(request.form.get("next")))


@bp.route("/logout", methods=["POST"])
def logout() -> Response:
    """End the session."""
    if g.login is not None:
        governance().audit("logout", user=g.login.user)
    _sessions().close(session.get("sid"))
    session.clear()
    flash("Logged out.", "info")
    return redirect(url_for("auth.login"))


@bp.route("/account", methods=["GET", "POST"])
def account() -> Any:
    """Change one's own password (which ends one's other sessions)."""
    if request.method == "GET":
        return render_template("account.html")
    gov = governance()
    current = request.form.get("current", "")
    new = request.form.get("new", "")
    if gov.check_password(g.login.user, current) is None:
        flash("The current password is wrong.", "error")
        return render_template("account.html"), 400
    if new != request.form.get("confirm", ""):
        flash("The new passwords differ.", "error")
        return render_template("account.html"), 400
    gov.set_password(g.login.user, new)
    _sessions().close_user(g.login.user)
    session.clear()
    flash("Password changed. Log in with the new one.", "info")
    return redirect(url_for("auth.login"))
