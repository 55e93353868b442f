"""Identities and trust: key files, enrollment through the CLI, and every refusal of the
security model (unknown key, altered frame, replay, oversized frame, node not enrolled,
researcher not trusted), each audited while the node keeps serving."""

from __future__ import annotations

import asyncio
import logging
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

pytest.importorskip("websockets")

from fedcore import FederatedStatistics, Node
from fedcore.errors import ConfigurationError, GovernanceError, TransportError  # noqa: E402
from fedcore.testing.transport import wait_until  # noqa: E402
from fedcore.transport import Transport, open_transport  # noqa: E402
from fedcore.wire import codec  # noqa: E402
from fedcore.wire.identity import (  # noqa: E402
    Identity,
    enrolled_nodes,
    full_fingerprint,
    public_key,
    researcher_identity,
)
from fedcore.wire.messages import (  # noqa: E402
    Envelope,
    ErrorReply,
    Ping,
    Pong,
    SearchReply,
    SearchRequest,
    TrainRequest,
)
from fedcore.wire.rpc import Client  # noqa: E402
from fedcore.wire.signing import TRAILER, Guard  # noqa: E402
from fedcore_node.cli import main as node_cli  # noqa: E402
from fedcore_researcher.cli import main  # noqa: E402
from tests._support.net import free_port  # noqa: E402


def test_a_key_is_created_0600_and_a_readable_one_is_refused(tmp_path):
    ident = Identity(tmp_path / "k" / "researcher.key")
    assert stat.S_IMODE(ident.path.stat().st_mode) == 0o600
    assert Identity(ident.path).public_key == ident.public_key  # reloaded, not replaced
    node = Node(tmp_path / "home", node_id="site")
    assert stat.S_IMODE((tmp_path / "home" / "identity.key").stat().st_mode) == 0o600
    ident.path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        Identity(ident.path)
    (tmp_path / "home" / "identity.key").chmod(0o640)
    with pytest.raises(ConfigurationError, match="read by other users"):
        Node(node.home)


def test_the_enrollment_flow_through_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEDCORE_NODES", str(tmp_path / "nodes.toml"))
    home = str(tmp_path / "home")
    assert node_cli(["--home", home, "init", "--id", "site"]) == 0
    assert node_cli(["--home", home, "trust", "list"]) == 0
    assert "No trusted researcher" in capsys.readouterr().out
    # the researcher prints a key and gives it to the node admin, who trusts it
    assert main(["identity"]) == 0
    assert public_key() in capsys.readouterr().out
    assert node_cli(["--home", home, "trust", "add", "alice", public_key()]) == 0
    assert researcher_identity().fingerprint in capsys.readouterr().out
    # the node admin prints the node's key; the researcher enrolls it
    assert node_cli(["--home", home, "identity"]) == 0
    out = capsys.readouterr().out
    key = next(line.split()[-1] for line in out.splitlines() if line.startswith("public key"))
    assert main(["enroll", "site", key]) == 0
    assert enrolled_nodes() == {"site": Node(home).identity.public_bytes}
    assert node_cli(["--home", home, "trust", "list"]) == 0
    assert "alice" in capsys.readouterr().out

    csv = tmp_path / "c.csv"
    csv.write_text("age\n30\n40\n50\n")
    assert node_cli(["--home", home, "dataset", "add", "--name", "c", "--tags", "cli",
                     "--path", str(csv)]) == 0
    url = f"ws://127.0.0.1:{free_port()}"
    node = Node(home).start(url)
    try:  # nodes.toml is the default enrollment
        with FederatedStatistics(url, tags=["cli"], nodes=["site"]) as stats:
            assert stats.search()["node"].tolist() == ["site"]
    finally:
        node.stop()
    assert node_cli(["--home", home, "trust", "remove", "alice"]) == 0
    assert node_cli(["--home", home, "trust", "remove", "alice"]) == 1
    events = [r["event"] for r in Node(home).audit_log()]
    assert {"researcher-trusted", "researcher-untrusted"} <= set(events)


# --- refusals over websockets, from a rogue client holding a valid connection -------------

def _serve(tmp_path: Path, *, trusted: bool = True, max_frame_size: int = codec.DEFAULT_MAX_FRAME
           ) -> tuple[str, Node]:
    url = f"ws://127.0.0.1:{free_port()}"
    node = Node(tmp_path / "site", node_id="site", max_frame_size=max_frame_size)
    if trusted:
        node.trust("tests", public_key())
    return url, node.start(url)


def _talk(url: str, node: Node, scenario: Callable[[Transport, Guard], Awaitable[None]]
          ) -> None:
    async def run() -> None:
        researcher = open_transport(url, role="researcher", identity="researcher")
        await researcher.start()
        guard = Guard(researcher_identity(), lambda: {"site": node.identity.public_bytes},
                      networked=True, max_size=codec.DEFAULT_MAX_FRAME)
        try:
            await wait_until(lambda: "site" in researcher.peers(), "the node to connect")
            await scenario(researcher, guard)
            ping = Envelope(Ping(), sender="researcher", recipient="site")  # still serving
            await researcher.send("site", guard.seal(ping))
            pong, _ = guard.open((await asyncio.wait_for(researcher.receive(), 10))[1])
            assert isinstance(pong.body, Pong) and pong.reply_to == ping.id
        finally:
            await researcher.close()

    try:
        asyncio.run(asyncio.wait_for(run(), 30))
    finally:
        node.stop()


async def _refused(researcher: Transport, guard: Guard, frame: bytes, kind: str,
                   match: str) -> None:
    await researcher.send("site", frame)
    reply, _ = guard.open((await asyncio.wait_for(researcher.receive(), 10))[1])
    assert isinstance(reply.body, ErrorReply), reply.body
    assert reply.body.kind == kind and match in reply.body.message, reply.body.message


def _audited(node: Node, match: str) -> None:
    """A refusal is on record: one by one for a verified sender, else in a summary."""
    reasons = [r["reason"] for r in node.audit_log() if r["event"] == "refused-frame"]
    reasons += [e for r in node.audit_log() if r["event"] == "frames-dropped"
                for e in r["examples"].values()]
    assert any(match in r for r in reasons), reasons


def test_a_frame_signed_by_an_unknown_key_is_refused(tmp_path):
    url, node = _serve(tmp_path)
    stranger = Guard(Identity(tmp_path / "stranger.key"), dict, networked=True,
                     max_size=codec.DEFAULT_MAX_FRAME)

    async def scenario(researcher: Transport, guard: Guard) -> None:
        frame = stranger.seal(Envelope(Ping(), sender="researcher", recipient="site"))
        await _refused(researcher, guard, frame, "governance", "unknown key")

    _talk(url, node, scenario)
    _audited(node, "unknown key")


def test_an_altered_frame_and_a_replayed_frame_are_refused(tmp_path):
    url, node = _serve(tmp_path)

    async def scenario(researcher: Transport, guard: Guard) -> None:
        frame = bytearray(guard.seal(Envelope(Ping(), sender="researcher", recipient="site")))
        good = bytes(frame)
        frame[20] ^= 1  # one bit of the header
        await _refused(researcher, guard, bytes(frame), "protocol", "Bad signature")
        await researcher.send("site", good)
        assert isinstance(guard.open((await researcher.receive())[1])[0].body, Pong)
        # A replay is refused without an answer (the original was answered): the next
        # reply the researcher gets is the one to _talk's own ping.
        await researcher.send("site", good)

    _talk(url, node, scenario)
    _audited(node, "Bad signature")
    _audited(node, "Replayed")


def test_a_frame_captured_before_a_node_restart_is_refused_after_it(tmp_path):
    """The node keeps the counters it accepted in its home: a restart forgets none."""
    url, node = _serve(tmp_path)
    captured: list[bytes] = []

    async def capture(researcher: Transport, guard: Guard) -> None:
        captured.append(guard.seal(Envelope(Ping(), sender="researcher", recipient="site")))
        await researcher.send("site", captured[0])
        assert isinstance(guard.open((await researcher.receive())[1])[0].body, Pong)

    _talk(url, node, capture)  # stops the node at the end
    restarted = Node(tmp_path / "site").start(url)

    async def replay(researcher: Transport, guard: Guard) -> None:
        await researcher.send("site", captured[0])  # no answer: _talk's ping comes first

    _talk(url, restarted, replay)
    dropped = [r for r in restarted.audit_log() if r["event"] == "frames-dropped"]
    assert [r["reasons"] for r in dropped] == [{"replayed": 1}], dropped
    assert "Replayed" in dropped[0]["examples"]["replayed"]


def test_audit_records_name_the_key_that_signed_a_request(tmp_path):
    url, node = _serve(tmp_path)

    async def search(researcher: Transport, guard: Guard) -> None:
        ask = Envelope(SearchRequest(tags=["x"]), sender="someone-else", recipient="site")
        await researcher.send("site", guard.seal(ask))
        assert isinstance(guard.open((await researcher.receive())[1])[0].body, SearchReply)

    _talk(url, node, search)
    record = next(r for r in node.audit_log() if r["event"] == "search")
    assert record["researcher"] == "tests"  # the name the key is trusted under, not the claim
    assert record["researcher_key"] == full_fingerprint(researcher_identity().public_bytes)


def test_a_signed_training_request_with_swapped_or_unapproved_code_is_refused(tmp_path):
    """A trusted key sends hand-made training requests: an approved plan's hash with other
    files, then a plan never approved. Both are refused before any code runs, audited, and
    the node keeps serving (the ping after the scenario)."""
    import numpy as np

    from fedcore.params import ParameterSet
    from fedcore.plan import PlanBundle
    from tests._support.sklearn_plans import SleepWhenToldPlan

    url, node = _serve(tmp_path)
    entry = node.datasets.add_arrays("cohort", ["x"], np.zeros((8, 2)), np.arange(8) % 2)
    approved = PlanBundle.from_class(SleepWhenToldPlan).to_wire()
    node.plans.submit(PlanBundle.from_wire(approved))
    node.plans.approve(approved["sha256"])
    swapped = {**approved, "files": {name: text + "\nimport os\n"
                                     for name, text in approved["files"].items()}}
    unapproved = {k: v for k, v in swapped.items() if k != "sha256"}

    def train(guard, plan):
        body = TrainRequest(plan=plan, params=ParameterSet({}), dataset_id=entry["id"])
        return guard.seal(Envelope(body, sender="researcher", recipient="site"))

    async def scenario(researcher: Transport, guard: Guard) -> None:
        await _refused(researcher, guard, train(guard, swapped), "governance", "do not match")
        await _refused(researcher, guard, train(guard, unapproved), "governance", "approved")

    _talk(url, node, scenario)
    events = [r["event"] for r in node.audit_log()]
    assert events.count("train-refused") == 1 and "decision" in events
    assert "trained" not in events


def test_an_oversized_frame_is_refused(tmp_path):
    url, node = _serve(tmp_path, max_frame_size=64 << 10)

    async def scenario(researcher: Transport, guard: Guard) -> None:
        frame = guard.seal(Envelope(Ping(), sender="researcher", recipient="site"))
        await _refused(researcher, guard, frame + bytes(100 << 10), "protocol", "exceeds")

    _talk(url, node, scenario)
    _audited(node, "exceeds")


def test_a_researcher_the_node_does_not_trust_is_refused(tmp_path):
    url, node = _serve(tmp_path, trusted=False)

    async def scenario(researcher: Transport, guard: Guard) -> None:
        frame = guard.seal(Envelope(Ping(), sender="researcher", recipient="site"))
        await _refused(researcher, guard, frame, "governance", "fedcore-node trust add")
        node.trust("tests", public_key())  # the admin trusts it: the next ping is answered

    _talk(url, node, scenario)
    _audited(node, "nobody is trusted")


def test_a_node_that_is_not_enrolled_is_refused(tmp_path, caplog):
    url, node = _serve(tmp_path)
    other = Identity(tmp_path / "other.key")

    async def scenario() -> None:
        for enrolled in ({"elsewhere": other.public_bytes}, {"site": other.public_bytes}):
            client = Client(open_transport(url, role="researcher", identity="researcher"),
                            key=researcher_identity(), enrolled=enrolled)
            await client.start()
            try:
                await wait_until(lambda c=client: "site" in c.transport.peers(), "the node")
                if "site" not in enrolled:
                    assert client.peers() == set()  # its presence does not count
                    with pytest.raises(GovernanceError, match="not enrolled"):
                        await client.request("site", Ping(), timeout=5)
                else:  # enrolled under another key: its replies are refused
                    with pytest.raises(TransportError, match="did not answer"):
                        await client.request("site", Ping(), timeout=1)
            finally:
                await client.close()

    with caplog.at_level(logging.WARNING, logger="fedcore.rpc"):
        try:
            asyncio.run(asyncio.wait_for(scenario(), 30))
        finally:
            node.stop()
    assert "Refused node 'site': it is not enrolled" in caplog.text
    assert "Refused a frame from site" in caplog.text and "unknown key" in caplog.text


def test_a_networked_researcher_with_no_enrolled_node_is_told_how_to_enroll(tmp_path):
    stats = FederatedStatistics(f"ws://127.0.0.1:{free_port()}", tags=["x"], enrolled={},
                                connect_timeout=1)
    with pytest.raises(ConfigurationError, match="enroll NODE_ID KEY"):
        stats.search()
    stats.close()


def test_a_frame_altered_or_replayed_through_the_mqtt_broker_is_refused(tmp_path):
    """A plain MQTT client captures a real frame on the broker, then injects modified copies
    and an exact copy: a copy with its counter changed fails its signature; a changed header
    under the accepted counter, and the exact copy, are replays (refused before any
    cryptography, unanswered)."""
    pytest.importorskip("paho.mqtt")
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from tests._support.mqtt import Broker, fed

    broker = Broker(tmp_path, "allow_anonymous true").start()
    federation = fed()
    url = f"mqtt://127.0.0.1:{broker.port}/{federation}"
    node = Node(tmp_path / "site", node_id="site")
    node.trust("tests", public_key())
    node.start(url)
    topic = f"fedcore/{federation}/to/site/from/researcher"
    captured: list[bytes] = []
    intruder = paho.Client(CallbackAPIVersion.VERSION2, client_id="intruder")
    intruder.on_message = lambda _c, _u, msg: captured.append(bytes(msg.payload))
    intruder.connect("127.0.0.1", broker.port)
    intruder.loop_start()
    intruder.subscribe(topic, qos=1)

    async def scenario(researcher: Transport, guard: Guard) -> None:
        ping = Envelope(Ping(), sender="researcher", recipient="site")
        await researcher.send("site", guard.seal(ping))
        assert isinstance(guard.open((await researcher.receive())[1])[0].body, Pong)
        await wait_until(lambda: bool(captured), "the intruder to capture the frame")
        frame = captured[0]  # one MQTT message is one signed frame
        altered = bytearray(frame)
        altered[20] ^= 0xFF  # a byte of the header: refused, unanswered (a replay)
        intruder.publish(topic, bytes(altered), qos=1).wait_for_publish(5)
        altered = bytearray(frame)
        altered[len(frame) - TRAILER + 36] ^= 1  # the counter: a fresh, forged one
        intruder.publish(topic, bytes(altered), qos=1).wait_for_publish(5)
        reply, _ = guard.open((await asyncio.wait_for(researcher.receive(), 10))[1])
        assert isinstance(reply.body, ErrorReply) and "Bad signature" in reply.body.message
        intruder.publish(topic, frame, qos=1).wait_for_publish(5)  # refused, unanswered

    try:
        _talk(url, node, scenario)
    finally:
        intruder.loop_stop()
        intruder.disconnect()
        broker.stop()
    _audited(node, "Bad signature")
    _audited(node, "Replayed")
    dropped = [r["reasons"] for r in node.audit_log() if r["event"] == "frames-dropped"]
    assert sum(sum(r.values()) for r in dropped) == 3, dropped
