"""``mqtt://host:port/<federation>`` and ``mqtts://...``: every endpoint is a broker client.

The researcher and the nodes all dial out to an MQTT broker (paho-mqtt 2.x, MQTT 5, QoS 1).
Topics are per federation and per recipient::

    fedcore/<federation>/to/<recipient>/from/<sender>     messages
    fedcore/<federation>/presence/<role>/<identity>       retained birth message

Presence is a retained birth message, cleared on a clean close and replaced by the
endpoint's last will when it dies, so ``peers()`` lists the live endpoints of the other
role. One MQTT message carries one message of the core, at most ``chunk_size`` bytes (URL
option, default 1 MiB, shrunk to fit when an MQTT 5 broker announces a smaller maximum
packet size): that is the transport's ``max_frame_size``, and the core cuts larger frames
into chunks (:mod:`fedcore.wire.chunks`). The endpoint tells the broker, in its CONNECT, the
largest packet it accepts, so nobody can push a larger message to it. Messages are signed
end to end by the core (:mod:`fedcore.wire.signing`), so bytes injected or altered by anyone
allowed to publish on the broker are refused, and QoS 1 duplicates are dropped there.

paho runs on the endpoint's event loop (its external-loop API: the loop watches the socket
and calls paho to read, write and keep the connection alive), so a message reaches the core
and a publish reaches the socket without a hand-over between threads; only the blocking
connection (TCP, TLS handshake) runs on a worker thread. A received message is a read-only
view of the packet paho read, not a copy (:mod:`fedcore_transport._paho`: paho's own
decoding copies each payload four times). Received messages wait in a bounded
inbox (``inbox_bytes``, 8 MiB by default). When it is full, the endpoint stops reading its
socket (up to half the keepalive), so the broker stops sending and queues for this endpoint
(up to its ``max_queued_messages``); a message that still finds no room after that wait is
dropped with a log line (its frame is then incomplete, and dropped by the core).

The endpoint reconnects by itself (``retry_max`` caps the backoff); on every connection it
subscribes and announces itself again, so a broker restart is survived. Frames in flight
during the outage may be lost: correlation and timeouts live in the core.

Strangers flooding the inbox: a node's inbox is one subscription per sender name. When more
than ``strangers_per_s`` messages a second (default 100 on a node, 0 = never on a
researcher) come from sender names the core never verified, the node subscribes to the
topics of the senders it verified alone for ``strangers_shut_s`` seconds (default 10), so the
broker discards the strangers' messages instead of queueing them ahead of its researcher's
(:mod:`fedcore_transport._door`). Against a stranger who publishes under the researcher's own
name, only the broker's ACL helps (docs/deployment.md).

URL options: ``username``, ``password_file``, ``cafile``, ``certfile``/``keyfile``
(``mqtts://``), ``chunk_size``, ``keepalive``, ``retry_max``, ``connect_timeout``,
``strangers_per_s``, ``strangers_shut_s``.

Credentials: the user name comes from the URL (``mqtt://site-a@broker/...`` or
``?username=``) or ``$FEDCORE_MQTT_USERNAME``; the password, best kept out of the URL, from
the file named by ``?password_file=`` or ``$FEDCORE_MQTT_PASSWORD_FILE`` (its first line), or
from ``$FEDCORE_MQTT_PASSWORD``. A password written in the URL (``user:password@`` or
``?password=``) still works, but the URL is then never shown whole: every log line, audit
record, page and file shows it through :func:`fedcore.transport.redact_url`, and a URL shown
that way (``user:***@``) may be given back, the password then coming from the file or the
environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import ssl as ssl_lib
import threading
import time
import uuid
from collections import deque
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fedcore.errors import ConfigurationError, TransportError
from fedcore.transport import REDACTED, Capabilities, Inbox, Role, Transport, redact_url
from fedcore_transport._door import CLOSED_S, STRANGERS_PER_S, Door
from fedcore_transport._paho import Client
from fedcore_transport._tls import tls_problem

__all__ = ["MqttTransport"]

log = logging.getLogger("fedcore.transport.mqtt")

_QUERY_KEYS = {"username", "password", "password_file", "cafile", "certfile", "keyfile",
               "chunk_size", "keepalive", "retry_max", "connect_timeout", "strangers_per_s",
               "strangers_shut_s"}
_PRESENCE_VERSION = 1
_WINDOW = 64  # messages published and not yet acknowledged by the broker, per endpoint
_AUTH_FAILURES = {"Bad user name or password", "Not authorized"}
_PACKET_SLACK = 4096  # topic and properties of a packet, on top of its payload


class MqttTransport(Transport):
    """A researcher or node endpoint of a federation that meets on an MQTT broker."""

    capabilities = Capabilities(max_frame_size=1 << 20, ordered=True, broadcast=False,
                                networked=True)

    def __init__(self, url: str, *, role: Role, identity: str,
                 ssl: ssl_lib.SSLContext | None = None, chunk_size: int = 1 << 20,
                 keepalive: int = 20, retry_max: float = 3.0, connect_timeout: float = 10.0,
                 inbox_bytes: int = 8 << 20, strangers_per_s: int | None = None,
                 strangers_shut_s: float = CLOSED_S):
        super().__init__(url, role=role, identity=identity)
        parts = urlsplit(url)
        try:
            port, bad_port = parts.port, False
        except ValueError:
            port, bad_port = None, True
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or bad_port:
            raise ConfigurationError(
                f"Expected mqtt://HOST[:PORT]/FEDERATION or mqtts://... Received: "
                f"{redact_url(url)!r}")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = sorted(set(query) - _QUERY_KEYS)
        if unknown:
            raise ConfigurationError(f"Unknown option(s) {unknown} in {redact_url(url)!r}. "
                                     f"Expected some of {sorted(_QUERY_KEYS)}.")
        self.federation = parts.path.strip("/") or "default"
        _check_name("federation", self.federation, slash=True)
        _check_name("identity", identity, slash=False)
        tls = parts.scheme == "mqtts"
        if ssl is not None and not tls:
            raise ConfigurationError(f"An ssl context was given for {redact_url(url)!r}: "
                                     "use mqtts://.")
        self._host = parts.hostname
        self._port = port or (8883 if tls else 1883)
        self._where = f"{parts.scheme}://{self._host}:{self._port}/{self.federation}"
        try:
            self._chunk = int(query.get("chunk_size", chunk_size))
            keepalive = int(query.get("keepalive", keepalive))
            retry_max = float(query.get("retry_max", retry_max))
            self._connect_timeout = float(query.get("connect_timeout", connect_timeout))
            if strangers_per_s is None:  # see verified(): only a node shuts strangers out
                strangers_per_s = STRANGERS_PER_S if role == "node" else 0
            strangers_per_s = int(query.get("strangers_per_s", strangers_per_s))
            strangers_shut_s = float(query.get("strangers_shut_s", strangers_shut_s))
        except ValueError as exc:
            raise ConfigurationError(f"Bad number in {redact_url(url)!r}: {exc}") from exc
        if self._chunk < 2048:
            raise ConfigurationError(f"chunk_size must be at least 2048 bytes. "
                                     f"Received: {self._chunk}")
        self._set_chunk(self._chunk)
        self._inbox_bytes = inbox_bytes
        username, password = _credentials(query, parts.username, parts.password)
        self._session = uuid.uuid4().int & 0xFFFFFFFF
        other = "node" if role == "researcher" else "researcher"
        root = f"fedcore/{self.federation}"
        if strangers_per_s < 0 or strangers_shut_s <= 0:
            raise ConfigurationError(
                f"Expected strangers_per_s >= 0 (0: never shut strangers out) and "
                f"strangers_shut_s > 0. Received: {strangers_per_s}, {strangers_shut_s}")
        self._door = Door(f"{root}/to/{identity}/from/", self._resubscribe,
                          strangers_per_s=strangers_per_s, closed_s=strangers_shut_s)
        self._reopen: asyncio.TimerHandle | None = None
        self._last_shut = -1e9
        self._outbox = f"{root}/to/{{peer}}/from/{identity}"
        self._presence = f"{root}/presence/{role}/{identity}"
        self._peer_presence = f"{root}/presence/{other}/"
        self._birth = json.dumps({"fedcore": _PRESENCE_VERSION, "role": role,
                                  "identity": identity, "session": self._session}).encode()

        client = Client(CallbackAPIVersion.VERSION2,
                        client_id=f"fedcore-{role}-{identity}-{self._session:08x}"[:64],
                        protocol=paho.MQTTv5)
        if username:
            client.username_pw_set(username, password)
        self._tls = (ssl or _ssl_context(query)) if tls else None
        self._client_cert = bool(query.get("certfile")) if ssl is None else None
        if self._tls is not None:
            client.tls_set_context(self._tls)
        offline = json.dumps({"fedcore": _PRESENCE_VERSION, "role": role, "identity": identity,
                              "session": self._session, "online": False}).encode()
        client.will_set(self._presence, offline, qos=1, retain=True)
        client.reconnect_delay_set(0.1, retry_max)  # type: ignore[arg-type]  # floats work
        client.max_inflight_messages_set(_WINDOW)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        self._client = client
        self._keepalive = keepalive
        self._retry_max = retry_max
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0  # the loop's thread: paho calls back from a worker while dialing
        self._keeper: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()  # close(): the keeper stops dialing
        self._gone = asyncio.Event()  # the socket closed
        self._sock: Any = None  # the socket the loop watches
        self._writing = False  # a flush is scheduled or the loop waits for the socket to drain
        self._reading = False
        self._held: deque[tuple[str, bytes]] = deque()  # received while the inbox was full
        self._draining: asyncio.Task[None] | None = None
        self._inbox = Inbox(self.identity, self._inbox_bytes)
        self._peers: dict[str, int] = {}  # identity -> session
        self._connected = False
        self._accepted = False  # the broker accepted the connection being kept
        self._first: asyncio.Future[str | None] | None = None  # None: connected; str: refusal
        self._unacked = 0  # messages published and not yet acknowledged by the broker
        self._acked = asyncio.Event()
        self._goodbye: tuple[int, asyncio.Event] | None = None  # mid of the presence cleared
        self._closing = False

    # --- the interface ----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to the broker; return once connected.

        Raises ``TransportError`` when the broker refuses the credentials, and (researcher)
        when it cannot be reached within ``connect_timeout``. A node keeps trying in the
        background instead, as a websocket node waits for its researcher.
        """
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._inbox, self._acked = Inbox(self.identity, self._inbox_bytes), asyncio.Event()
        self._stop, self._gone = asyncio.Event(), asyncio.Event()
        self._held.clear()
        self._first = self._loop.create_future()
        self._closing = False
        limits = Properties(PacketTypes.CONNECT)  # nobody may push a larger packet to us
        limits.MaximumPacketSize = self._chunk + _PACKET_SLACK
        self._client.connect_async(self._host, self._port, keepalive=self._keepalive,
                                   properties=limits)
        self._keeper = asyncio.create_task(self._keep_connected())
        try:
            refusal = await asyncio.wait_for(asyncio.shield(self._first),
                                             self._connect_timeout)
        except TimeoutError:
            problem = None
            if self._tls is not None:  # paho hides why a TLS handshake failed: ask TLS
                problem = await asyncio.get_running_loop().run_in_executor(
                    None, functools.partial(tls_problem, self._host, self._port, self._tls,
                                            client_cert=self._client_cert))
            if self.role == "node":
                if problem:
                    log.warning("Cannot connect to the MQTT broker at %s: %s. Still trying.",
                                self._where, problem)
                else:
                    log.warning("Cannot reach the MQTT broker at %s yet; still trying.",
                                self._where)
                return
            await self._stop_client()
            if problem:
                raise TransportError(f"Cannot connect to the MQTT broker at {self._where}: "
                                     f"{problem}.") from None
            raise TransportError(f"Cannot reach the MQTT broker at {self._where} within "
                                 f"{self._connect_timeout:g} s.") from None
        if refusal is not None:
            await self._stop_client()
            raise TransportError(f"The MQTT broker at {self._where} refused {self.identity!r}: "
                                 f"{refusal}. Check the username (URL user@ or "
                                 f"$FEDCORE_MQTT_USERNAME) and the password (the file named by "
                                 f"?password_file= or $FEDCORE_MQTT_PASSWORD_FILE, or "
                                 f"$FEDCORE_MQTT_PASSWORD).")

    async def send(self, peer: str, frame: bytes) -> None:
        if len(frame) > self.capabilities.max_frame_size:
            raise TransportError(f"Frame of {len(frame)} bytes is too large for {self._where} "
                                 f"(at most {self.capabilities.max_frame_size}).")
        if peer not in self._peers:
            raise TransportError(f"No peer {peer!r} is connected to {self._where}. "
                                 f"Connected: {sorted(self._peers)}")
        while self._unacked >= _WINDOW:  # backpressure: the broker acknowledges messages
            self._acked.clear()
            await self._acked.wait()
        if not self._connected:
            raise TransportError(f"Lost the MQTT broker at {self._where} while sending to "
                                 f"{peer!r}.")
        info = self._client.publish(self._outbox.format(peer=peer), frame, qos=1)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise TransportError(f"Cannot publish to {self._where}: "
                                 f"{paho.error_string(info.rc)}")
        self._unacked += 1

    async def receive(self) -> tuple[str, bytes]:
        return await self._inbox.get()

    async def close(self) -> None:
        self._closing = True
        if self._reopen is not None:
            self._reopen.cancel()
            self._open_door()
        if self._connected:  # a clean goodbye: clear the retained birth message
            info = self._client.publish(self._presence, b"", qos=1, retain=True)
            self._goodbye = (info.mid, asyncio.Event())
            with contextlib.suppress(TimeoutError):  # the broker went away meanwhile
                await asyncio.wait_for(self._goodbye[1].wait(), 2.0)
            self._goodbye = None
        await self._stop_client()
        self._peers.clear()
        self._inbox.close()

    def peers(self) -> set[str]:
        return set(self._peers)

    def verified(self, peer: str) -> None:
        """While strangers flood the inbox, the senders verified here are still heard.

        See :mod:`fedcore_transport._door`: beyond ``strangers_per_s`` messages a second
        from senders never verified (default 100 on a node; 0, never, on a researcher, which
        hears first from many nodes at once), the endpoint subscribes to its verified
        senders' topics alone for ``strangers_shut_s`` (10 s), then to everyone again.
        """
        self._door.verified(peer)

    # --- the connection, kept on the event loop ---------------------------------------------

    async def _keep_connected(self) -> None:
        """Dial the broker, serve the connection, redial after a backoff, until closed."""
        delay = 0.1
        while not self._closing:
            self._accepted = False
            try:  # TCP connect and TLS handshake block: a worker thread waits for them
                await asyncio.to_thread(self._client.reconnect)
            except OSError:
                self._on_connect_fail(self._client, None)
            else:
                self._watch()
                if self._closing:  # close() came while dialing: hang up at once
                    self._client.disconnect()
                    self._flush()
                while self._sock is not None and not self._closing:
                    with contextlib.suppress(TimeoutError):  # keepalive pings, every second
                        await asyncio.wait_for(self._gone.wait(), 1.0)
                    if not self._gone.is_set():
                        self._client.loop_misc()
                if self._accepted:
                    delay = 0.1
            if self._closing:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, self._retry_max)

    def _watch(self) -> None:
        """Watch the socket paho just opened: read it, and write what paho queued meanwhile."""
        assert self._loop is not None
        sock = self._client.socket()
        if sock is None:
            return
        self._sock = sock
        self._gone.clear()
        self._resume_reading()
        self._writing = True
        self._loop.call_soon(self._flush)

    def _on_readable(self) -> None:
        if not self._reading:  # paused (or closed) since this call was scheduled
            return
        client = self._client
        client.loop_read()  # every packet waiting, up to the messages in flight
        _quickack(client)  # once per read, not per packet
        if self._sock is not None and client.want_write():
            # The acknowledgements of what was just read leave now, before the consumers
            # that read woke up run (a broker lost in between would send it all again).
            self._flush()
        sock: Any = client.socket()
        # TLS: records already decrypted wait in the TLS object, not in the socket.
        if self._reading and sock is not None and getattr(sock, "pending", None) \
                and sock.pending():
            assert self._loop is not None
            self._loop.call_soon(self._on_readable)

    def _pause_reading(self) -> None:
        if self._reading and self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock)
        self._reading = False

    def _resume_reading(self) -> None:
        if not self._reading and self._sock is not None and self._loop is not None:
            self._loop.add_reader(self._sock, self._on_readable)
            self._reading = True

    def _flush(self) -> None:
        """Write what paho queued (once per loop pass, for every publish made meanwhile)."""
        self._writing = False
        if self._sock is None:  # not watched (closed, or still dialing on the worker thread)
            return
        client = self._client
        client.loop_write()
        sock = client.socket()
        if sock is not None and client.want_write():  # the socket is full: wait for room
            assert self._loop is not None
            self._writing = True
            self._loop.add_writer(sock, self._drained)

    def _drained(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.remove_writer(self._sock)
        self._flush()

    def _on_register_write(self, _client: paho.Client, _userdata: Any, _sock: Any) -> None:
        # paho queued a packet: write it on the next pass of the loop (while dialing, paho
        # queues CONNECT on the worker thread; _watch writes it).
        if self._writing or threading.get_ident() != self._loop_thread or self._sock is None:
            return
        assert self._loop is not None
        self._writing = True
        self._loop.call_soon(self._flush)

    def _on_socket_close(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        if sock is not self._sock or self._loop is None:
            return
        loop = self._loop
        if threading.get_ident() != self._loop_thread:  # paho dialing on the worker thread
            loop.call_soon_threadsafe(self._unwatch, sock)
        else:
            self._unwatch(sock)

    def _unwatch(self, sock: Any) -> None:
        if sock is not self._sock or self._loop is None:
            return
        if self._reading:
            self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        self._sock, self._reading, self._writing = None, False, False
        self._gone.set()

    # --- paho's callbacks (on the event loop, inside loop_read and loop_write) ----------------

    def _on_connect(self, client: paho.Client, _userdata: Any, _flags: Any,
                    reason: ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            text = str(reason)
            log.error("The MQTT broker at %s refused %r: %s", self._where, self.identity, text)
            if text in _AUTH_FAILURES and not self._connected_once():
                self._settle_first(text)
                client.disconnect()
            return
        limit = getattr(properties, "MaximumPacketSize", None)
        if limit and self._chunk > limit - _PACKET_SLACK:
            log.info("The broker takes packets up to %d bytes: chunks shrink to fit.", limit)
            self._set_chunk(max(1024, limit - _PACKET_SLACK))
        client.subscribe([(f, 1) for f in self._door.filters()]
                         + [(self._peer_presence + "+", 1), (self._presence, 1)])
        client.publish(self._presence, self._birth, qos=1, retain=True)
        self._connected = self._accepted = True
        log.info("Connected to %s as %s %r", self._where, self.role, self.identity)
        self._settle_first(None)

    def _connected_once(self) -> bool:
        return self._first is not None and self._first.done()

    def _settle_first(self, refusal: str | None) -> None:
        if self._first is not None and not self._first.done():
            self._first.set_result(refusal)

    def _on_connect_fail(self, _client: paho.Client, _userdata: Any) -> None:
        log.info("Cannot reach the MQTT broker at %s; retrying.", self._where)

    def _on_disconnect(self, _client: paho.Client, _userdata: Any, _flags: Any,
                       reason: ReasonCode, _properties: Properties | None) -> None:
        was, self._connected = self._connected, False
        self._lost_broker()
        if was and not self._closing:
            log.warning("Lost the MQTT broker at %s (%s); reconnecting.", self._where, reason)

    def _on_socket_open(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        # Frames are small, latency-bound request/replies: without this, Nagle's algorithm
        # holds a publish back until the broker's delayed ACK of the previous one (~40 ms).
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (AttributeError, OSError):  # not a TCP socket
            pass

    def _on_publish(self, _client: paho.Client, _userdata: Any, mid: int,
                    _reason: ReasonCode, _properties: Properties | None) -> None:
        self._unacked = max(0, self._unacked - 1)
        self._acked.set()
        if self._goodbye is not None and self._goodbye[0] == mid:
            self._goodbye[1].set()

    def _on_message(self, _client: paho.Client, _userdata: Any,
                    message: paho.MQTTMessage) -> None:
        topic = message.topic
        if topic.startswith(self._peer_presence) or topic == self._presence:
            self._on_presence(topic, message.payload)
            return
        sender = topic.rpartition("/")[2]
        door = self._door
        if not door.knows(sender):
            if door.stranger():
                self._door_closed()
            if door.closed:  # what the broker had queued before it heard the door close
                door.shut_out += 1  # counted for the core when the door opens
                return
        screen = self.screen
        if screen is not None and not screen(sender, message.payload):
            return  # junk: dropped (and counted) here, before it costs the core anything
        # A read-only view of the packet paho read (fedcore_transport._paho): not copied.
        payload: bytes = message.payload  # type: ignore[assignment]
        if self._held or self._inbox.full():
            # Stop reading: the broker holds what follows until the consumer catches up.
            self._held.append((sender, payload))
            self._pause_reading()
            if self._draining is None:
                self._draining = asyncio.ensure_future(self._drain())
            return
        self._inbox.put_nowait(sender, payload)

    async def _drain(self) -> None:
        """Queue the messages held while the inbox was full, then read the socket again.

        Reading stops for half the keepalive at most (the broker's PINGRESP must be read in
        time): what finds no room by then is dropped.
        """
        wait = self._keepalive / 2
        deadline = time.monotonic() + wait
        try:
            while self._held:
                sender, payload = self._held[0]
                try:
                    await asyncio.wait_for(self._inbox.put(sender, payload),
                                           max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    log.warning("Dropped a message of %d bytes from %r: the inbox stayed full "
                                "for %g s (the consumer is too slow).", len(payload), sender,
                                wait)
                self._held.popleft()
        finally:
            self._draining = None
            self._resume_reading()

    def _on_presence(self, topic: str, payload: Any) -> None:
        try:
            birth = json.loads(bytes(payload)) if payload else {}
        except ValueError:
            birth = {}
        online = isinstance(birth, dict) and birth.get("online", True) and "session" in birth
        if topic == self._presence:  # our own: a stale last will must not hide us
            if not online and not self._closing and self._connected:
                self._client.publish(self._presence, self._birth, qos=1, retain=True)
            elif online and birth.get("session") != self._session:
                log.warning("Another endpoint also claims to be %s %r on %s.", self.role,
                            self.identity, self._where)
            return
        identity = topic[len(self._peer_presence):]
        session = birth.get("session") if isinstance(birth, dict) else None
        self._presence_changed(identity, bool(online), session)

    # --- on the event loop ------------------------------------------------------------------

    def _set_chunk(self, size: int) -> None:
        self._chunk = size
        self.capabilities = Capabilities(max_frame_size=size, ordered=True, broadcast=False,
                                         networked=True)

    def _presence_changed(self, identity: str, online: bool, session: Any) -> None:
        if online:
            if identity not in self._peers:
                log.info("%r is present on %s", identity, self._where)
            self._peers[identity] = session
        elif session is None or self._peers.get(identity) in (session, None):
            self._peers.pop(identity, None)  # a stale will of an older session is ignored

    def _resubscribe(self, subscribe: list[str], unsubscribe: list[str]) -> None:
        """Change the inbox subscriptions (paho queues the packets in order)."""
        if subscribe:
            self._client.subscribe([(f, 1) for f in subscribe])
        if unsubscribe:
            self._client.unsubscribe(unsubscribe)

    def _door_closed(self) -> None:
        door = self._door
        now = time.monotonic()  # a warning when a flood starts, then one info line per shut
        fresh, self._last_shut = now - self._last_shut > 3 * door.closed_s, now
        (log.warning if fresh else log.info)(
            "More than %d messages a second on %s's inbox at %s come from senders never "
            "verified: for %g s it hears only the senders it verified (shut #%d; a broker "
            "ACL keeps strangers off the inbox: docs/deployment.md).", door.strangers_per_s,
            self.identity, self._where, door.closed_s, door.closures)
        if self._reopen is not None:
            self._reopen.cancel()
        assert self._loop is not None
        self._reopen = self._loop.call_later(door.closed_s, self._open_door)

    def _open_door(self) -> None:
        self._reopen = None
        shut_out = self._door.open()
        if shut_out and self.shed is not None:
            self.shed(shut_out)
        log.info("%s hears every sender on its inbox at %s again (%d messages from strangers "
                 "were dropped unread while it did not).", self.identity, self._where, shut_out)

    def _lost_broker(self) -> None:
        self._peers.clear()  # presence comes back with the retained births on reconnection
        self._unacked = 0  # paho resends what was not acknowledged; stop waiting for it
        self._acked.set()

    async def _stop_client(self) -> None:
        """Hang up (DISCONNECT, so no last will) and stop redialing."""
        self._closing = True
        self._stop.set()
        if self._sock is not None:
            self._client.disconnect()
            self._flush()  # paho closes the socket once DISCONNECT is written
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._gone.wait(), 1.0)
        if self._keeper is not None:
            await self._keeper  # at most one dial in progress (paho's connect timeout)
            self._keeper = None
        if self._sock is not None:  # DISCONNECT still unwritten after a second: drop it
            sock = self._sock
            self._unwatch(sock)
            sock.close()
        if self._draining is not None:
            self._draining.cancel()
        self._held.clear()
        self._connected = False


def _quickack(client: paho.Client) -> None:
    """Acknowledge at once, on Linux, the TCP segments just read (PUBACKs, messages).

    Nothing of ours follows a PUBACK to carry the TCP ACK, so the kernel delays it (~40 ms);
    meanwhile a broker without ``set_tcp_nodelay`` (Mosquitto's default) holds back, by
    Nagle's algorithm, the next small message to us, such as a node's reply. Setting
    ``TCP_QUICKACK`` sends a pending ACK now (the option does not stick: set it each time).
    """
    sock: Any = client.socket()  # a socket, or paho's TLS / websocket wrapper
    if _QUICKACK is not None and sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        except (AttributeError, OSError):
            pass


_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def _check_name(what: str, name: str, *, slash: bool) -> None:
    bad = set("+#\0") | (set() if slash else {"/"})
    if not name or len(name) > 256 or bad & set(name) or "//" in name:
        allowed = "" if slash else " or '/'"
        raise ConfigurationError(f"An MQTT {what} must be 1 to 256 characters without "
                                 f"'+', '#'{allowed}. Received: {name!r}")


def _credentials(query: dict[str, str], user: str | None, secret: str | None
                 ) -> tuple[str | None, str | None]:
    """``(username, password)`` from the URL, a password file or the environment."""
    username = query.get("username") or (unquote(user) if user else None) \
        or os.environ.get("FEDCORE_MQTT_USERNAME") or None
    password = query.get("password") or (unquote(secret) if secret is not None else None)
    if password == REDACTED:  # a URL shown redacted and given back: look elsewhere
        password = None
    path = query.get("password_file") or os.environ.get("FEDCORE_MQTT_PASSWORD_FILE")
    if password is None and path:
        try:
            with open(path, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except OSError as exc:
            raise ConfigurationError(
                f"Cannot read the MQTT password file {path!r}: {exc.strerror}. Expected a "
                "file whose first line is the password (readable by this user only: chmod "
                "600).") from exc
    if password is None:
        password = os.environ.get("FEDCORE_MQTT_PASSWORD") or None
    return username, password


def _ssl_context(query: dict[str, str]) -> ssl_lib.SSLContext:
    certfile, keyfile, cafile = (query.get(k) for k in ("certfile", "keyfile", "cafile"))
    try:
        ctx = ssl_lib.create_default_context(cafile=cafile)
        if certfile:
            ctx.load_cert_chain(certfile, keyfile)
        return ctx
    except (OSError, ssl_lib.SSLError) as exc:
        raise ConfigurationError(f"Cannot load the TLS files {query}: {exc}") from exc
