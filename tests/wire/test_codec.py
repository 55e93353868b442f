from __future__ import annotations

import dataclasses
import pickle
import struct

import msgpack
import numpy as np
import pytest

from fedcore.errors import ProtocolError
from fedcore.params import ParameterSet
from fedcore.transport import Parts
from fedcore.wire import codec
from fedcore.wire.messages import (
    Checkpoint,
    Envelope,
    ErrorReply,
    Ping,
    PlanStatus,
    PlanStatusRequest,
    PlanSubmit,
    Pong,
    SearchReply,
    SearchRequest,
    SecaggReply,
    SecaggRequest,
    StatsReply,
    StatsRequest,
    TrainProgress,
    TrainReply,
    TrainRequest,
    message_types,
)
from tests._support import fuzz
from tests._support.fuzz import HOSTILE_DTYPES, HOSTILE_SHAPES


def _params():
    return ParameterSet({
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.array([1.5, -2.0], dtype=np.float64),
        "count": np.array(7, dtype=np.int64),
        "half": np.ones((2, 2), dtype=np.float16),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "big_endian": np.arange(3, dtype=">i4"),
    })


SAMPLES = {
    "ping": Ping(),
    "pong": Pong(node_id="n1", name="Hospital A", fedcore_version="0.1.0",
                 backends=["sklearn", "torch"]),
    "search": SearchRequest(tags=["a", "b"]),
    "search-reply": SearchReply(node_id="n1", datasets=[{"id": "ds-1", "metadata": {"n": 3}}],
                                available_tags=["a"]),
    "train": TrainRequest(plan={"files": {"plan.py": "x = 1\n"}, "entry": "P",
                                "backend": "sklearn"},
                          params=_params(), dataset_id="ds-1", model_args={"k": [1, 2]},
                          training_args={"lr": 0.1}, data_info={"n_samples": 5},
                          test_ratio=0.2, seed=3, evaluate_global=False),
    "train-reply": TrainReply(params=_params(), n_samples=10, n_test=2,
                              metrics_global={"accuracy": 0.5}, train_stats={"loss": 1.0},
                              timings={"train_s": 0.1}, device="cpu",
                              overrides={"epochs": 5},
                              policy_notes=["epochs 50 clamped to this node's maximum 5"]),
    "error": ErrorReply(kind="plan", message="boom", exc_type="ValueError", traceback="tb"),
    "stats": StatsRequest(dataset_id="ds-1", queries=[
        {"variable": "age", "shift": 51.5, "min_max": True,
         "edges": np.array([0.0, 40.0, 65.0, 120.0])},
        {"variable": "T1", "shift": 0.0, "min_max": False, "edges": None}]),
    "stats-reply": StatsReply(node_id="n1", min_count=5, results=[
        {"variable": "age", "min": 18.0, "max": 97.0,
         "additive": {"count": 120, "missing": 2, "sum": -3.5, "sumsq": 4410.25,
                      "hist": np.array([0, 70, 50], dtype=np.int64), "below": 0, "above": 0},
         "withheld": [{"cell": "bin", "bin": 0, "reason": "fewer than 5 values"}]}]),
    "plan-submit": PlanSubmit(plan={"files": {"plan.py": "x = 1\n"}, "entry": "P",
                                    "backend": "sklearn", "sha256": "ab" * 32},
                              message="v2: fewer epochs"),
    "plan-status": PlanStatusRequest(plan_hash="ab" * 32),
    "plan-status-reply": PlanStatus(node_id="n1", plan_hash="ab" * 32, status="rejected",
                                    note="uses the GPU", approval_required=True,
                                    submitted_at=1.5e9, reviewed_at=None),
    "checkpoint": Checkpoint(state={"round": 3}, params=_params(), history=[{"round": 1}],
                             aggregator_state={"m": np.zeros(2)}),
    "train-progress": TrainProgress(step=40, epoch=1, loss=0.31, samples=640, elapsed_s=2.5,
                                    fraction=0.4),
    "secagg": SecaggRequest(phase="share_keys", payload={
        "session": "ab" * 16, "keys": {"n1": b"\x01" * 32}, "nodes": ["n1", "n2"]}),
    "secagg-reply": SecaggReply(payload={"session": "ab" * 16, "node": "n1",
                                         "shares": {"n2": b"\x02" * 48},
                                         "masked": np.arange(4, dtype=np.uint64)}),
}


def _assert_same(a, b):
    if isinstance(a, ParameterSet):
        assert isinstance(b, ParameterSet) and a.equal(b)
        assert all(b[k].dtype == a[k].dtype for k in a)
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b) and a.dtype == b.dtype
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def test_every_message_type_has_a_sample():
    assert set(SAMPLES) == set(message_types())


@pytest.mark.parametrize("tag", sorted(SAMPLES))
def test_every_message_type_round_trips(tag):
    env = Envelope(SAMPLES[tag], sender="researcher", recipient="n1", experiment="exp",
                   round=4)
    back = codec.decode(codec.encode(env))
    assert type(back.body) is type(env.body) and back.tag == tag
    assert (back.sender, back.recipient, back.experiment, back.round, back.id) == (
        "researcher", "n1", "exp", 4, env.id)
    for name, value in env.body.to_wire().items():
        _assert_same(value, getattr(back.body, name))


def test_reply_reverses_routing():
    env = Envelope(Ping(), sender="r", recipient="n", experiment="e", round=2)
    reply = env.reply(Pong(node_id="n"))
    assert (reply.sender, reply.recipient, reply.reply_to, reply.round) == ("n", "r", env.id, 2)


def test_decoded_arrays_are_zero_copy_read_only_views():
    params = ParameterSet({"w": np.random.default_rng(0).random(10_000, dtype=np.float32)})
    frame = codec.encode(Envelope(TrainReply(params=params, n_samples=1)))
    back = codec.decode(frame).body.params["w"]
    assert np.shares_memory(back, np.frombuffer(frame, dtype=np.uint8))
    assert not back.flags.writeable
    offset = back.ctypes.data - np.frombuffer(frame, dtype=np.uint8).ctypes.data
    assert offset % 64 == 0 and back.flags.aligned  # aligned for vectorised reads


def _frame(header_overrides=None, raw_header=None):
    frame = codec.encode(Envelope(Ping(), sender="x"))
    if raw_header is None:
        (hlen,) = struct.unpack_from("<I", frame, 4)
        header = msgpack.unpackb(frame[8 : 8 + hlen])
        header.update(header_overrides or {})
        raw_header = msgpack.packb(header)
    return codec.MAGIC + struct.pack("<I", len(raw_header)) + raw_header


@pytest.mark.parametrize(
    "frame, message",
    [
        (codec.encode(Envelope(SAMPLES["train"]))[:-10], "Truncated"),
        (codec.encode(Envelope(Ping()))[:6], "Truncated"),
        (b"", "Truncated"),
        (pickle.dumps({"evil": "payload"}), "Not a fedcore frame"),
        (pickle.dumps(np.zeros(3)), "Not a fedcore frame"),
        (_frame({"v": 99}), "protocol version 99"),
        (_frame({"t": "launch-missiles"}), "Unknown message type 'launch-missiles'"),
        (_frame({"a": [["|O8", [3]]]}), "dtype '|O8' is not allowed"),
        (_frame({"b": msgpack.packb([1, 2])}), "body must be a map"),
        (_frame(raw_header=b"\xc1\xc1\xc1"), "Malformed frame header"),
        (_frame(raw_header=msgpack.packb([1, 2, 3])), "expected a map"),
    ],
)
def test_bad_frames_are_refused_with_a_protocol_error(frame, message):
    with pytest.raises(ProtocolError, match=message):
        codec.decode(frame)
    with pytest.raises(ProtocolError, match=message):  # the same, handed over in parts
        codec.decode(Parts([frame[:5], frame[5:9], frame[9:]]))


def test_a_frame_in_parts_decodes_as_the_joined_frame_wherever_it_is_cut():
    params = ParameterSet({"w": np.arange(1000, dtype=np.float32), "e": np.zeros((0, 2)),
                           "b": np.ones(3)})
    env = Envelope(TrainReply(params=params, n_samples=7), sender="node-1")
    parts = codec.encode_parts(env)
    frame = b"".join(parts)
    as_encoded = Parts(parts)  # each array a piece: decoded where it is
    back = codec.decode(as_encoded).body.params
    piece = next(p for p in as_encoded.pieces if len(p) == params["w"].nbytes)
    assert back.equal(params) and np.shares_memory(back["w"], piece)
    for cut in (1, 7, 100, len(frame) // 2, len(frame) - 1):  # arrays across pieces
        got = codec.decode(Parts([frame[:cut], frame[cut:]]))
        assert got.body.params.equal(params) and got.body.n_samples == 7
        assert not got.body.params["w"].flags.writeable
    assert codec.reply_id(as_encoded) == (env.id, "")


def test_body_fields_are_type_checked():
    frame = codec.encode(Envelope(SearchRequest(tags=["a"])))
    (hlen,) = struct.unpack_from("<I", frame, 4)
    header = msgpack.unpackb(frame[8 : 8 + hlen])
    header["b"] = msgpack.packb({"tags": "not-a-list"})
    raw = msgpack.packb(header)
    with pytest.raises(ProtocolError, match="search.tags must be list"):
        codec.decode(codec.MAGIC + struct.pack("<I", len(raw)) + raw)


@pytest.mark.parametrize("name, value, message", [
    ("n_samples", True, "train-reply.n_samples must be int"),
    ("timings", {"train_s": "1"}, "train-reply.timings must be dict"),
    ("policy_notes", ["ok", 3], "train-reply.policy_notes must be list"),
    ("secagg", {1: 2}, "train-reply.secagg must be dict"),
])
def test_a_body_with_every_field_in_order_is_checked_field_by_field(name, value, message):
    """A body as senders write it (every field, in order) is checked in one pass; the first
    field that fails is named, and the body keeps none of the map it was given."""
    fields = SAMPLES["train-reply"].to_wire()
    body = TrainReply.from_wire(fields)
    fields["metrics_global"] = {"auc": 1.0}
    assert body.metrics_global == {"accuracy": 0.5}
    fields = {**SAMPLES["train-reply"].to_wire(), name: value}
    assert tuple(fields) == tuple(f.name for f in dataclasses.fields(TrainReply))
    with pytest.raises(ProtocolError, match=message):
        TrainReply.from_wire(fields)


def test_unknown_fields_are_ignored_for_forward_compatibility():
    frame = codec.encode(Envelope(SearchRequest(tags=["a"])))
    (hlen,) = struct.unpack_from("<I", frame, 4)
    header = msgpack.unpackb(frame[8 : 8 + hlen])
    header["b"] = msgpack.packb({"tags": ["a"], "added_in_v1_1": True})
    raw = msgpack.packb(header)
    assert codec.decode(codec.MAGIC + struct.pack("<I", len(raw)) + raw).body.tags == ["a"]


def test_oversized_frames_are_refused_on_both_sides():
    params = ParameterSet({"w": np.zeros(1000, dtype=np.float64)})
    env = Envelope(TrainReply(params=params, n_samples=1))
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        codec.encode(env, max_size=4000)
    frame = codec.encode(env)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        codec.decode(frame, max_size=4000)


def test_object_arrays_and_arbitrary_objects_never_encode():
    with pytest.raises(TypeError):
        ParameterSet({"o": np.array([object()])})

    class Custom:
        pass

    with pytest.raises(ProtocolError, match="Cannot send a Custom"):
        codec.encode(Envelope(SearchReply(node_id="n", datasets=[{"x": Custom()}])))


def test_array_reference_out_of_range_is_refused():
    frame = codec.encode(Envelope(TrainReply(params=ParameterSet({"w": np.zeros(2)}),
                                             n_samples=1)))
    (hlen,) = struct.unpack_from("<I", frame, 4)
    header = msgpack.unpackb(frame[8 : 8 + hlen])
    header["a"] = []  # the body still references array 0
    raw = msgpack.packb(header)
    with pytest.raises(ProtocolError, match="out of range"):
        codec.decode(codec.MAGIC + struct.pack("<I", len(raw)) + raw)


@pytest.mark.parametrize("dtype", HOSTILE_DTYPES)
def test_only_numpys_canonical_numeric_dtypes_decode(dtype):
    """Strings that look numeric but numpy rejects or reads otherwise ("f3", "<f8\\n",
    "<f16") are protocol errors, as is anything that is not a string."""
    frame = _frame({"a": [[dtype, [3]]], "b": msgpack.packb({})})
    with pytest.raises(ProtocolError, match="not allowed on the wire"):
        codec.decode(frame)


@pytest.mark.parametrize("shape", HOSTILE_SHAPES)
def test_array_shapes_are_bounded_in_rank_and_size(shape):
    frame = _frame({"a": [["<f8", shape]], "b": msgpack.packb({})})
    with pytest.raises(ProtocolError, match="shape"):
        codec.decode(frame)


def test_a_layout_seen_in_good_frames_does_not_let_bad_ones_through():
    """The decoder keeps the checked array layout of the frames it decodes: a frame that
    names nearly the same arrays (a bool or float for an int, another limit) or lacks the
    bytes they need is still refused."""
    good = codec.encode(Envelope(TrainReply(params=ParameterSet({"w": np.ones(3)}),
                                            n_samples=1)))
    for _ in range(2):
        assert codec.decode(good).body.params["w"].tolist() == [1.0, 1.0, 1.0]
    for shape in ([True], [3.0], [3, True]):
        with pytest.raises(ProtocolError, match="shape"):
            codec.decode(_frame({"a": [["<f8", shape]], "b": msgpack.packb({})}))
    with pytest.raises(ProtocolError, match="Truncated frame"):
        codec.decode(good[:-8])
    big = _frame({"a": [["<f8", [100]]], "b": msgpack.packb({})})
    with pytest.raises(ProtocolError, match="Truncated frame"):
        codec.decode(big)
    with pytest.raises(ProtocolError, match="exceeds the frame size limit"):
        codec.decode(big, max_size=400)


def test_every_allowed_dtype_round_trips_in_both_byte_orders():
    arrays = {name: np.arange(3).astype(name) for name in sorted(codec.DTYPES)}
    back = codec.decode(codec.encode(Envelope(TrainReply(
        params=ParameterSet(arrays), n_samples=1)))).body.params
    assert {name: back[name].dtype.str for name in back} == {n: n for n in arrays}


def test_a_dtype_the_wire_does_not_carry_is_refused_when_sent():
    with pytest.raises(ProtocolError, match=r"convert it first"):
        codec.encode(Envelope(TrainReply(params=ParameterSet(
            {"w": np.zeros(2, dtype=np.longdouble)}), n_samples=1)))


def test_100000_mutated_frames_raise_only_protocol_errors():
    """The decoder alone, seeded: every outcome is an envelope or a ProtocolError (the node's
    and the researcher's receive paths are fuzzed in tests/wire/test_fuzz.py)."""
    decoded = 0
    for frame in fuzz.frames(SAMPLES, 100_000, seed=15):
        try:
            codec.decode(frame)
            decoded += 1
        except ProtocolError:
            pass
    assert 1_000 < decoded < 90_000  # the mutations reach far, and most are refused


@pytest.mark.parametrize(("metrics", "ok"), [
    ({"loss": 0.5, "steps": 3, "accuracy": None}, True), ({}, True),
    ({"loss": "0.5"}, False), ({"loss": True}, False), ({"loss": [0.5]}, False),
    ({1: 0.5}, False), ({"loss": 0.5, "accuracy": "high"}, False)])
def test_a_replys_metrics_are_checked_name_and_value(metrics, ok):
    frame = codec.encode(Envelope(TrainReply(params=ParameterSet(), n_samples=1,
                                             metrics_global=metrics, timings=metrics)))
    if ok:
        body = codec.decode(frame).body
        assert body.metrics_global == metrics and body.timings == metrics
    else:
        with pytest.raises(ProtocolError, match="train-reply"):
            codec.decode(frame)


def test_a_snapshots_arrays_are_sent_as_their_bytes_and_other_views_as_they_are():
    """encode_parts hands a snapshot's array over as the bytes it views (no one can change
    them); an array that views only part of some bytes, or out of order, is sent as itself."""
    snapshot = ParameterSet({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}).snapshot()
    owner = snapshot["w"].base.base
    assert type(owner) is bytes
    parts = codec.encode_parts(Envelope(TrainReply(params=snapshot, n_samples=1)))
    assert any(p is owner for p in parts)
    raw = np.arange(16, dtype=np.float32).tobytes()
    for arr in (np.frombuffer(raw, np.float32)[2:], np.frombuffer(raw, np.float32, 8, 16),
                np.frombuffer(raw, np.float32).reshape(4, 4).T,
                np.frombuffer(raw, np.float32).reshape(4, 4)[:, 1:]):
        params = ParameterSet({"w": arr})
        env = Envelope(TrainReply(params=params, n_samples=1))
        for frame in (codec.encode(env), Parts(codec.encode_parts(env))):
            assert np.array_equal(codec.decode(frame).body.params["w"], arr)


def test_parameter_set_references_seen_before_are_still_checked_against_the_frame():
    """The decoder keeps the checked name/reference list of a parameter set by its exact
    bytes: the same list in a frame that lacks the arrays it names is still refused, and a
    reference that is not an index never decodes."""
    params = ParameterSet({"w": np.zeros(2), "b": np.ones(1)})
    frame = codec.encode(Envelope(TrainReply(params=params, n_samples=1)))
    assert codec.decode(frame).body.params.equal(params)
    (hlen,) = struct.unpack_from("<I", frame, 4)
    header = msgpack.unpackb(frame[8 : 8 + hlen])
    for arrays in ([], header["a"][:1]):
        raw = msgpack.packb({**header, "a": arrays})
        with pytest.raises(ProtocolError, match="out of range"):
            codec.decode(codec.MAGIC + struct.pack("<I", len(raw)) + raw + bytes(256))
    for ref, message in ((-1, "out of range"), (5, "out of range"), (1.0, "Malformed"),
                         ([0], "Malformed"), (b"\x00\x00", "Malformed")):
        refs = msgpack.ExtType(2, msgpack.packb([["w", ref]]))
        body = msgpack.packb({"params": refs, "n_samples": 1})
        raw = msgpack.packb({**header, "b": body})
        for _ in range(2):  # the second time, from what the first one left
            with pytest.raises(ProtocolError, match=message):
                codec.decode(codec.MAGIC + struct.pack("<I", len(raw)) + raw + bytes(256))


def test_message_ids_are_128_random_bits_in_hex():
    from fedcore.wire.messages import new_id

    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 and i == i.lower() for i in ids)
    assert len({Envelope(Ping()).id for _ in range(10)}) == 10


def test_a_batch_of_ids_is_as_many_fresh_128_bit_ids():
    from fedcore.wire.messages import new_ids

    ids = new_ids(1000)
    assert len(set(ids)) == 1000 and new_ids(0) == []
    assert all(len(i) == 32 and int(i, 16) >= 0 and i == i.lower() for i in ids)
    assert not set(ids) & set(new_ids(1000))


def _joined(parts):
    return b"".join(bytes(memoryview(p).cast("B")) for p in parts)


def test_a_batch_encoder_makes_each_frame_byte_for_byte_as_encode_parts():
    shared = _params()
    plan = {"files": {"plan.py": "x = 1\n"}, "entry": "P", "backend": "sklearn"}
    control = {"c": np.arange(4, dtype=np.float32)}  # arrays after the model's
    three = ParameterSet({"a": np.ones(2), "b": np.zeros(3), "c": np.ones(1, np.int32)})
    bodies = [
        TrainRequest(plan=plan, params=shared, dataset_id=f"ds-{i}", algorithm=control,
                     secagg={"node": f"n{i}"}) for i in range(3)]
    # The same control, now after three arrays, not six: its references must change.
    bodies.append(TrainRequest(plan=plan, params=three, dataset_id="ds-x", algorithm=control))
    bodies.append(SAMPLES["secagg"])
    encoder = codec.BatchEncoder()
    for i, body in enumerate(bodies):
        env = Envelope(body=body, sender="r", recipient=f"n{i}", experiment="e", round=2)
        frame = _joined(encoder.encode_parts(env))
        assert frame == codec.encode(env)
        got = codec.decode(frame)
        assert got.recipient == f"n{i}" and got.id == env.id
        for name in body.to_wire():
            _assert_same(getattr(body, name), getattr(got.body, name))


def test_a_batch_encoder_refuses_what_cannot_be_sent_and_goes_on_with_the_next():
    encoder = codec.BatchEncoder()
    bad = Envelope(SearchReply(node_id="n1", datasets=[{"x": object()}]))
    with pytest.raises(ProtocolError, match="Cannot send a object"):
        encoder.encode_parts(bad)
    good = Envelope(SAMPLES["train"], recipient="n2")
    assert _joined(encoder.encode_parts(good)) == codec.encode(good)
    too_big = codec.BatchEncoder(max_size=256)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        too_big.encode_parts(good)


def test_a_decoded_body_is_the_frozen_dataclass_its_constructor_makes():
    import dataclasses

    sent = SAMPLES["train-reply"]
    env = codec.decode(codec.encode(Envelope(sent, sender="n1", recipient="r")))
    got = env.body
    assert type(got) is TrainReply and got.to_wire().keys() == sent.to_wire().keys()
    assert repr(dataclasses.replace(got, params=sent.params)) == repr(sent)
    assert got.extras == {} and got.extras is not TrainReply(params=sent.params,
                                                            n_samples=1).extras
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.n_samples = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        env.sender = "x"  # type: ignore[misc]
    assert env == dataclasses.replace(env) and env.sender == "n1" and env.reply_to == ""
