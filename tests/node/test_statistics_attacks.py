"""Statistics attacks: a trusted researcher sends crafted, correctly signed StatsRequests.

Each plays one way of singling out a patient from exact statistics (issue 14, defect 7);
each must be refused or yield nothing usable, the refusal audited under the name the node
trusts the key under (``alice``, whatever the envelope claims), and the node keep serving
(the Attacker pings it on exit).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedcore import _runtime
from fedcore.node import Node
from fedcore.testing.transport import wait_until
from fedcore.wire.identity import Identity, full_fingerprint
from fedcore.wire.messages import ErrorReply, SearchReply, SearchRequest, StatsReply, StatsRequest
from tests._support.attack import Attacker, serve

SITE = "site"
CLAIMED = "bob"  # the name the attacker writes in its envelopes; its key is alice's


@pytest.fixture
def alice(tmp_path):
    """The key file of the researcher the node trusts as ``alice``."""
    key = tmp_path / "alice.key"
    Identity(key)
    return key


def _site(tmp_path, alice, frame, policy=None):
    """A node serving one CSV (``cohort``) on a websocket, trusting alice; (url, node, id)."""
    url, node = serve(tmp_path / "site", SITE, trusted={"alice": alice})
    if policy:
        node.set_policy(**policy)
    path = tmp_path / "cohort.csv"
    frame.to_csv(path, index=False)
    entry = node.datasets.add("cohort", ["cohort"], path)
    return url, node, entry["id"]


def _ask(attacker, dataset, *queries, privacy=None):
    """One StatsRequest, sent as bob although signed by alice's key; the reply body."""
    body = StatsRequest(dataset_id=dataset, queries=list(queries), privacy=privacy or {})
    return attacker.ask(SITE, body, sender=CLAIMED).body


def _hist(variable, edges):
    return {"variable": variable, "edges": np.asarray(edges, dtype=np.float64)}


def _refused(node, reply, match):
    """The reply is a governance refusal saying ``match``, audited under alice's name."""
    assert isinstance(reply, ErrorReply) and reply.kind == "governance", reply
    assert match in reply.message, reply.message
    record = [r for r in node.audit_log() if r["event"] == "statistics-refused"][-1]
    assert record["researcher"] == "alice" and match in record["reason"]
    return record


def _alice_key(alice):
    return full_fingerprint(Identity(alice).public_bytes)


def test_a_fine_histogram_is_refused_and_withheld_cells_are_not_named(tmp_path, alice):
    ages = np.r_[np.full(20, 30), np.full(15, 70), np.full(3, 92), np.full(2, 97)]
    url, node, ds = _site(tmp_path, alice, pd.DataFrame({"age": ages}))
    try:
        with Attacker(url, {SITE: node.identity.public_bytes}, key=alice) as a:
            # One bin per year: every record would sit alone in its cell.
            fine = _ask(a, ds, _hist("age", np.arange(0.0, 101.0)))
            record = _refused(node, fine, "at most 8 bins here")
            assert record["researcher_key"] == _alice_key(alice)
            # A coarser one is answered, but its two small cells are zeros like the empty
            # first bin: the reply counts them and never says which they are.
            reply = _ask(a, ds, _hist("age", [0, 20, 50, 90, 95, 100]))
            assert isinstance(reply, StatsReply)
            result = reply.results[0]
            assert result["additive"]["hist"].tolist() == [0, 20, 15, 0, 0]
            assert result["withheld"] == [{"cell": "cells", "cells": 2,
                                           "reason": result["withheld"][0]["reason"]}]
            assert "bin" not in repr(result["withheld"])
    finally:
        node.stop()
    answered = [r for r in node.audit_log() if r["event"] == "statistics"][-1]
    assert answered["withheld"] == ["age:bin[3]", "age:bin[4]"]  # named on the node only


def test_min_and_max_are_not_shared_unless_the_policy_allows(tmp_path, alice):
    url, node, ds = _site(tmp_path, alice, pd.DataFrame({"age": np.arange(20, 60)}))
    try:
        with Attacker(url, {SITE: node.identity.public_bytes}, key=alice) as a:
            reply = _ask(a, ds, {"variable": "age", "min_max": True})
            assert reply.results[0]["min"] is None and reply.results[0]["max"] is None
            assert reply.results[0]["withheld"][0]["cell"] == "min_max"
            node.set_policy(allow_min_max=True)
            shared = _ask(a, ds, {"variable": "age", "min_max": True})
            assert (shared.results[0]["min"], shared.results[0]["max"]) == (20, 59)
    finally:
        node.stop()


def test_two_overlapping_histograms_cannot_isolate_a_record(tmp_path, alice):
    ages = np.r_[np.full(10, 20.0), 49.5, np.full(10, 70.0)]  # one patient aged 49.5
    url, node, ds = _site(tmp_path, alice, pd.DataFrame({"age": ages}))
    try:
        with Attacker(url, {SITE: node.identity.public_bytes}, key=alice) as a:
            first = _ask(a, ds, _hist("age", [0, 50, 100]))
            assert first.results[0]["additive"]["hist"].tolist() == [11, 10]
            # Alone, [0, 49) and [49, 100] hold 10 and 11; with the first, [49, 50) holds 1.
            record = _refused(node, _ask(a, ds, _hist("age", [0, 49, 100])),
                              "a difference of cells would show")
            assert record["where"] == "[49, 50)"  # on the node's audit log only
            # The refused edges count as asked: probing other edges is refused too...
            _refused(node, _ask(a, ds, _hist("age", [0, 45, 100])), "fewer than 5 records")
            # ...also in one request holding two edge sets.
            _refused(node, _ask(a, ds, _hist("age", [0, 30, 100]), _hist("age", [0, 60, 100])),
                     "fewer than 5 records")
            again = _ask(a, ds, _hist("age", [0, 50, 100]))  # what it was answered, again
            assert again.results[0]["additive"]["hist"].tolist() == [11, 10]
    finally:
        node.stop()


def test_a_coarser_histogram_cannot_recover_a_withheld_cell(tmp_path, alice):
    ages = np.r_[np.full(20, 30.0), np.full(15, 70.0), np.full(3, 92.0)]
    url, node, ds = _site(tmp_path, alice, pd.DataFrame({"age": ages}))
    try:
        with Attacker(url, {SITE: node.identity.public_bytes}, key=alice) as a:
            fine = _ask(a, ds, _hist("age", [0, 50, 90, 100]))
            assert fine.results[0]["additive"]["hist"].tolist() == [20, 0, 0]  # 3 + 15 hidden
            # [50, 100] would hold 18: with the first answer, the three aged 92 reappear.
            _refused(node, _ask(a, ds, _hist("age", [0, 50, 100])), "fewer than 5 records")
    finally:
        node.stop()


def _restart(node, url, attacker):
    """The node restarts on its home (say, after the night's admissions were loaded)."""
    home = node.home
    node.stop()
    _runtime.run(wait_until(lambda: SITE not in attacker._transport.peers(), "the node to go"))
    node = Node(home, node_id=SITE).start(url)
    _runtime.run(wait_until(lambda: SITE in attacker._transport.peers(), "the node to return"))
    return node


def test_sums_before_and_after_one_admission_are_not_both_answered(tmp_path, alice):
    rng = np.random.default_rng(0)
    glucose = rng.normal(100, 10, 30).round(1)
    url, node, ds = _site(tmp_path, alice, pd.DataFrame({"glucose": glucose}))
    csv = tmp_path / "cohort.csv"
    query = {"variable": "glucose"}
    try:
        with Attacker(url, {SITE: node.identity.public_bytes}, key=alice) as a:
            before = _ask(a, ds, query).results[0]["additive"]
            assert before["count"] == 30
            # One patient is admitted: sum after - sum before would be their glucose.
            pd.DataFrame({"glucose": np.r_[glucose, 250.0]}).to_csv(csv, index=False)
            node = _restart(node, url, a)
            _refused(node, _ask(a, ds, query), "changed by fewer than 5 records")
            # A value corrected in place (same count) is refused too.
            pd.DataFrame({"glucose": np.r_[glucose[:-1], 250.0]}).to_csv(csv, index=False)
            node = _restart(node, url, a)
            _refused(node, _ask(a, ds, query), "changed by fewer than 5 records")
            # Five admissions since the last answer: the difference mixes five patients.
            more = np.r_[glucose, 250.0, 120.0, 130.0, 95.0, 101.0]
            pd.DataFrame({"glucose": more}).to_csv(csv, index=False)
            node = _restart(node, url, a)
            after = _ask(a, ds, query)
            assert isinstance(after, StatsReply) and after.results[0]["additive"]["count"] == 35
    finally:
        node.stop()


def test_a_histogram_after_admissions_cannot_place_the_new_patients(tmp_path, alice):
    ages = np.r_[np.full(20, 30.0), np.full(20, 70.0)]
    url, node, ds = _site(tmp_path, alice, pd.DataFrame({"age": ages}))
    csv = tmp_path / "cohort.csv"
    edges = [0, 50, 100]
    try:
        with Attacker(url, {SITE: node.identity.public_bytes}, key=alice) as a:
            assert _ask(a, ds, _hist("age", edges)).results[0]["additive"]["hist"].tolist() == [
                20, 20]
            # Five admissions, one of them old: the same bins again would place that one.
            pd.DataFrame({"age": np.r_[ages, 31, 32, 33, 34, 88]}).to_csv(csv, index=False)
            node = _restart(node, url, a)
            assert _ask(a, ds, {"variable": "age"}).results[0]["additive"]["count"] == 45
            _refused(node, _ask(a, ds, _hist("age", edges)), "changed since your last "
                                                              "answered histogram")
    finally:
        node.stop()


def test_metadata_never_lists_values_held_by_few_records(tmp_path, alice):
    frame = pd.DataFrame({"diagnosis": ["flu"] * 30 + ["kuru"] * 2,
                          "label": [0, 1] * 16, "age": np.arange(32)})
    url, node, _ = _site(tmp_path, alice, frame)
    try:
        with Attacker(url, {SITE: node.identity.public_bytes}, key=alice) as a:
            reply = a.ask(SITE, SearchRequest(tags=["cohort"]), sender=CLAIMED).body
    finally:
        node.stop()
    assert isinstance(reply, SearchReply)
    meta = reply.datasets[0]["metadata"]
    assert meta["categories"]["diagnosis"] == ["flu"] and "kuru" not in repr(reply)
    assert meta["categories_withheld"] == ["age", "diagnosis"]  # age: 32 values, 1 each
    assert meta["categories"]["label"] == [0, 1]  # 16 each: listed


def test_a_dataset_with_a_privacy_budget_answers_only_noised_statistics(tmp_path, alice):
    ages = np.random.default_rng(1).integers(20, 90, 400).astype(float)
    url, node, ds = _site(tmp_path, alice, pd.DataFrame({"age": ages}),
                          policy={"dp_max_epsilon": 2.0})
    dp = {"mechanism": "gaussian"}
    bounded = {"variable": "age", "bounds": [0.0, 100.0]}
    try:
        with Attacker(url, {SITE: node.identity.public_bytes}, key=alice) as a:
            _refused(node, _ask(a, ds, {"variable": "age"}), "only with differential privacy")
            missing = _ask(a, ds, {"variable": "age"}, privacy=dp)
            assert missing.kind == "configuration" and "'bounds'" in missing.message
            answers = []
            while isinstance(reply := _ask(a, ds, bounded, privacy=dp), StatsReply):
                answers.append(reply)
                assert len(answers) < 20
            _refused(node, reply, "would exceed its privacy budget")
            # A researcher-chosen noise level is not a thing: the node sets it.
            bad = _ask(a, ds, bounded, privacy={"mechanism": "gaussian", "noise": 0.0})
            assert bad.kind == "configuration"
    finally:
        node.stop()
    assert answers and answers[0].privacy["noise_multiplier"] == 10.0
    sums = [r.results[0]["additive"]["sum"] for r in answers]
    assert len(set(sums)) == len(sums) and ages.sum() not in sums  # noised, every time
    assert all(abs(s - ages.sum()) < 20 * 10 * 100 for s in sums)  # within 20 sd
    spent, _ = node.ledger.spent(ds)
    assert spent == pytest.approx(answers[-1].privacy["epsilon"]) and spent <= 2.0


def test_a_node_with_statistics_dp_refuses_exact_answers(tmp_path, alice):
    url, node, ds = _site(tmp_path, alice, pd.DataFrame({"age": np.arange(100.0)}),
                          policy={"statistics_dp": True, "statistics_noise": 2.0})
    try:
        with Attacker(url, {SITE: node.identity.public_bytes}, key=alice) as a:
            _refused(node, _ask(a, ds, {"variable": "age"}), "policy statistics_dp")
            reply = _ask(a, ds, _hist("age", [0, 50, 100]), privacy={"mechanism": "gaussian"})
            assert reply.privacy["steps"] == 4 and reply.results[0]["noise"]["hist"] == 2.0
    finally:
        node.stop()
    assert node.ledger.spent(ds)[0] == pytest.approx(reply.privacy["epsilon"])
