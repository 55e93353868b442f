"""Masking's work done in place: the same payloads and sums, bit for bit, with fewer passes.

A node whose precomputed mask is ready encodes its update onto the mask (one pass, no new
vector); the researcher decodes the unmasked sum over its own memory. These tests pin every
path to a reference written from the definitions (the fixed-point formula, and AES-128-CTR
keystreams made here from the session's keys), so a faster path that changed one bit of a
payload or of a sum would fail them.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedcore.errors import ConfigurationError
from fedcore.params import ParameterSet
from fedcore.secagg import Encoding, FixedPoint, PairwiseMasking
from fedcore.secagg._background import Background
from fedcore.secagg.fixedpoint import Layout
from fedcore.secagg.local import through_the_wire
from tests._support.secagg import SMALL
from tests._support.secagg import open_round as open_secagg_round

NODES = ["a", "b", "c", "d"]


def update(size, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return ParameterSet({"w": (rng.standard_normal(size) * scale).astype(np.float32),
                         "b": rng.uniform(-1, 1, (3, 2))})


def reference_encoding(fp: FixedPoint, values: np.ndarray, weight: float) -> np.ndarray:
    """``rint(weight * clip(x) / step)`` as signed integers (the module's definition)."""
    x = np.clip(np.asarray(values, dtype=np.float64).reshape(-1), -fp.clip, fp.clip)
    return np.rint(x * (weight / fp.step)).astype(np.int64)


def reference_payload(session, upd, weight, options, dtype):
    """What a node must send: its encoded update plus its signed AES-CTR keystreams."""
    enc = Encoding.from_wire(options["encoding"])
    words = [reference_encoding(enc.values, a, weight) for a in upd.values()]
    words.append(reference_encoding(enc.weight, np.array([1.0]), weight))
    clipped = sum(int(np.count_nonzero(np.abs(np.asarray(a, np.float64)) > enc.values.clip))
                  for a in upd.values())
    words.append(np.array([clipped, 0]))
    vector = np.concatenate(words).astype(dtype)  # wraps negatives modulo the ring
    for key, sign in session._seeds(sorted(options["peers"])):
        stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(
            bytes(vector.nbytes))
        words = np.frombuffer(stream, dtype=vector.dtype.newbyteorder("<")).astype(dtype)
        vector = vector + words if sign > 0 else vector - words
    return vector


def open_round(ring_bits, reference):
    researcher, sessions = open_secagg_round(PairwiseMasking(clip=4.0, ring_bits=ring_bits),
                                             NODES, reference, SMALL)
    options = {n: through_the_wire(researcher.train_options(n)) for n in NODES}
    return researcher, sessions, options


@pytest.mark.parametrize("ring_bits", [64, 32])
@pytest.mark.parametrize("path", ["direct", "prepared, ready", "prepared, still running"])
def test_every_path_sends_the_payload_of_the_definition_and_the_sum_is_exact(
        monkeypatch, ring_bits, path):
    dtype = np.uint64 if ring_bits == 64 else np.uint32
    size = 200_003  # several keystream chunks, and a length that is no multiple of a block
    reference = update(size, seed=9)
    researcher, sessions, options = open_round(ring_bits, reference)
    if path == "prepared, still running":  # protect encodes first, then adds the mask
        monkeypatch.setattr(Background, "done", property(lambda self: False))
    sent = {}
    for i, node in enumerate(NODES):
        session = sessions[node]
        upd = update(size, seed=i, scale=2.0)  # a few values beyond clip=4: counted
        if path != "direct":
            session.prepare(options[node], reference)
            session._pre.job.result()  # the mask is ready, as after a long enough training
        payload = session.protect(upd, float(i + 1), options[node])
        assert ("precompute_s" in session.timings) == (path != "direct")
        want = reference_payload(session, upd, float(i + 1), options[node], dtype)
        assert payload["values"].dtype == dtype
        np.testing.assert_array_equal(payload["values"], want)
        sent[node] = want
        researcher.add_protected(node, through_the_wire(payload))
    for node, msg in researcher.unmask_requests().items():
        researcher.add_unmask(node, sessions[node].answer("unmask", through_the_wire(msg)))
    sums, total, _, report = researcher.unprotect_sum()
    # The masks cancel: the sum of the payloads, less the self-masks, is the encodings' sum.
    enc = Encoding.from_wire(options[NODES[0]]["encoding"])
    ints = sum(np.concatenate([reference_encoding(enc.values, a, float(i + 1))
                               for a in update(size, seed=i, scale=2.0).values()])
               for i in range(len(NODES)))
    want = ints.astype(np.float64) * enc.values.step
    np.testing.assert_array_equal(sums["w"], want[:size])
    np.testing.assert_array_equal(sums["b"], want[size:].reshape(3, 2))
    assert total == 10.0 and report["clipped"]["params"] > 0


def test_a_ready_mask_becomes_the_payload_without_a_new_vector(monkeypatch):
    reference = update(50_000, seed=9)
    _, sessions, options = open_round(64, reference)
    session = sessions["b"]
    session.prepare(options["b"], reference)
    mask = session._pre.job.result()
    monkeypatch.setattr(Encoding, "encode", lambda *a, **k: pytest.fail("encoded apart"))
    payload = session.protect(update(50_000), 3.0, options["b"])
    assert payload["values"] is mask


def test_a_prepared_mask_of_another_length_is_added_after_encoding():
    # extras make the vector longer than the mask: encoded apart, mask added, streams extended
    reference = update(1000, seed=9)
    _, sessions, options = open_round(64, reference)
    session = sessions["c"]
    extras = {"control": ParameterSet({"c": np.linspace(-1, 1, 11)})}
    direct = session.protect(update(1000), 3.0, options["c"], extras)
    session.prepare(options["c"], reference)
    mask = session._pre.job.result()
    prepared = session.protect(update(1000), 3.0, options["c"], extras)
    assert prepared["values"] is not mask and "precompute_s" in session.timings
    np.testing.assert_array_equal(prepared["values"], direct["values"])


def test_a_failed_ready_mask_is_made_directly_and_logged_once(monkeypatch, caplog):
    reference = update(1000, seed=9)
    _, sessions, options = open_round(64, reference)
    session = sessions["a"]
    direct = session.protect(update(1000), 3.0, options["a"])
    gate = threading.Event()

    def fails(seeds, size, dtype):
        gate.set()
        raise MemoryError("no room")

    monkeypatch.setattr("fedcore.secagg._crypto.combined_mask", fails)
    session.prepare(options["a"], reference)
    session._pre.job.result()  # finished (this logs the failure once already)
    caplog.clear()
    with caplog.at_level("WARNING", logger="fedcore.node"):
        again = session.protect(update(1000), 3.0, options["a"])
    np.testing.assert_array_equal(again["values"], direct["values"])
    assert gate.is_set() and sum("Precomputing" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("dtype, bits", [(np.uint64, 64), (np.uint32, 32)])
def test_encoding_onto_a_vector_is_encoding_then_adding(dtype, bits):
    enc = Encoding(5, 100.0, 2.0, 1.0, ring_bits=bits)
    rng = np.random.default_rng(3)
    upd = ParameterSet({"w": rng.standard_normal(70_001).astype(np.float32) * 2,
                        "v": rng.uniform(-3, 3, (4, 5))})
    extras = {"e": ParameterSet({"c": rng.uniform(-2, 2, 9)})}
    encoded, layout = enc.encode(upd, 37.0, extras, dtype)
    start = rng.integers(0, np.iinfo(dtype).max, encoded.size, dtype=dtype, endpoint=True)
    onto = start.copy()
    assert enc.encode_onto(onto, upd, 37.0, extras) == layout
    np.testing.assert_array_equal(onto, start + encoded)  # modulo the ring
    assert encoded[-2:].tolist() != [0, 0]  # clip counts were added too


def test_encoding_onto_a_vector_of_another_length_is_refused_and_leaves_it_unchanged():
    enc = Encoding(3, 10.0, 1.0, 1.0)
    vector = np.arange(10, dtype=np.uint64)
    with pytest.raises(ConfigurationError, match="Expected a vector of 8 words"):
        enc.encode_onto(vector, ParameterSet({"w": np.zeros(5)}), 1.0)
    with pytest.raises(ConfigurationError, match="weight"):
        enc.encode_onto(vector[:8], ParameterSet({"w": np.zeros(5)}), 11.0)
    np.testing.assert_array_equal(vector, np.arange(10, dtype=np.uint64))


@pytest.mark.parametrize("bits, dtype", [(64, np.uint64), (40, np.uint64), (32, np.uint32)])
def test_decoding_in_place_gives_the_decoded_sums_bit_for_bit(bits, dtype):
    enc = Encoding(7, 50.0, 3.0, 0.5, ring_bits=bits)
    layout = Layout([("w", (100_003,)), ("m", (2, 3))], [("e", [("c", (5,))])])
    rng = np.random.default_rng(5)
    sums = rng.integers(0, np.iinfo(dtype).max, layout.size, dtype=dtype, endpoint=True)
    sums[-3:] = [12345, 2, 1]  # weight and clip counts
    want = enc.decode(sums, layout, 7)
    got = enc.decode_in_place(sums.copy(), layout, 7)
    for a, b in ((want[0], got[0]), (want[2]["e"], got[2]["e"])):
        for k in a:
            assert b[k].dtype == np.float64
            np.testing.assert_array_equal(b[k], a[k])
    assert got[1] == want[1] and got[3] == want[3]
    # reference: the sums read as signed integers of the ring, times the step
    signed = sums.astype(np.uint64).view(np.int64) if bits == 64 else None
    if signed is not None:
        np.testing.assert_array_equal(got[0]["w"], signed[:100_003] * enc.values.step)


def test_decoding_in_place_writes_over_the_sums_and_refuses_what_it_cannot_own():
    fp = FixedPoint(1.0, -40)
    sums = np.arange(-5, 200_000, dtype=np.int64).view(np.uint64)
    out = fp.decode_in_place(sums)
    assert np.shares_memory(out, sums) and out.dtype == np.float64
    np.testing.assert_array_equal(out, np.arange(-5, 200_000) * 2.0**-40)
    frozen = np.zeros(4, np.uint64)
    frozen.flags.writeable = False
    for bad in (frozen, np.zeros(4, np.uint32), np.zeros(8, np.uint64)[::2]):
        with pytest.raises(TypeError, match="decode_in_place expects"):
            fp.decode_in_place(bad)
