"""Why a TLS connection fails, in words that say which file to add to the URL.

A failed handshake reaches fedcore's transports in shapes that hide its cause: paho-mqtt
only calls ``on_connect_fail`` and retries, so a missing CA looks like a broker that never
answers; websockets reports a server that dropped a client without a certificate as "did not
receive a valid HTTP response". :func:`tls_problem` opens one TLS connection of its own with
the same context and reads the handshake's own error.
"""

from __future__ import annotations

import socket
import ssl

__all__ = ["tls_problem"]

_READ_S = 1.0  # after the handshake: a server that refuses our certificate says so at once


def tls_problem(host: str, port: int, context: ssl.SSLContext, *,
                client_cert: bool | None = None, timeout: float = 3.0) -> str | None:
    """What is wrong with TLS to ``host:port`` under ``context``; ``None`` when nothing is.

    ``client_cert`` says whether ``context`` holds a client certificate (``None``: unknown).
    ``None`` is returned also when the host cannot be reached at all: that is not a TLS
    problem, and the caller's own message ("cannot reach") says it.
    """
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    try:
        name = host if context.check_hostname else None
        with context.wrap_socket(raw, server_hostname=name) as tls:
            # TLS 1.3 finishes the client's handshake before the server has checked the
            # client's certificate: its refusal arrives with the first read.
            tls.settimeout(_READ_S)
            try:
                first = tls.recv(1)
            except TimeoutError:
                return None
            except ssl.SSLError as exc:
                return _explain(exc)
            except OSError:
                return None
            if not first and client_cert is False:
                # Closed before any request, and without an alert (Python's asyncio servers
                # close so when the client certificate they require is missing).
                return ("the server closed the connection right after the TLS handshake: it "
                        "requires a client certificate and this side has none. Add "
                        "?certfile=PATH&keyfile=PATH (a certificate signed by the CA the "
                        "server trusts) to the URL")
            return None
    except ssl.SSLCertVerificationError as exc:
        return (f"this side does not trust the server's TLS certificate "
                f"({exc.verify_message or exc.reason}): give the CA certificate that signed it "
                "with ?cafile=PATH in the URL")
    except ssl.SSLError as exc:
        return _explain(exc)
    except OSError:
        return None
    finally:
        raw.close()


def _explain(exc: ssl.SSLError) -> str:
    text = f"{exc.reason or ''} {exc}".lower()
    if "certificate required" in text or "certificate_required" in text:
        return ("the server requires a client certificate and got none. Add "
                "?certfile=PATH&keyfile=PATH (a certificate signed by the CA the server "
                "trusts) to the URL")
    if "unknown ca" in text or "bad certificate" in text or "certificate unknown" in text:
        return ("the server refused this side's client certificate (it does not trust the CA "
                "that signed it): use a certificate signed by the CA the server names in its "
                "cafile")
    return f"the TLS handshake failed: {exc.reason or exc}"
