"""Joye-Libert on every core, and its masks ``H(t)^{sk_i}`` computed while the node trains.

Both change where the work runs, never the result: a node that prepared its masks sends the
ciphertexts, byte for byte, that it sends when it encrypts directly, and the thread-pooled
exponentiation returns the single-threaded one's list, in order. Small keys keep it fast.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from fedcore import Experiment, simulate
from fedcore.params import ParameterSet
from fedcore.secagg import JoyeLibert, joye_libert
from fedcore.secagg import _bigint as B
from fedcore.secagg.local import through_the_wire
from tests._support.secagg import SMALL
from tests._support.secagg import open_round as open_secagg_round


def open_round(nodes, reference=None, key_size=512):
    scheme = JoyeLibert(key_size=key_size, clip=4.0)
    researcher, sessions = open_secagg_round(scheme, nodes, reference, SMALL)
    options = {n: through_the_wire(researcher.train_options(n)) for n in nodes}
    return researcher, sessions, options


def update(size, seed=0):
    rng = np.random.default_rng(seed)
    return ParameterSet({"w": rng.standard_normal(size).astype(np.float32),
                         "b": rng.uniform(-1, 1, (3, 2))})


def test_the_pooled_powmod_many_equals_one_exponentiation_at_a_time(monkeypatch):
    monkeypatch.setattr(B, "workers", lambda: 3)  # split even on a one-core machine
    n2 = B.big(B.biprime(512)) ** 2
    rng = np.random.default_rng(0)
    bases = [B.big(int(rng.integers(2, 2**62)) ** 9 % n2) for _ in range(4 * B.MIN_CHUNK + 1)]
    for exponent in (2**1023 + 12345, -(2**1023 + 777)):  # a node's key, the researcher's
        expected = [pow(int(b), exponent, int(n2)) for b in bases]
        assert [int(v) for v in B.powmod_many(bases, exponent, n2)] == expected
        assert [int(v) for v in B.powmod_many(bases[:3], exponent, n2)] == expected[:3]


@pytest.mark.parametrize("size", [100, 10, 400])  # the expected length, shorter, longer
def test_prepared_and_direct_protect_send_the_same_ciphertexts(size):
    nodes = ["a", "b", "c"]
    researcher, sessions, options = open_round(nodes)  # no layout: any size is accepted
    session = sessions["b"]
    direct = session.protect(update(size), 7.0, options["b"])
    session.prepare(options["b"], update(100))
    prepared = session.protect(update(size), 7.0, options["b"])
    assert "precompute_s" in session.timings  # the precomputed masks were used
    np.testing.assert_array_equal(prepared["ciphertexts"], direct["ciphertexts"])
    assert prepared["key_share"] == direct["key_share"]
    assert session._pre.job is None  # released after protect
    for node in nodes:  # the round decrypts to the plain sum
        if node != "b":
            sessions[node].prepare(options[node], update(100))
        payload = prepared if node == "b" else sessions[node].protect(update(size), 7.0,
                                                                       options[node])
        researcher.add_protected(node, through_the_wire(payload))
    sums, total, _, report = researcher.unprotect_sum()
    assert total == 21.0
    err = np.max(np.abs(sums["w"] - 21.0 * update(size)["w"].astype(np.float64)))
    assert err <= report["error_bound"]["params"] + 1e-12


def test_a_failed_precomputation_falls_back_to_the_direct_path(monkeypatch, caplog):
    _, sessions, options = open_round(["a", "b"], update(50))
    session = sessions["a"]
    direct = session.protect(update(50), 2.0, options["a"])

    def fails(*args):
        raise MemoryError("no room for the masks")

    monkeypatch.setattr(joye_libert._Packing, "masks", fails)
    session.prepare(options["a"], update(50))
    session._pre.job._thread.join()
    monkeypatch.undo()  # the direct path computes them again
    with caplog.at_level(logging.WARNING, logger="fedcore.node"):
        fallback = session.protect(update(50), 2.0, options["a"])
    np.testing.assert_array_equal(fallback["ciphertexts"], direct["ciphertexts"])
    warnings = [r.getMessage() for r in caplog.records if "Precomputing" in r.getMessage()]
    assert len(warnings) == 1 and "MemoryError: no room for the masks" in warnings[0]


def test_masks_prepared_for_another_key_or_discarded_are_not_used():
    _, sessions, options = open_round(["a", "b"], update(50))
    session = sessions["a"]
    direct = session.protect(update(50), 2.0, options["a"])
    session.prepare(options["a"], update(50))
    real_sk = session._sk
    session._sk = real_sk + 1  # as if the key had changed since prepare
    other = session.protect(update(50), 2.0, options["a"])
    assert "precompute_s" not in session.timings
    session._sk = real_sk
    assert not np.array_equal(other["ciphertexts"], direct["ciphertexts"])
    session.prepare(options["a"], update(50))
    session.discard()
    again = session.protect(update(50), 2.0, options["a"])
    assert "precompute_s" not in session.timings
    np.testing.assert_array_equal(again["ciphertexts"], direct["ciphertexts"])
    # nothing prepared before the share phase, and bad options are protect's to report
    session.prepare({**options["a"], "session": "other"}, update(50))
    assert session._pre.job is None


def test_a_process_holds_at_most_max_precomputed_mask_lists():
    nodes = ["a", "b", "c"]
    _, sessions, options = open_round(nodes, update(20))
    assert joye_libert.MAX_PRECOMPUTED == 2
    for node in nodes:
        sessions[node].prepare(options[node], update(20))
    used = []
    for node in nodes:
        sessions[node].protect(update(20), 1.0, options[node])
        used.append("precompute_s" in sessions[node].timings)
    assert used == [True, True, False]
    sessions["c"].prepare(options["c"], update(20))  # the slots came back after protect
    sessions["c"].protect(update(20), 1.0, options["c"])
    assert "precompute_s" in sessions["c"].timings


# --- through real nodes ------------------------------------------------------------------

torch = pytest.importorskip("torch")

from tests._support.torch_plans import TinyMLP  # noqa: E402


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
                         timeout=60, **kwargs)
        exp.run(1)
        return exp


def test_nodes_precompute_while_training_and_the_model_is_the_plain_one(monkeypatch):
    monkeypatch.setattr(joye_libert, "_precomputed", threading.BoundedSemaphore(3))
    calls = []
    real = joye_libert._Packing.masks

    def counted(self, session, round, key, start, stop):
        calls.append((start, stop))
        return real(self, session, round, key, start, stop)

    monkeypatch.setattr(joye_libert._Packing, "masks", counted)
    plain = _run()
    encrypted = _run(secagg=JoyeLibert(key_size=512))
    assert encrypted.parameters.allclose(plain.parameters, rtol=0, atol=1e-5)
    assert set(encrypted.history["status"]) == {"ok"}
    # each node prepared all its masks (from 0) and computed none after training; the
    # researcher's call starts at 0 too: 4 calls, all over the whole range
    assert len(calls) == 4 and {c[0] for c in calls} == {0} and len(set(calls)) == 1
