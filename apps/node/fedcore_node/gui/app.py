"""The Flask application: configuration, security headers, and the built-in server."""

from __future__ import annotations

import ipaddress
import logging
import secrets
import ssl
from datetime import timedelta
from typing import Any

from flask import Flask, Response, render_template
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException
from werkzeug.serving import BaseWSGIServer, make_server

from fedcore.errors import FedcoreError
from fedcore.node import Node
from fedcore_node.gui import _governance, auth, pages, plans

log = logging.getLogger("fedcore_node.gui")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8484
DEFAULT_SESSION_MINUTES = 30

# No script runs in these pages and nothing is loaded from elsewhere; forms post back here.
_CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'")


def create_app(
    node: Node,
    *,
    session_minutes: float = DEFAULT_SESSION_MINUTES,
    secure_cookies: bool = False,
    secret_key: bytes | None = None,
    password_checks: int = _governance.DEFAULT_PASSWORD_CHECKS,
    login_limit: int = 5,
    address_limit: int = 20,
) -> Flask:
    """The node administration GUI for ``node`` as a WSGI application.

    Sessions live in the server's memory and end after ``session_minutes`` without a
    request, at logout, and when the server restarts. ``secure_cookies`` marks the session
    cookie HTTPS-only (set it when the GUI is served over TLS). ``secret_key`` signs the
    cookie; by default a fresh random key is drawn for each process.

    Logins: after ``login_limit`` attempts for one user name (``address_limit`` from one
    client address) that failed or are still running, that name (address) is locked for a
    minute; at most ``password_checks`` password hashes (64 MiB each) run at once. Refused
    attempts get HTTP 429 with ``Retry-After`` and check no password.
    """
    if session_minutes <= 0:
        raise ValueError(f"session_minutes must be > 0. Received: {session_minutes!r}")
    app = Flask(__name__)
    lifetime = timedelta(minutes=session_minutes)
    app.config.update(
        SECRET_KEY=secret_key or secrets.token_bytes(32),
        SESSION_COOKIE_NAME="fedcore_node_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=secure_cookies,
        PERMANENT_SESSION_LIFETIME=lifetime,
        WTF_CSRF_TIME_LIMIT=int(lifetime.total_seconds()),
        MAX_CONTENT_LENGTH=1 << 20,
        TEMPLATES_AUTO_RELOAD=False,
    )
    app.extensions["fedcore_node"] = node
    app.extensions["fedcore_governance"] = _governance.Governance(
        node, password_checks=password_checks)
    app.extensions["fedcore_sessions"] = auth.SessionStore(lifetime)
    app.extensions["fedcore_throttle"] = auth.LoginThrottle(login_limit,
                                                            address_limit=address_limit)
    CSRFProtect(app)
    app.register_blueprint(auth.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(plans.bp)
    app.before_request(auth.load_user)
    app.after_request(_security_headers)
    app.context_processor(auth.template_context)
    app.register_error_handler(CSRFError, _csrf_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(FedcoreError, _fedcore_error)
    app.register_error_handler(_governance.PasswordsBusy, _busy)
    app.add_url_rule("/highlight.css", "highlight_css", plans.highlight_css)
    return app


def _security_headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", _CSP)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response


def _csrf_error(exc: CSRFError) -> tuple[str, int]:
    return render_template("error.html", title="Form refused",
                           message=f"{exc.description} Reload the page and try again."), 400


def _http_error(exc: HTTPException) -> tuple[str, int]:
    return render_template("error.html", title=f"{exc.code} {exc.name}",
                           message=exc.description or ""), exc.code or 500


def _busy(exc: _governance.PasswordsBusy) -> Response:
    response = Response(render_template(
        "error.html", title="Busy", message="The node is checking other passwords right "
        "now. Try again in a second."), 429)
    response.headers["Retry-After"] = "1"
    return response


def _fedcore_error(exc: FedcoreError) -> tuple[str, int]:
    return render_template("error.html", title="Not done", message=str(exc)), 400


def make_gui_server(
    node: Node,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    certfile: str | None = None,
    keyfile: str | None = None,
    **app_options: Any,
) -> BaseWSGIServer:
    """A threaded HTTP(S) server for the GUI, bound but not yet serving.

    Call ``serve_forever()`` on it (in a thread if needed) and ``shutdown()`` to stop it;
    ``server.port`` is the port it got (useful with ``port=0``).
    """
    context = None
    if certfile:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certfile, keyfile)
        app_options.setdefault("secure_cookies", True)
    elif not _is_loopback(host):
        log.warning("Serving the node GUI on %s without TLS: passwords and session cookies "
                    "cross the network in clear. Give a certificate, or bind to 127.0.0.1 "
                    "and reach it through an SSH tunnel.", host)
    app = create_app(node, **app_options)
    return make_server(host, port, app, threaded=True, ssl_context=context)


def serve(
    node: Node,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    **options: Any,
) -> None:
    """Serve the GUI for ``node`` on ``host:port`` until interrupted.

    Options are those of :func:`make_gui_server` and :func:`create_app`.
    """
    server = make_gui_server(node, host, port, **options)
    scheme = "https" if options.get("certfile") else "http"
    log.info("fedcore node GUI on %s://%s:%d/", scheme, host, server.port)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
