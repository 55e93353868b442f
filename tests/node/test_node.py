from __future__ import annotations

import asyncio
import json
import pickle
import struct

import msgpack
import numpy as np
import pandas as pd
import pytest

from fedcore import _runtime
from fedcore.errors import ConfigurationError, DatasetError
from fedcore.node import Node
from fedcore.params import ParameterSet
from fedcore.transport import open_transport
from fedcore.wire import codec
from fedcore.wire.messages import (
    Envelope,
    ErrorReply,
    Ping,
    Pong,
    SearchReply,
    SearchRequest,
    TrainRequest,
)


@pytest.fixture
def node(tmp_path):
    return Node(tmp_path / "home", node_id="hospital-a")


def _csv(path, n=20):
    rng = np.random.default_rng(0)
    pd.DataFrame({"age": rng.integers(20, 90, n), "bmi": rng.normal(25, 4, n),
                  "label": rng.integers(0, 2, n)}).to_csv(path, index=False)
    return path


def test_home_folder_survives_a_restart(tmp_path, node):
    entry = node.datasets.add("cohort", ["diabetes", "2024"], _csv(tmp_path / "a.csv"))
    reopened = Node(tmp_path / "home")
    assert reopened.node_id == "hospital-a"
    assert [e["id"] for e in reopened.datasets.list()] == [entry["id"]]
    json.loads((tmp_path / "home" / "db.json").read_text())  # a complete JSON document
    with pytest.raises(ConfigurationError, match="belongs to node 'hospital-a'"):
        Node(tmp_path / "home", node_id="someone-else")


def test_registry_add_search_remove(tmp_path, node):
    a = node.datasets.add("cohort", ["diabetes", "2024"], _csv(tmp_path / "a.csv"))
    assert a["metadata"]["n_samples"] == 20
    assert a["metadata"]["columns"] == ["age", "bmi", "label"]
    assert a["metadata"]["categories"]["label"] == [0, 1]
    assert "bmi" not in a["metadata"]["categories"]  # continuous
    b = node.datasets.add_arrays("scans", ["mri"], np.zeros((4, 2, 2)), np.arange(4))
    assert [e["id"] for e in node.datasets.search(["diabetes"])] == [a["id"]]
    assert node.datasets.search(["diabetes", "2023"]) == []
    assert node.datasets.all_tags() == ["2024", "diabetes", "mri"]
    public = node.datasets.public(node.datasets.search(["mri"])[0])
    assert "path" not in public and public["metadata"]["feature_shape"] == [2, 2]
    node.datasets.remove(b["id"])
    assert [e["id"] for e in node.datasets.list()] == [a["id"]]
    with pytest.raises(DatasetError, match="No dataset with id"):
        node.datasets.get(b["id"])


@pytest.mark.parametrize("tags", [["diabetes"], ["diabetes", "2024"],
                                  ["diabetes", "2024", "extra"]])
def test_overlapping_tag_sets_are_refused(tmp_path, node, tags):
    node.datasets.add("cohort", ["diabetes", "2024"], _csv(tmp_path / "a.csv"))
    with pytest.raises(ConfigurationError, match="overlap"):
        node.datasets.add("other", tags, _csv(tmp_path / "b.csv"))
    node.datasets.add("other", ["diabetes", "2025"], _csv(tmp_path / "b.csv"))  # disjoint enough


def test_bad_registrations_are_explained(tmp_path, node):
    with pytest.raises(DatasetError, match="No file at"):
        node.datasets.add("ghost", ["x"], tmp_path / "missing.csv")
    (tmp_path / "data.parquet").write_bytes(b"")
    with pytest.raises(ConfigurationError, match="Cannot tell the dataset kind"):
        node.datasets.add("p", ["x"], tmp_path / "data.parquet")
    with pytest.raises(ConfigurationError, match="at least one non-empty tag"):
        node.datasets.add("t", [" "], _csv(tmp_path / "a.csv"))


def test_a_deleted_csv_is_reported_unavailable(tmp_path, node):
    path = _csv(tmp_path / "a.csv")
    entry = node.datasets.add("cohort", ["diabetes"], path)
    path.unlink()
    assert node.datasets.list()[0]["available"] is False
    with pytest.raises(DatasetError, match="unavailable"):
        node.datasets.load(entry["id"])


def test_registered_arrays_are_the_node_own_copy_and_a_replaced_file_is_read_again(
        tmp_path, node):
    X, y = np.arange(12.0).reshape(6, 2), np.arange(6) % 2
    entry = node.datasets.add_arrays("scans", ["mri"], X, y)
    X[0, 0] = 99.0  # the caller's arrays change after registering: the node's do not
    loaded = node.datasets.load(entry["id"])
    assert loaded.X[0, 0] == 0.0 and np.array_equal(loaded.y, y)
    with np.load(entry["path"]) as written:  # the file holds what the node serves
        assert np.array_equal(written["X"], loaded.X) and written["X"].dtype == loaded.X.dtype
    # Another process (the CLI, a script) replaces the file: the next request reads it.
    path = tmp_path / "new.npz"
    np.savez(path, X=np.ones((6, 2)), y=np.zeros(6, dtype=int))
    path.replace(entry["path"])
    assert node.datasets.load(entry["id"]).X[0, 0] == 1.0
    # Edited in place (same inode), too: here a CSV, whose size changes.
    csv = _csv(tmp_path / "a.csv")
    other = node.datasets.add("cohort", ["diabetes"], csv)
    assert len(node.datasets.load(other["id"])) == 20
    _csv(csv, n=25)
    assert len(node.datasets.load(other["id"])) == 25


def test_arrays_of_python_objects_are_refused_before_anything_is_written(tmp_path, node):
    with pytest.raises(DatasetError, match="Python objects"):
        node.datasets.add_arrays("odd", ["x"], np.array([{"a": 1}, None], dtype=object))
    assert node.datasets.list() == []
    assert not (node.home / "data").exists() or not any((node.home / "data").iterdir())


def _talk(url, frames):
    """Send raw frames to a serving node from a bare researcher endpoint; return replies."""

    async def go():
        t = open_transport(url, role="researcher", identity="raw-researcher")
        await t.start()
        replies = []
        try:
            for frame in frames:
                await t.send("hospital-a", frame)
                _, reply = await asyncio.wait_for(t.receive(), 10)
                replies.append(codec.decode(reply))
        finally:
            await t.close()
        return replies

    return _runtime.run(go())


def _rewrite_header(frame, **changes):
    (hlen,) = struct.unpack_from("<I", frame, 4)
    header = msgpack.unpackb(frame[8 : 8 + hlen])
    header.update(changes)
    raw = msgpack.packb(header)
    return codec.MAGIC + struct.pack("<I", len(raw)) + raw + frame[8 + hlen :]


def test_node_refuses_bad_frames_and_keeps_serving(tmp_path):
    node = Node(tmp_path / "home", node_id="hospital-a", max_frame_size=64 * 1024)
    node.datasets.add("cohort", ["diabetes"], _csv(tmp_path / "a.csv"))
    url = "inproc://node-test-bad-frames"
    node.start(url)
    try:
        ping = Envelope(Ping(), sender="raw-researcher", recipient="hospital-a")
        good = codec.encode(ping)
        big = TrainRequest(plan={}, params=ParameterSet({"w": np.zeros(100_000)}),
                           dataset_id="x")
        frames = {
            "pickle": pickle.dumps({"__reduce__": "os.system"}),
            "corrupt": good[:-3] + b"\x00\x00\x00",
            "truncated": good[:5],
            "oversized": codec.encode(Envelope(big, sender="raw-researcher")),
            "version": _rewrite_header(good, v=2),
            "unknown type": _rewrite_header(good, t="format-disk"),
            "not for nodes": codec.encode(Envelope(Pong(node_id="x"))),
            "search": codec.encode(Envelope(SearchRequest(tags=["diabetes"]),
                                            sender="raw-researcher")),
            "ping": good,
        }
        replies = dict(zip(frames, _talk(url, list(frames.values())), strict=True))
        expected = {"pickle": "Not a fedcore frame", "corrupt": "Malformed",
                    "truncated": "Truncated", "oversized": "exceeds the limit",
                    "version": "protocol version 2", "unknown type": "Unknown message type",
                    "not for nodes": "does not handle 'pong'"}
        for name, text in expected.items():
            body = replies[name].body
            assert isinstance(body, ErrorReply) and body.kind == "protocol", (name, body)
            assert text in body.message, (name, body.message)
        assert replies["version"].reply_to == ping.id  # the researcher can match the refusal
        assert isinstance(replies["search"].body, SearchReply)
        assert len(replies["search"].body.datasets) == 1
        assert isinstance(replies["ping"].body, Pong)
        assert replies["ping"].body.node_id == "hospital-a"
        assert replies["ping"].reply_to == ping.id
    finally:
        node.stop()
    events = [e["event"] for e in node.audit_log()]
    assert events.count("refused-frame") >= 2 and "search" in events and events[-1] == "stopped"


def test_changes_by_another_process_are_seen(tmp_path):
    serving = Node(tmp_path / "home", node_id="hospital-a")
    entry = serving.datasets.add("cohort", ["diabetes"], _csv(tmp_path / "a.csv"))
    assert serving.datasets.search(["diabetes"])  # cached by TinyDB, were caching on
    admin = Node(tmp_path / "home")  # the CLI or GUI, in another process
    admin.datasets.remove(entry["id"])
    assert serving.datasets.search(["diabetes"]) == []
    with pytest.raises(DatasetError):
        serving.datasets.load(entry["id"])


def test_a_loading_plan_set_by_another_process_is_used_at_once(tmp_path):
    serving = Node(tmp_path / "home", node_id="hospital-a")
    entry = serving.datasets.add("cohort", ["diabetes"], _csv(tmp_path / "a.csv"))
    assert "bmi" in serving.datasets.load(entry["id"]).frame.columns  # opened and kept
    Node(tmp_path / "home").datasets.set_loading_plan(  # the CLI, in another process
        entry["id"], {"columns": {"body_mass_index": "bmi"}})
    columns = serving.datasets.load(entry["id"]).frame.columns
    assert "body_mass_index" in columns and "bmi" not in columns
