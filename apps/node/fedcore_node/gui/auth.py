"""Log in and out, server-side sessions, roles, and the login throttle."""

from __future__ import annotations

import functools
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar, cast
from urllib.parse import unquote, urlsplit

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

from fedcore_node.gui._governance import Governance, PasswordsBusy

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


@dataclass
class _Tries:
    failures: int = 0
    running: int = 0  # attempts started and not finished: they count already
    last: float = 0.0  # time of the last failure


class LoginThrottle:
    """Slows password guessing, per user name and per client address.

    An attempt counts from the moment it starts: after ``limit`` attempts for one user name
    (``address_limit`` from one address) that failed or are still being checked, further
    attempts are refused without a password check until ``lock_seconds`` after the last
    failure. So 40 guesses sent at once for one user check at most ``limit`` passwords. A
    success forgets the user name's failures. At most ``max_entries`` names and addresses
    are remembered (idle ones are forgotten first).
    """

    def __init__(self, limit: int = 5, lock_seconds: float = 60.0, *,
                 address_limit: int = 20, max_entries: int = 10_000):
        self.limit = limit
        self.address_limit = address_limit
        self.lock_seconds = lock_seconds
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._tries: OrderedDict[tuple[str, str], _Tries] = OrderedDict()

    def begin(self, user: str, address: str) -> float:
        """Start an attempt: 0 when it may go on (it counts from now), else seconds to wait."""
        keys = (("user", user), ("address", address))
        with self._lock:
            now = time.monotonic()
            tries = [self._entry(key, now) for key in keys]
            wait = max(self._wait(t, limit, now) for t, limit in
                       zip(tries, (self.limit, self.address_limit), strict=True))
            if wait:
                return wait
            for t in tries:
                t.running += 1
            return 0.0

    def failed(self, user: str, address: str) -> None:
        """An attempt begun with :meth:`begin` found a wrong password."""
        with self._lock:
            for key in (("user", user), ("address", address)):
                t = self._tries.setdefault(key, _Tries())
                t.running, t.failures, t.last = max(t.running - 1, 0), t.failures + 1, \
                    time.monotonic()

    def succeeded(self, user: str, address: str) -> None:
        """An attempt begun with :meth:`begin` logged in: the user name's failures go."""
        self.cancel(user, address)
        with self._lock:
            self._tries.pop(("user", user), None)

    def cancel(self, user: str, address: str) -> None:
        """An attempt begun with :meth:`begin` checked no password after all."""
        with self._lock:
            for key in (("user", user), ("address", address)):
                t = self._tries.get(key)
                if t is not None:
                    t.running = max(t.running - 1, 0)

    def _entry(self, key: tuple[str, str], now: float) -> _Tries:
        t = self._tries.get(key)
        if t is None:
            if len(self._tries) >= self.max_entries:
                self._forget_idle(now)
            t = self._tries[key] = _Tries()
        else:
            self._tries.move_to_end(key)
        if t.failures and now - t.last >= self.lock_seconds:
            t.failures = 0  # the lock (or the count towards it) has expired
        return t

    def _wait(self, t: _Tries, limit: int, now: float) -> float:
        if t.failures + t.running < limit:
            return 0.0
        if t.failures >= limit:
            return max(self.lock_seconds - (now - t.last), 0.001)
        return 1.0  # attempts still running may yet fail: ask again in a moment

    def _forget_idle(self, now: float) -> None:
        for key in [k for k, t in self._tries.items() if not t.running
                    and (not t.failures or now - t.last >= self.lock_seconds)]:
            del self._tries[key]
        while len(self._tries) >= self.max_entries:  # everyone is busy: drop the oldest
            self._tries.popitem(last=False)


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


def safe_next(target: str | None) -> str:
    """``target`` when it is a path on this site, else the status page.

    Only a relative path that starts with one ``/`` passes: never ``//host``, a slash and
    a backslash, a scheme, a host, a control character, or anything a browser would read
    as another site once it has normalised it (backslashes count as slashes, tabs and new
    lines are dropped).
    """
    fallback = url_for("pages.status")
    if not target or len(target) > 2048:
        return fallback
    if any(ord(c) < 0x21 or c == "\x7f" for c in target):
        return fallback  # browsers drop tabs and new lines: "/\t/evil" is "//evil"
    browser_view = target.replace("\\", "/")
    parts = urlsplit(browser_view)
    path = unquote(browser_view.partition("?")[0].partition("#")[0])
    # No "//" and no "." or ".." segment anywhere: once resolved, either could leave a
    # path that starts with "//", and no page of the GUI needs them.
    if (not browser_view.startswith("/") or parts.scheme or parts.netloc or "//" in path
            or any(segment in (".", "..") for segment in path.split("/"))):
        return fallback
    return target


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    """The login form; on success a new session replaces whatever the browser had."""
    gov = governance()
    if not gov.has_users():
        return render_template("no_users.html", home=gov.node.home), 503
    if request.method == "GET":
        return render_template("login.html", next=request.args.get("next", ""))
    user = request.form.get("username", "").strip()
    role = _check_password(user, request.form.get("password", ""), "login.html",
                           next=request.form.get("next", ""))
    if role is None:
        flash("Wrong user name or password.", "error")
        return render_template("login.html", next=request.form.get("next", "")), 401
    _sessions().close(session.get("sid"))
    session.clear()  # no fixation: the old session (and its CSRF token) is dropped
    session.permanent = True
    session["sid"] = _sessions().open(user, role)
    return redirect(safe_next(request.form.get("next")))


def _check_password(user: str, password: str, template: str, **context: Any) -> str | None:
    """The role of ``user`` if ``password`` is right, else None; throttled.

    The attempt counts before the password is checked; when the user name or the address
    is locked, or every password-hashing slot is busy, the request ends here with 429 and
    ``Retry-After`` (``template`` shown again with the reason).
    """
    throttle: LoginThrottle = current_app.extensions["fedcore_throttle"]
    address = request.remote_addr or "?"
    wait = throttle.begin(user, address)
    if wait:
        _too_many(f"Too many login attempts. Try again in {math.ceil(wait)} s.", wait,
                  template, context)
    try:
        role = governance().check_password(user, password)  # audited by the users module
    except PasswordsBusy:
        throttle.cancel(user, address)
        _too_many("The node is checking other logins right now. Try again in a second.",
                  1.0, template, context)
    except Exception:
        throttle.cancel(user, address)
        raise
    if role is None:
        throttle.failed(user, address)
    else:
        throttle.succeeded(user, address)
    return role


def _too_many(message: str, wait: float, template: str, context: dict[str, Any]) -> None:
    """End the request with 429, ``Retry-After`` and ``template`` showing ``message``."""
    flash(message, "error")
    response = current_app.make_response((render_template(template, **context), 429))
    response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
    abort(response)


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
    # The current password is a login attempt too: a stolen session cannot guess it faster.
    if _check_password(g.login.user, current, "account.html") is None:
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
