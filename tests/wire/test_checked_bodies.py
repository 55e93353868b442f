"""The decoder's memo of checked bodies (:func:`fedcore.wire.codec._body`).

A node gets the same training-request body, byte for byte, every round: the decoder keeps
the bodies that passed every field check and skips the checks for them. These tests hold it
to its promise: what decodes is what a full decode makes, in new objects each time, with
this frame's arrays, and a frame that a full decode refuses is refused with the same error,
however crafted (a researcher may send crafted but correctly signed frames).
"""

from __future__ import annotations

import math
import struct

import msgpack
import numpy as np
import pytest

from fedcore.errors import ProtocolError
from fedcore.params import ParameterSet
from fedcore.wire import codec
from fedcore.wire.messages import Envelope, PlanSubmit, TrainRequest, message_types
from tests.wire.test_codec import SAMPLES, _assert_same


@pytest.fixture(autouse=True)
def fresh_memo(monkeypatch):
    memo = codec._CheckedBodies()
    monkeypatch.setattr(codec, "_CHECKED", memo)
    return memo


def _split(frame):
    """The header of a frame and the bytes of each of its arrays."""
    (hlen,) = struct.unpack_from("<I", frame, 4)
    header = msgpack.unpackb(frame[8 : 8 + hlen])
    pos, blobs = 8 + hlen, []
    for dtype, shape in header["a"]:
        pos = -(-pos // 64) * 64
        end = pos + math.prod(shape) * np.dtype(dtype).itemsize
        blobs.append(frame[pos:end])
        pos = end
    return header, blobs


def _join(header, blobs):
    raw = msgpack.packb(header)
    out = bytearray(codec.MAGIC + struct.pack("<I", len(raw)) + raw)
    for blob in blobs:
        out += bytes(-len(out) % 64)
        out += blob
    return bytes(out)


def _outcome(frame):
    """What decoding ``frame`` gives: the envelope, or the error's type and message."""
    try:
        return codec.decode(frame)
    except ProtocolError as exc:
        return (type(exc), str(exc))


def _assert_same_outcome(a, b):
    if isinstance(a, tuple):
        assert a == b
        return
    assert not isinstance(b, tuple), b
    assert type(a.body) is type(b.body)
    assert (a.sender, a.recipient, a.experiment, a.round, a.id, a.reply_to, a.version) == (
        b.sender, b.recipient, b.experiment, b.round, b.id, b.reply_to, b.version)
    for name, value in a.body.to_wire().items():
        _assert_same(value, getattr(b.body, name))


def _request(**changes):
    fields = {
        "plan": {"files": {"plan.py": "x = 1\n"}, "entry": "P", "backend": "sklearn"},
        "params": ParameterSet({"w": np.arange(6, dtype=np.float32).reshape(2, 3),
                                "b": np.ones(2)}),
        "dataset_id": "ds-1",
        "training_args": {"epochs": 2, "lr": 0.1, "layers": [4, [5, 6]]},
        "data_info": {"categories": {"target": [0, 1]}, "feature_shape": [3]},
        "algorithm": {"control": np.zeros(3, dtype=np.float32)},
    }
    fields.update(changes)
    return TrainRequest(**fields)


def _frame(body=None, **routing):
    env = Envelope(body if body is not None else _request(), sender="researcher",
                   recipient="n1", experiment="exp", round=3, **routing)
    return codec.encode(env)


@pytest.mark.parametrize("tag", sorted(SAMPLES))
def test_a_body_seen_before_decodes_to_what_a_full_decode_makes(tag, monkeypatch, fresh_memo):
    cls = message_types()[tag]
    monkeypatch.setattr(cls, "REPEATS", True)  # every type through the memo
    frame = codec.encode(Envelope(SAMPLES[tag], sender="r", recipient="n1", round=2))
    full = codec.decode(frame)
    assert len(fresh_memo) == 1
    for _ in range(2):
        _assert_same_outcome(full, codec.decode(frame))
    for name, value in SAMPLES[tag].to_wire().items():
        _assert_same(value, getattr(full.body, name))


def test_a_body_with_fields_missing_unknown_or_out_of_order_decodes_as_in_full(fresh_memo):
    header, blobs = _split(_frame())
    fields = msgpack.unpackb(header["b"], ext_hook=lambda code, data: msgpack.ExtType(code,
                                                                                      data))
    del fields["training_args"], fields["privacy"]
    reordered = {"added_in_v9": [1, 2], **dict(reversed(fields.items()))}
    frame = _join({**header, "b": msgpack.packb(reordered)}, blobs)
    full = codec.decode(frame)
    assert full.body.training_args == {} and full.body.privacy == {}
    again = codec.decode(frame)
    _assert_same_outcome(full, again)
    assert again.body.training_args == {} and again.body.training_args is not (
        full.body.training_args)
    assert len(fresh_memo) == 1


def test_decodes_of_the_same_body_share_no_mutable_object():
    frame = _frame()
    first, second, third = (codec.decode(frame).body for _ in range(3))
    for a, b in ((first, second), (second, third), (first, third)):
        for name in ("plan", "training_args", "data_info", "model_args", "privacy",
                     "algorithm"):
            assert getattr(a, name) is not getattr(b, name)
        assert a.plan["files"] is not b.plan["files"]
        assert a.training_args["layers"] is not b.training_args["layers"]
        assert a.training_args["layers"][1] is not b.training_args["layers"][1]
        assert a.data_info["categories"]["target"] is not b.data_info["categories"]["target"]
        assert a.params is not b.params
    # What a plan or a node does to one decode's values leaves the next decode's alone.
    second.training_args["epochs"] = 100
    second.training_args["layers"][1].append(7)
    second.plan["files"]["plan.py"] = "import os\n"
    second.model_args["k"] = 1
    fourth = codec.decode(frame).body
    assert fourth.training_args == {"epochs": 2, "lr": 0.1, "layers": [4, [5, 6]]}
    assert fourth.plan["files"] == {"plan.py": "x = 1\n"} and fourth.model_args == {}
    assert third.training_args["epochs"] == 2


def test_a_body_seen_before_takes_the_arrays_of_the_frame_at_hand(fresh_memo):
    header, blobs = _split(_frame())
    codec.decode(_join(header, blobs))
    new = [bytes(b"\x01" * len(blob)) for blob in blobs]
    # The same body, other arrays (other values, and the model's first as int32).
    descriptors = [["<i4", header["a"][0][1]], *header["a"][1:]]
    got = codec.decode(_join({**header, "a": descriptors}, new)).body
    assert len(fresh_memo) == 1
    assert got.params["w"].dtype == np.int32 and (got.params["w"] == 0x01010101).all()
    assert got.algorithm["control"].tobytes() == new[2]
    assert not got.params["w"].flags.writeable


def _crafted(header, blobs):
    """Frames that carry ``header``'s body, each wrong in another way or another type."""
    body = header["b"]
    return {
        "no arrays": _join({**header, "a": []}, []),
        "an array short": _join({**header, "a": header["a"][:2]}, blobs[:2]),
        "truncated": _join(header, blobs)[:-5],
        "object dtype": _join({**header, "a": [["|O8", [2]], *header["a"][1:]]}, blobs),
        "shape too big": _join({**header, "a": [["<f4", [2, 1 << 40]], *header["a"][1:]]},
                               blobs),
        "bad routing": _join({**header, "from": 5}, blobs),
        "bad round": _join({**header, "rnd": "3"}, blobs),
        "other version": _join({**header, "v": 2}, blobs),
        "unknown type": _join({**header, "t": "train-v2"}, blobs),
        "a reply": _join({**header, "t": "train-reply"}, blobs),
        "a stats request": _join({**header, "t": "stats"}, blobs),
        "a plan submission": _join({**header, "t": "plan-submit"}, blobs),
        "the body cut": _join({**header, "b": body[:-3]}, blobs),
        "the body bytes": _join({**header, "b": "text"}, blobs),
        "the same body": _join(header, blobs),
    }


def test_a_crafted_frame_around_a_body_seen_before_is_checked_exactly_as_before(
        monkeypatch, fresh_memo):
    """A correctly signed but crafted frame: the bytes of a body the node accepted, with
    other arrays, a malformed header or another type. It decodes, or is refused with the
    very error, as when the body was never seen."""
    monkeypatch.setattr(PlanSubmit, "REPEATS", True)  # another type that accepts the body
    header, blobs = _split(_frame())
    frames = _crafted(header, blobs)
    unseen = {name: _outcome(frame) for name, frame in frames.items()}
    assert len(fresh_memo) == 2  # this body as a train request and as a plan submission
    assert sum(isinstance(o, tuple) for o in unseen.values()) == len(frames) - 2
    assert isinstance(unseen["a plan submission"].body, PlanSubmit)
    for _ in range(2):  # the same frames, each body now known as checked
        for name, frame in frames.items():
            _assert_same_outcome(unseen[name], _outcome(frame))
    fresh_memo.clear()
    codec.decode(_frame())  # once more after an honest decode, in another order
    for name, frame in reversed(frames.items()):
        _assert_same_outcome(unseen[name], _outcome(frame))


@pytest.mark.parametrize("field, value, message", [
    ("training_args", [1, 2], "train.training_args must be dict"),
    ("plan", {b"files": "x"}, "train.plan must be dict"),
    ("seed", True, "train.seed must be int"),
    ("test_ratio", "0.2", "train.test_ratio must be float"),
    ("dataset_id", None, "train.dataset_id must be str"),
    ("params", msgpack.ExtType(1, struct.pack("<I", 0)), "train.params must be"),
    ("params", msgpack.ExtType(7, b""), "Unknown extension type 7"),
])
def test_a_body_that_failed_its_checks_fails_again_and_is_never_remembered(
        field, value, message, fresh_memo):
    header, blobs = _split(_frame())
    fields = msgpack.unpackb(header["b"], ext_hook=lambda code, data: msgpack.ExtType(code,
                                                                                      data),
                             strict_map_key=False)
    fields[field] = value
    bad = _join({**header, "b": msgpack.packb(fields)}, blobs)
    for _ in range(3):
        with pytest.raises(ProtocolError, match=message):
            codec.decode(bad)
    assert len(fresh_memo) == 0
    codec.decode(_join(header, blobs))  # the honest body, remembered ...
    assert len(fresh_memo) == 1
    with pytest.raises(ProtocolError, match=message):  # ... does not vouch for the bad one
        codec.decode(bad)


def test_the_memo_holds_its_bounds():
    memo = codec._CheckedBodies(max_entries=3, max_bytes=100, max_body=40)
    for i in range(10):
        memo.add(TrainRequest, bytes([i]) * 30, None)
        assert len(memo) <= 3 and memo.nbytes <= 100
    assert memo.nbytes == 90 and memo.get(TrainRequest, bytes([9]) * 30) is None
    assert memo.get(TrainRequest, bytes([0]) * 30) is codec._UNCHECKED  # the oldest went
    memo.add(TrainRequest, b"x" * 41, None)  # over max_body: never kept
    assert memo.get(TrainRequest, b"x" * 41) is codec._UNCHECKED
    memo.add(TrainRequest, b"y" * 40, None)  # 3 entries already: the oldest makes room
    assert len(memo) == 3 and memo.nbytes == 100
    memo.add(TrainRequest, b"z" * 40, None)  # 100 + 40 bytes: the two oldest make room
    assert len(memo) == 2 and memo.nbytes == 80
    assert memo.get(TrainRequest, b"y" * 40) is None
    assert memo.get(PlanSubmit, b"y" * 40) is codec._UNCHECKED  # by type and bytes


def test_the_memo_keeps_the_requests_of_a_thousand_nodes_and_not_large_bodies(fresh_memo):
    frames = [_frame(_request(dataset_id=f"ds-{i:04d}")) for i in range(1000)]
    for frame in frames:
        codec.decode(frame)
    assert len(fresh_memo) == 1000
    assert fresh_memo.nbytes <= fresh_memo.max_bytes
    for i, frame in enumerate(frames):  # the next round: each from the memo, its own
        assert codec.decode(frame).body.dataset_id == f"ds-{i:04d}"
    large = _request(plan={"files": {"plan.py": "#" * (fresh_memo.max_body + 1)}})
    got = codec.decode(_frame(large)).body
    assert got.plan == large.plan and len(fresh_memo) == 1000
