"""The websocket transport: the conformance suite over ws:// and wss://, and a federation of
node processes that trains exactly as the same federation in one process does."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("websockets")

from fedcore import Experiment, Node  # noqa: E402
from fedcore.errors import ConfigurationError  # noqa: E402
from fedcore.testing.transport import Endpoints, TransportConformance  # noqa: E402
from fedcore.transport import Role, Transport, open_transport  # noqa: E402
from fedcore_transport.websocket import WebSocketTransport  # noqa: E402
from tests._support.net import free_port  # noqa: E402
from tests._support.trust import enroll  # noqa: E402


class TestWebSocketTransport(TransportConformance):
    @pytest.fixture
    def endpoints(self) -> Endpoints:
        return Endpoints.same(f"ws://127.0.0.1:{free_port()}")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1: (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedcore test researcher")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class TestSecureWebSocketTransport(TransportConformance):
    """TLS, and messages of 1 MiB instead of 16: the core cuts frames into smaller chunks."""

    large_frame = 16 << 20  # TLS is slower; the plain suite covers 64 MB

    def open_raw(self, url: str, role: Role, identity: str) -> Transport:
        return WebSocketTransport(url, role=role, identity=identity, max_frame_size=1 << 20)

    @pytest.fixture
    def endpoints(self, certificate) -> Endpoints:
        cert, key = certificate
        port = free_port()
        return Endpoints(researcher=f"wss://127.0.0.1:{port}?certfile={cert}&keyfile={key}",
                         node=f"wss://127.0.0.1:{port}?cafile={cert}")


def test_a_node_that_does_not_trust_the_researcher_never_connects(certificate):
    import asyncio

    cert, key = certificate

    async def scenario() -> None:
        port = free_port()
        researcher = open_transport(f"wss://127.0.0.1:{port}?certfile={cert}&keyfile={key}",
                                    role="researcher", identity="researcher")
        node = open_transport(f"wss://127.0.0.1:{port}", role="node", identity="n")  # no CA
        await researcher.start()
        await node.start()
        try:
            await asyncio.sleep(1.0)
            assert researcher.peers() == set() and node.peers() == set()
        finally:
            await node.close()
            await researcher.close()

    asyncio.run(scenario())


def test_a_node_without_the_client_certificate_the_researcher_requires_is_told_so(
        certificate, caplog):
    import asyncio
    import logging

    cert, key = certificate

    async def scenario() -> None:
        port = free_port()
        # cafile on the researcher's side: client certificates are required.
        researcher = open_transport(f"wss://127.0.0.1:{port}?certfile={cert}&keyfile={key}"
                                    f"&cafile={cert}", role="researcher", identity="researcher")
        node = open_transport(f"wss://127.0.0.1:{port}?cafile={cert}", role="node",
                              identity="n")  # trusts the researcher, has no certificate
        await researcher.start()
        await node.start()
        try:
            for _ in range(100):
                if "requires a client certificate" in caplog.text:
                    break
                await asyncio.sleep(0.1)
            assert researcher.peers() == set()
        finally:
            await node.close()
            await researcher.close()

    with caplog.at_level(logging.INFO, logger="fedcore"):
        asyncio.run(scenario())
    told = [r for r in caplog.records if "requires a client certificate" in r.getMessage()]
    assert told and told[0].levelno == logging.WARNING
    assert "certfile=PATH&keyfile=PATH" in told[0].getMessage()
    assert len(told) == 1  # said once, not at every retry


@pytest.mark.parametrize("url, message", [
    ("ws://127.0.0.1", "Expected ws://HOST:PORT"),
    ("ws://127.0.0.1:80?colour=red", r"Unknown option\(s\) \['colour'\]"),
    ("wss://127.0.0.1:8443", "needs its certificate"),
    ("wss://127.0.0.1:8443?certfile=/no/such.pem&keyfile=/no/such.key", "Cannot load"),
])
def test_bad_urls_are_explained(url, message):
    with pytest.raises(ConfigurationError, match=message):
        WebSocketTransport(url, role="researcher", identity="r")


# --- a federation of node processes ------------------------------------------------------

try:
    from sklearn.linear_model import SGDClassifier

    from fedcore_sklearn import SklearnTrainingPlan

    class SGDPlan(SklearnTrainingPlan):
        estimator = SGDClassifier
except ImportError:  # the federation test is skipped below
    SGDPlan = None  # type: ignore[assignment, misc]


def _csv(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(200, 4))
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int)
    pd.DataFrame({**{f"x{i}": X[:, i] for i in range(4)}, "label": y}).to_csv(path,
                                                                            index=False)
    return path


def test_nodes_dialling_in_one_after_another_are_all_found(tmp_path):
    if SGDPlan is None:
        pytest.skip("needs scikit-learn")
    import threading

    url = f"ws://127.0.0.1:{free_port()}"
    nodes = []
    for i, node_id in enumerate(["late-a", "late-b"]):
        node = Node(tmp_path / node_id, node_id=node_id, approval_required=False)
        node.datasets.add("cohort", ["ws-late"], _csv(tmp_path / f"{node_id}.csv", i))
        nodes.append(node)
    enrolled = enroll(nodes)
    nodes[0].start(url)
    threading.Timer(0.3, nodes[1].start, args=(url,)).start()  # a straggler
    exp = Experiment(SGDPlan, tags=["ws-late"], federation=url, progress=False,
                     model_args={"target": "label"}, connect_timeout=10, enrolled=enrolled)
    try:
        found = exp.search()  # no node list: the researcher waits for the peers to settle
    finally:
        exp.close()
        for node in nodes:
            node.stop()
    assert sorted(found["node"]) == ["late-a", "late-b"]


def test_nothing_larger_than_a_hello_is_read_before_the_hello(caplog):
    """Before a peer said who it is, the researcher reads at most 4 KiB from it: a 64 KiB
    first message closes the connection (1009, message too big), and nobody joins."""
    import asyncio
    import logging

    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async def scenario() -> None:
        url = f"ws://127.0.0.1:{free_port()}"
        researcher = open_transport(url, role="researcher", identity="researcher")
        await researcher.start()
        try:
            async with connect(url, proxy=None) as ws:
                await ws.send(b"x" * (64 << 10))
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
            assert researcher.peers() == set()
        finally:
            await researcher.close()

    with caplog.at_level(logging.WARNING, logger="fedcore.transport.websocket"):
        asyncio.run(asyncio.wait_for(scenario(), 20))
    assert "Refused a message of more than 4096 bytes" in caplog.text
    assert "(before its hello)" in caplog.text
