"""The broker ACL of docs/deployment.md, run by a real Mosquitto: a node's account cannot
write into another node's inbox, nor speak under another name, and the federation still
works under it."""

from __future__ import annotations

import asyncio
import re
import subprocess
import threading
from pathlib import Path

import pytest

pytest.importorskip("paho.mqtt")

from fedcore import Node  # noqa: E402
from fedcore.testing.transport import wait_until  # noqa: E402
from fedcore.transport import open_transport  # noqa: E402
from fedcore.wire.identity import parse_public_key, researcher_identity  # noqa: E402
from fedcore.wire.messages import Ping, Pong  # noqa: E402
from fedcore.wire.rpc import Client  # noqa: E402
from tests._support.mqtt import Broker, fed, require_mosquitto  # noqa: E402
from tests._support.trust import enroll  # noqa: E402

require_mosquitto()

DOCS = Path(__file__).parents[2] / "docs" / "deployment.md"
ACCOUNTS = {"researcher": "r-pass", "site-a": "a-pass", "site-b": "b-pass"}


def documented_acl() -> str:
    """The ACL file exactly as docs/deployment.md gives it."""
    found = re.search(r"```text\n(# /etc/mosquitto/fedcore\.acl.*?)```", DOCS.read_text(),
                      re.S)
    assert found, "docs/deployment.md lost its ACL example"
    return found.group(1)


def _broker(folder: Path) -> Broker:
    passwd, acl = folder / "passwd", folder / "fedcore.acl"
    passwd.touch(mode=0o600)
    for user, password in ACCOUNTS.items():
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True,
                       capture_output=True)
    acl.write_text(documented_acl())
    return Broker(folder, f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}")


def test_under_the_documented_acl_a_node_cannot_publish_to_another_nodes_inbox(tmp_path):
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    broker = _broker(tmp_path).start()
    federation = fed()

    def url(user: str) -> str:  # the password from a file, as the docs advise
        secret = tmp_path / f"{user}.pw"
        secret.write_text(ACCOUNTS[user] + "\n")
        secret.chmod(0o600)
        return (f"mqtt://{user}@127.0.0.1:{broker.port}/{federation}"
                f"?password_file={secret}")

    nodes = [Node(tmp_path / n, node_id=n) for n in ("site-a", "site-b")]
    enrolled = enroll(nodes)
    for node in nodes:
        node.start(url(node.node_id))
    results: dict[str, object] = {}

    def publish(user: str, topic: str) -> int:
        """Publish junk as ``user`` (QoS 1); the broker's reason code (0: accepted)."""
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{user}-intruder",
                             protocol=paho.MQTTv5)
        client.username_pw_set(user, ACCOUNTS[user])
        codes: list[int] = []
        acked = threading.Event()

        def on_publish(_c: object, _u: object, _mid: int, reason: object, _p: object) -> None:
            codes.append(reason.value)  # type: ignore[attr-defined]
            acked.set()

        client.on_publish = on_publish
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        try:
            client.publish(topic, b"junk from " + user.encode(), qos=1)
            assert acked.wait(5), "the broker never acknowledged"
        finally:
            client.loop_stop()
            client.disconnect()
        return codes[0]

    async def scenario() -> None:
        client = Client(open_transport(url("researcher"), role="researcher",
                                       identity="researcher"),
                        key=researcher_identity(),
                        enrolled={n: parse_public_key(k) for n, k in enrolled.items()})
        await client.start()
        try:
            await wait_until(lambda: client.peers() == {"site-a", "site-b"}, "both nodes")
            for node in ("site-a", "site-b"):  # the federation works under the ACL
                reply = await client.request(node, Ping(), timeout=10)
                results[node] = reply.body
            inbox_b = f"fedcore/{federation}/to/site-b/from"
            results["a->b"] = await asyncio.to_thread(publish, "site-a", f"{inbox_b}/site-a")
            results["a->b as researcher"] = await asyncio.to_thread(
                publish, "site-a", f"{inbox_b}/researcher")
            results["researcher->b"] = await asyncio.to_thread(
                publish, "researcher", f"{inbox_b}/researcher")
        finally:
            await client.close()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        for node in nodes:
            node.stop()
        broker.stop()
    assert all(isinstance(results[n], Pong) for n in ("site-a", "site-b"))
    not_authorized = 0x87
    assert results["a->b"] == not_authorized
    assert results["a->b as researcher"] == not_authorized
    assert results["researcher->b"] == 0  # the researcher's own topic: accepted
    # site-b saw exactly one junk message: the researcher's account's, never site-a's
    dropped = [r for r in nodes[1].audit_log() if r["event"] == "frames-dropped"]
    assert sum(r["dropped"] for r in dropped) == 1, dropped
    assert [r["peers"] for r in dropped] == [{"researcher": 1}]
