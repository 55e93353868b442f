"""Pairwise masking's masks computed while the node trains (``NodeSession.prepare``).

A node that prepared its combined mask must send, byte for byte, the payload it sends when it
masks directly: the researcher's unmasking is the same either way. These tests compare the
two paths on one session, for updates of the expected length, longer ones (extras) and
shorter ones, and check that a failed precomputation falls back to masking directly.
"""

from __future__ import annotations

import gc
import logging
import threading

import numpy as np
import pytest

from fedcore import Experiment, simulate
from fedcore.errors import ProtocolError
from fedcore.params import ParameterSet
from fedcore.secagg import PairwiseMasking, masking
from fedcore.secagg import _crypto as C
from fedcore.secagg.local import through_the_wire
from tests._support.secagg import SMALL
from tests._support.secagg import open_round as open_secagg_round


def open_round(scheme, nodes, reference=None):
    """test_secagg's round up to the training options, and the options: (researcher,
    node sessions, options)."""
    researcher, sessions = open_secagg_round(scheme, nodes, reference, SMALL)
    options = {n: through_the_wire(researcher.train_options(n)) for n in nodes}
    return researcher, sessions, options


def update(size, seed=0):
    rng = np.random.default_rng(seed)
    return ParameterSet({"w": rng.standard_normal(size).astype(np.float32),
                         "b": rng.uniform(-1, 1, (3, 2))})


def both_paths(session, options, upd, extras=None, reference=None):
    """(direct payload, payload after prepare) of one session, and its timings."""
    direct = session.protect(upd, 7.0, options, extras)
    session.prepare(options, reference)
    prepared = session.protect(upd, 7.0, options, extras)
    return direct, prepared, dict(session.timings)


# 300,001 + 6 values span three keystream chunks; the sizes put the extension of a longer
# vector (at word size + 9) at every word of an AES block: 2 of them in the 64-bit ring, 4
# in the 32-bit one.
@pytest.mark.parametrize("size", [300_000, 300_001, 300_002, 300_003, 5])
@pytest.mark.parametrize("with_extras", [False, True])
@pytest.mark.parametrize("ring_bits", [64, 32])
def test_a_prepared_mask_gives_the_payload_of_direct_masking(size, with_extras, ring_bits):
    nodes = ["a", "b", "c", "d"]
    reference = update(size, seed=9)
    _, sessions, options = open_round(PairwiseMasking(clip=4.0, ring_bits=ring_bits), nodes,
                                      reference)
    extras = {"control": ParameterSet({"c": np.linspace(-1, 1, 11)})} if with_extras else None
    for node in ("a", "c"):  # the lowest node adds every pairwise stream, "c" mixes signs
        direct, prepared, timings = both_paths(sessions[node], options[node], update(size),
                                               extras)
        assert "precompute_s" in timings  # the prepared mask was used
        assert direct["layout"] == prepared["layout"]
        np.testing.assert_array_equal(prepared["values"], direct["values"])


@pytest.mark.parametrize("dtype", [np.uint64, np.uint32])
@pytest.mark.parametrize("offset", [0, 7])
def test_masks_spread_over_the_cores_are_those_of_one_thread(monkeypatch, dtype, offset):
    # Parts of 3,335 words: every part starts inside an AES block, in both rings.
    monkeypatch.setattr(C, "parallelism", lambda: 3)
    monkeypatch.setattr(C, "MIN_SPREAD_WORDS", 1000)
    seeds = [(bytes([k]) * 16, 1 if k % 2 else -1) for k in range(5)]
    start = np.arange(10_003, dtype=dtype)
    one, spread = start.copy(), start.copy()
    C.apply_masks(one, seeds, offset)
    C.apply_masks_spread(spread, seeds, offset)
    np.testing.assert_array_equal(spread, one)
    assert not np.array_equal(spread, start)


def test_masks_are_spread_over_the_idle_cores_only(monkeypatch):
    monkeypatch.setattr(C, "cores", lambda: 4)
    for load, parts in ((0.1, 4), (2.0, 3), (3.4, 2), (9.0, 1)):
        monkeypatch.setattr(C.os, "getloadavg", lambda load=load: (load, load, load))
        assert C.parallelism() == parts


@pytest.mark.parametrize("ring_bits", [64, 32])
def test_direct_masking_on_every_core_gives_the_payload_and_sum_of_one_thread(monkeypatch,
                                                                           ring_bits):
    # The node's direct masks and the researcher's unmasking spread over 3 "cores"; the
    # precomputed mask (one thread) must give the same payload, and the sum the plain one.
    monkeypatch.setattr(C, "parallelism", lambda: 3)
    monkeypatch.setattr(C, "MIN_SPREAD_WORDS", 1000)
    nodes = ["a", "b", "c", "d"]
    reference = update(30_001, seed=9)
    researcher, sessions, options = open_round(PairwiseMasking(clip=8.0, ring_bits=ring_bits),
                                               nodes, reference)
    extras = {"control": ParameterSet({"c": np.linspace(-1, 1, 4001)})}
    for i, node in enumerate(nodes):
        direct, prepared, timings = both_paths(sessions[node], options[node],
                                               update(30_001, seed=i), extras)
        assert "precompute_s" in timings
        np.testing.assert_array_equal(prepared["values"], direct["values"])
        researcher.add_protected(node, through_the_wire(direct))
    for node, msg in researcher.unmask_requests().items():
        researcher.add_unmask(node, sessions[node].answer("unmask", through_the_wire(msg)))
    sums, total, _, report = researcher.unprotect_sum()
    want = sum(7.0 * update(30_001, seed=i)["w"].astype(np.float64) for i in range(4))
    assert total == 28.0
    assert np.max(np.abs(sums["w"] - want)) <= report["error_bound"]["params"] + 1e-9


def test_an_update_shorter_than_the_prepared_mask_uses_its_prefix():
    nodes = ["a", "b", "c"]
    # Without the global model the encoding has no layout: the reference given to prepare
    # (larger than the update) sets the mask's length.
    _, sessions, options = open_round(PairwiseMasking(clip=4.0), nodes)
    direct, prepared, timings = both_paths(sessions["b"], options["b"], update(1000),
                                           reference=update(200_000))
    assert "precompute_s" in timings
    np.testing.assert_array_equal(prepared["values"], direct["values"])


def test_a_round_of_prepared_nodes_sums_like_a_plain_one():
    nodes = [f"n{i}" for i in range(5)]
    reference = update(50_000, seed=1)
    researcher, sessions, options = open_round(PairwiseMasking(threshold=3, clip=8.0), nodes,
                                               reference)
    for node in nodes:  # two precompute (MAX_PRECOMPUTED), the others mask directly
        sessions[node].prepare(options[node], reference)
    for i, node in enumerate(nodes[:4]):  # the last node drops out after preparing
        researcher.add_protected(node, through_the_wire(
            sessions[node].protect(update(50_000, seed=i), float(i + 1), options[node])))
    for node, msg in researcher.unmask_requests().items():
        researcher.add_unmask(node, sessions[node].answer("unmask", through_the_wire(msg)))
    sums, total, _, report = researcher.unprotect_sum()
    want = sum((i + 1) * update(50_000, seed=i)["w"].astype(np.float64) for i in range(4))
    assert total == 10.0 and report["dropped"] == ["n4"]
    assert np.max(np.abs(sums["w"] - want)) <= report["error_bound"]["params"] + 1e-9


def test_a_failed_precomputation_falls_back_to_direct_masking(monkeypatch, caplog):
    nodes = ["a", "b", "c"]
    _, sessions, options = open_round(PairwiseMasking(clip=4.0), nodes, update(100))
    direct = sessions["a"].protect(update(100), 7.0, options["a"])

    def fails(seeds, size, dtype):
        raise MemoryError("no room for the mask")

    monkeypatch.setattr(C, "combined_mask", fails)
    sessions["a"].prepare(options["a"], None)
    with caplog.at_level(logging.WARNING, logger="fedcore.node"):
        fallback = sessions["a"].protect(update(100), 7.0, options["a"])
    np.testing.assert_array_equal(fallback["values"], direct["values"])
    warnings = [r.getMessage() for r in caplog.records if "Precomputing" in r.getMessage()]
    assert len(warnings) == 1 and "MemoryError: no room for the mask" in warnings[0]


def test_a_mask_prepared_for_other_peers_or_discarded_is_not_used():
    nodes = ["a", "b", "c", "d"]
    _, sessions, options = open_round(PairwiseMasking(threshold=3, clip=4.0), nodes,
                                      update(100))
    session = sessions["b"]
    fewer = {**options["b"], "peers": ["a", "b", "c"]}  # "d" left before training
    session.prepare(options["b"], None)
    session.timings.clear()
    payload = session.protect(update(100), 7.0, fewer)
    assert "precompute_s" not in session.timings
    np.testing.assert_array_equal(payload["values"],
                                  session.protect(update(100), 7.0, fewer)["values"])
    session.prepare(fewer, None)
    session.discard()
    session.timings.clear()
    session.protect(update(100), 7.0, fewer)
    assert "precompute_s" not in session.timings


def test_a_process_holds_at_most_max_precomputed_masks_and_gets_its_slots_back():
    nodes = ["a", "b", "c", "d"]
    _, sessions, options = open_round(PairwiseMasking(clip=4.0), nodes, update(100))
    assert masking.MAX_PRECOMPUTED == 2
    for node in nodes:  # a simulation: four nodes in one process prepare at once
        sessions[node].prepare(options[node], None)
    used = []
    for node in nodes:
        sessions[node].timings.clear()
        sessions[node].protect(update(100), 1.0, options[node])
        used.append("precompute_s" in sessions[node].timings)
    assert used == [True, True, False, False]  # the others masked directly
    # The slots came back after protect, after discard, and when a session is dropped.
    sessions["c"].prepare(options["c"], None)
    sessions["c"].discard()
    sessions["a"].prepare(options["a"], None)
    sessions["b"].prepare(options["b"], None)
    del sessions["a"]
    gc.collect()
    sessions["d"].prepare(options["d"], None)
    sessions["d"].timings.clear()
    sessions["d"].protect(update(100), 1.0, options["d"])
    assert "precompute_s" in sessions["d"].timings


def test_bad_training_options_are_reported_by_protect_not_by_prepare():
    _, sessions, options = open_round(PairwiseMasking(clip=4.0), ["a", "b", "c"],
                                      update(10))
    bad = {**options["a"], "peers": ["a", "z", "b"]}
    sessions["a"].prepare(bad, None)  # nothing to prepare; no error yet
    with pytest.raises(ProtocolError, match="Expected at least t=2 peers"):
        sessions["a"].protect(update(10), 1.0, bad)


# --- through real nodes ------------------------------------------------------------------

torch = pytest.importorskip("torch")

from tests._support.torch_plans import TinyMLP  # noqa: E402


@pytest.fixture
def every_node_precomputes(monkeypatch):
    """Three nodes in one process: let all of them precompute, as on a federation."""
    monkeypatch.setattr(masking, "_precomputed", threading.BoundedSemaphore(3))


def _run(**kwargs):
    with simulate.SimulatedFederation() as fed:
        for i in range(3):
            rng = np.random.default_rng(i)
            X = rng.normal(size=(60, 4)).astype(np.float32)
            node = fed.add_node(f"node-{i + 1}")
            node.set_policy(secagg_min_key_bits=512)  # small keys: a test's speed
            node.datasets.add_arrays(
                f"part-{i}", ["pre"], X, (X[:, 0] > 0).astype(np.int64))
        exp = Experiment(TinyMLP, tags=["pre"], federation=fed.url, seed=3, progress=False,
                         training_args={"epochs": 1, "batch_size": 16, "lr": 0.1},
                         timeout=30, **kwargs)
        exp.run(2)
        return exp


@pytest.mark.parametrize("aggregator", ["fedavg", "scaffold"])  # scaffold: longer vectors
def test_nodes_prepare_their_masks_while_training_and_the_model_is_the_plain_one(
        monkeypatch, every_node_precomputes, aggregator):
    calls = []
    real = C.combined_mask

    def counted(seeds, size, dtype):
        calls.append(size)
        return real(seeds, size, dtype)

    monkeypatch.setattr(C, "combined_mask", counted)
    plain = _run(aggregator=aggregator)
    masked = _run(aggregator=aggregator, secagg="masking")
    assert masked.parameters.allclose(plain.parameters, rtol=0, atol=1e-6)
    assert len(calls) == 6  # 3 nodes, 2 rounds: each node prepared its mask every round


def test_nodes_whose_precomputation_fails_still_send_a_correct_masked_update(
        monkeypatch, caplog, every_node_precomputes):
    def fails(seeds, size, dtype):
        raise RuntimeError("precomputation broken")

    plain = _run()
    monkeypatch.setattr(C, "combined_mask", fails)
    with caplog.at_level(logging.WARNING, logger="fedcore.node"):
        masked = _run(secagg="masking")
    assert masked.parameters.allclose(plain.parameters, rtol=0, atol=1e-6)
    assert set(masked.history["status"]) == {"ok"}
    assert sum("precomputation broken" in r.getMessage() for r in caplog.records) == 6
