"""The MQTT transport against a real Mosquitto broker that each test module starts itself.

The conformance suite over mqtt:// and mqtts:// (with a password file), wrong credentials,
a broker restart mid-conversation, a foreign message injected on a node's topic, and a
federation of node processes that trains exactly as the same federation in one process does.
The system broker (port 1883) is never touched: every broker here listens on a free loopback
port with a configuration generated in a temporary folder.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("paho.mqtt")

from fedcore import Node
from fedcore.errors import ConfigurationError, TransportError  # noqa: E402
from fedcore.testing.transport import Endpoints, TransportConformance, wait_until  # noqa: E402
from fedcore.transport import open_transport  # noqa: E402
from fedcore.wire import codec  # noqa: E402
from fedcore.wire.chunks import ChunkedTransport  # noqa: E402
from fedcore.wire.identity import researcher_identity  # noqa: E402
from fedcore.wire.messages import Envelope, ErrorReply, Ping, Pong  # noqa: E402
from fedcore.wire.signing import Guard  # noqa: E402
from fedcore_transport.mqtt import MqttTransport  # noqa: E402
from tests._support.mqtt import Broker, fed, require_mosquitto  # noqa: E402
from tests._support.trust import enroll  # noqa: E402

require_mosquitto()  # scripts/test.sh installs it; say so rather than skip

USER, PASSWORD = "fedcore", "s3cret pass"


def _password_file(path: Path) -> Path:
    tool = shutil.which("mosquitto_passwd")
    if tool:
        subprocess.run([tool, "-b", "-c", str(path), USER, PASSWORD], check=True,
                       capture_output=True)
    else:  # Mosquitto's own format: $6$ salt $ sha512(password + salt), base64
        import base64
        import hashlib

        salt = os.urandom(12)
        digest = hashlib.sha512(PASSWORD.encode() + salt).digest()
        path.write_text(f"{USER}:$6${base64.b64encode(salt).decode()}$"
                        f"{base64.b64encode(digest).decode()}\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("mqtt"), "allow_anonymous true").start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 it signed: (ca.pem, cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, issuer: x509.Name | None, signer: ec.EllipticCurvePrivateKey | None,
              ca: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None),
                                  critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        return builder.sign(signer or key, hashes.SHA256()), key

    ca, ca_key = build("fedcore test CA", None, None, ca=True)
    cert, key = build("fedcore test broker", ca.subject, ca_key, ca=False)
    folder = tmp_path_factory.mktemp("tls")
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory, certificate) -> Iterator[Broker]:
    """TLS and a password file: what a deployment runs."""
    folder = tmp_path_factory.mktemp("mqtts")
    ca, cert, key = certificate
    b = Broker(folder, f"allow_anonymous false\npassword_file {_password_file(folder / 'pw')}\n"
                       f"cafile {ca}\ncertfile {cert}\nkeyfile {key}").start()
    yield b
    b.stop()


class TestMqttTransport(TransportConformance):
    @pytest.fixture
    def endpoints(self, broker) -> Endpoints:
        return Endpoints.same(f"mqtt://127.0.0.1:{broker.port}/{fed()}")


class TestSecureMqttTransport(TransportConformance):
    large_frame = 16 << 20  # TLS is slower; the plain suite covers 64 MB

    @pytest.fixture
    def endpoints(self, secure_broker, certificate) -> Endpoints:
        return Endpoints.same(f"mqtts://{USER}:{PASSWORD.replace(' ', '%20')}@127.0.0.1:"
                              f"{secure_broker.port}/{fed()}?cafile={certificate[0]}")


def test_a_wrong_password_is_refused_with_a_clear_error(secure_broker, certificate):
    async def scenario() -> None:
        for role in ("researcher", "node"):
            t = open_transport(f"mqtts://127.0.0.1:{secure_broker.port}/{fed()}?username={USER}"
                               f"&password=wrong&cafile={certificate[0]}", role=role,
                               identity="r")
            with pytest.raises(TransportError, match="refused 'r'.*(password|authori)"):
                await t.start()
            await t.close()

    asyncio.run(asyncio.wait_for(scenario(), 20))


def _refused_at_start(url: str, match: str) -> None:
    async def scenario() -> None:
        t = open_transport(url, role="researcher", identity="r")
        with pytest.raises(TransportError, match=match):
            await t.start()
        await t.close()

    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_an_untrusted_broker_is_never_joined(secure_broker):
    # No cafile: the test CA is not in the system's store. The cause is named, with the fix:
    # not a broker that seems not to answer.
    _refused_at_start(f"mqtts://{USER}:x@127.0.0.1:{secure_broker.port}/{fed()}"
                      "?connect_timeout=1",
                      r"does not trust the server's TLS certificate.*\?cafile=PATH")


def test_a_broker_that_requires_client_certificates_says_so(tmp_path, certificate):
    ca, cert, key = certificate
    strict = Broker(tmp_path, f"allow_anonymous true\ncafile {ca}\ncertfile {cert}\n"
                              f"keyfile {key}\nrequire_certificate true").start()
    try:  # the CA is given, the client certificate is not
        _refused_at_start(f"mqtts://127.0.0.1:{strict.port}/{fed()}?cafile={ca}"
                          "&connect_timeout=1",
                          r"requires a client certificate.*certfile=PATH&keyfile=PATH")
    finally:
        strict.stop()


@pytest.mark.parametrize("url, message", [
    ("mqtt://127.0.0.1:x/fed", "Expected mqtt://HOST"),
    ("mqtt://127.0.0.1:1883/fed?colour=red", r"Unknown option\(s\) \['colour'\]"),
    ("mqtt://127.0.0.1:1883/fed?chunk_size=12", "chunk_size must be at least 2048"),
    ("mqtt://127.0.0.1:1883/f+d", "federation must be"),
    ("mqtts://127.0.0.1/fed?cafile=/no/such.pem", "Cannot load"),
])
def test_bad_urls_are_explained(url, message):
    with pytest.raises(ConfigurationError, match=message):
        MqttTransport(url, role="researcher", identity="r")


def test_an_identity_cannot_hold_topic_wildcards():
    with pytest.raises(ConfigurationError, match="identity must be"):
        MqttTransport("mqtt://127.0.0.1/fed", role="node", identity="a/#")


def test_frames_flow_again_after_a_broker_restart(tmp_path):
    broker = Broker(tmp_path, "allow_anonymous true").start()
    url = f"mqtt://127.0.0.1:{broker.port}/{fed()}?retry_max=0.5"

    async def scenario() -> None:  # frames of any size: through the core's chunk layer
        researcher = ChunkedTransport(open_transport(url, role="researcher",
                                                     identity="researcher"))
        node = ChunkedTransport(open_transport(url, role="node", identity="n"))
        await researcher.start()
        await node.start()
        try:
            await wait_until(lambda: researcher.peers() == {"n"} and node.peers() == {
                "researcher"}, "the node and researcher to meet")
            await researcher.send("n", b"before")
            assert await node.receive() == ("researcher", b"before")
            broker.kill()  # mid-conversation, no goodbye
            await wait_until(lambda: not researcher.peers(), "the researcher to see the loss")
            with pytest.raises(TransportError):
                await researcher.send("n", b"lost")
            broker.start()  # same port
            await wait_until(lambda: researcher.peers() == {"n"} and node.peers() == {
                "researcher"}, "both to reconnect and announce themselves again", 15)
            big = np.random.default_rng(1).bytes(5 << 20)
            await researcher.send("n", big)
            peer, frame = await node.receive()
            while bytes(frame) == b"before":
                # At least once: paho sends again a QoS 1 message that the killed broker
                # took but never acknowledged (the signing layer drops such a resend on an
                # endpoint with a guard: tests/wire/test_chunks.py::
                # test_a_frame_whose_first_chunk_comes_twice_still_arrives).
                print("a resend of 'before'")
                peer, frame = await node.receive()
            assert (peer, bytes(frame)) == ("researcher", big)
            await node.send("researcher", b"after")
            assert await researcher.receive() == ("n", b"after")
        finally:
            await node.close()
            await researcher.close()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 40))
    finally:
        broker.stop()


def test_a_node_started_before_its_broker_joins_once_it_is_up_and_closes_while_waiting(
        tmp_path):
    """A node whose broker is not up yet returns from start() and keeps dialing; it joins
    once the broker starts. A node that never reached its broker closes at once."""
    broker = Broker(tmp_path, "allow_anonymous true")  # its port, not started yet
    url = f"mqtt://127.0.0.1:{broker.port}/{fed()}?retry_max=0.5&connect_timeout=0.5"

    async def scenario() -> None:
        early = MqttTransport(url, role="node", identity="early")
        never = MqttTransport(url, role="node", identity="never")
        await early.start()  # a node waits for its broker, as for its researcher
        await never.start()
        await never.close()
        broker.start()
        researcher = open_transport(url, role="researcher", identity="researcher")
        await researcher.start()
        try:
            await wait_until(lambda: researcher.peers() == {"early"}, "the node to join", 15)
            await researcher.send("early", b"hello")
            assert await asyncio.wait_for(early.receive(), 10) == ("researcher", b"hello")
        finally:
            await early.close()
            await researcher.close()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 40))
    finally:
        broker.stop()


def test_a_node_that_dies_leaves_peers(broker, tmp_path):
    """A node process killed without a goodbye disappears (its last will)."""
    url = f"mqtt://127.0.0.1:{broker.port}/{fed()}"
    script = ("import asyncio, sys\nfrom fedcore.transport import open_transport\n"
              "async def main():\n"
              "    t = open_transport(sys.argv[1], role='node', identity='doomed')\n"
              "    await t.start(); print('up', flush=True); await asyncio.sleep(60)\n"
              "asyncio.run(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", script, url], stdout=subprocess.PIPE)

    async def scenario() -> None:
        researcher = open_transport(url, role="researcher", identity="researcher")
        await researcher.start()
        try:
            await wait_until(lambda: researcher.peers() == {"doomed"}, "the node to appear", 20)
            proc.kill()
            await wait_until(lambda: not researcher.peers(), "the dead node to leave", 10)
        finally:
            await researcher.close()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 40))
    finally:
        proc.kill()
        proc.wait()


def test_a_foreign_message_on_a_node_topic_is_refused_and_the_node_keeps_serving(
        broker, tmp_path):
    """Anything allowed on the broker can publish on a node's topic until frames are signed
    end to end: the node must refuse such bytes as a protocol error and keep serving."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    federation = fed()
    url = f"mqtt://127.0.0.1:{broker.port}/{federation}"
    node = Node(tmp_path / "site", node_id="site", approval_required=False)
    enroll([node])
    node.start(url)
    guard = Guard(researcher_identity(), lambda: {"site": node.identity.public_bytes},
                  networked=True, max_size=codec.DEFAULT_MAX_FRAME)

    async def scenario() -> None:
        researcher = open_transport(url, role="researcher", identity="researcher")
        await researcher.start()
        intruder = paho.Client(CallbackAPIVersion.VERSION2, client_id="intruder")
        try:
            await wait_until(lambda: "site" in researcher.peers(), "the node to appear")
            intruder.connect("127.0.0.1", broker.port)
            intruder.loop_start()
            intruder.publish(f"fedcore/{federation}/to/site/from/researcher",
                             b"not a fedcore frame", qos=1).wait_for_publish(5)
            peer, frame = await asyncio.wait_for(researcher.receive(), 10)
            reply, _ = guard.open(frame)
            assert peer == "site" and isinstance(reply.body, ErrorReply)
            assert reply.body.kind == "protocol"
            ping = Envelope(Ping(), sender="researcher", recipient="site")
            await researcher.send("site", guard.seal(ping))
            peer, frame = await asyncio.wait_for(researcher.receive(), 10)
            pong, _ = guard.open(frame)
            assert isinstance(pong.body, Pong) and pong.reply_to == ping.id
        finally:
            intruder.loop_stop()
            intruder.disconnect()
            await researcher.close()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        node.stop()
    assert any(r["event"] == "frames-dropped" and r["reasons"] == {"unsigned": 1}
               for r in node.audit_log())  # counted, not a record per frame


def test_a_message_larger_than_an_endpoint_accepts_never_reaches_it(broker):
    """An endpoint tells the broker the largest packet it takes (its chunk size and a little):
    a 1 MB message published on its topic by anyone is never delivered to it, so it never
    buffers one; what follows still arrives."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    federation = fed()
    url = f"mqtt://127.0.0.1:{broker.port}/{federation}"

    async def scenario() -> None:
        researcher = open_transport(url, role="researcher", identity="researcher")
        node = MqttTransport(url, role="node", identity="n", chunk_size=16 << 10)
        intruder = paho.Client(CallbackAPIVersion.VERSION2, client_id="big-intruder",
                               protocol=paho.MQTTv5)
        await researcher.start()
        await node.start()
        try:
            await wait_until(lambda: researcher.peers() == {"n"}, "the node to appear")
            intruder.connect("127.0.0.1", broker.port)
            intruder.loop_start()
            intruder.publish(f"fedcore/{federation}/to/n/from/researcher", bytes(1 << 20),
                             qos=1).wait_for_publish(5)
            await researcher.send("n", b"small")
            assert await asyncio.wait_for(node.receive(), 10) == ("researcher", b"small")
        finally:
            intruder.loop_stop()
            intruder.disconnect()
            await node.close()
            await researcher.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_node_that_stops_reading_holds_the_broker_back_and_loses_nothing(broker):
    """A consumer that lags: the node's inbox fills (64 KiB), it stops reading its socket,
    the broker holds the rest; once the consumer reads again every message arrives, in
    order, and the endpoint never held more than a few of them."""
    import tracemalloc

    url = f"mqtt://127.0.0.1:{broker.port}/{fed()}"
    count, size = 400, 16 << 10  # 6.4 MB: a hundred inboxes' worth

    async def scenario() -> None:
        researcher = open_transport(url, role="researcher", identity="researcher")
        node = MqttTransport(url, role="node", identity="n", inbox_bytes=64 << 10)
        await researcher.start()
        await node.start()
        try:
            await wait_until(lambda: researcher.peers() == {"n"}, "the node to appear")
            tracemalloc.start()
            for i in range(count):
                await researcher.send("n", i.to_bytes(4, "big") + bytes(size - 4))
            await asyncio.sleep(1.0)  # nobody reads: the node stops reading too
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < 3 << 20, f"{peak / 2**20:.1f} MiB held while nobody read"
            for i in range(count):
                peer, message = await asyncio.wait_for(node.receive(), 10)
                assert peer == "researcher" and int.from_bytes(message[:4], "big") == i
        finally:
            await node.close()
            await researcher.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
