"""Secure aggregation: fixed-point encoding, Shamir sharing, the plain and masking schemes.

Rounds run in memory (``fedcore.secagg.local.run_round``): every message between the
researcher and the nodes goes through the wire codec, as on a network. Joye-Libert has its
own file (test_secagg_jl.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from fedcore import plugins
from fedcore.errors import ConfigurationError, ProtocolError, RoundError, SecureAggregationError
from fedcore.params import ParameterSet
from fedcore.secagg import (
    Encoding,
    FixedPoint,
    JoyeLibert,
    PairwiseMasking,
    PlainAggregation,
    open_node_session,
)
from fedcore.secagg.local import run_round
from fedcore.secagg.shamir import PRIME, ShareError, combine, combine_bytes, split, split_bytes
from tests._support.secagg import SMALL, check_sum, make_round, open_round, plain_sum

# --- fixed point ---------------------------------------------------------------------------


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_thousand_nodes_at_the_clipping_limit_with_the_largest_weight_do_not_overflow(sign):
    n, weight, clip = 1000, 1e6, 1.0
    fp = FixedPoint.for_sum(clip, n, weight)
    one = np.empty(3, np.uint64)
    clipped = fp.encode_into(np.array([sign * clip, sign * 5.0, 0.25]), weight, one)
    assert clipped == 1  # 5.0 lies outside [-1, 1]
    total = np.zeros(3, np.uint64)
    for _ in range(n):
        total += one  # numpy uint64 wraps modulo 2^64, as the schemes' sums do
    got = fp.decode(total)
    want = np.array([sign * n * weight * clip, sign * n * weight * clip, n * weight * 0.25])
    assert np.all(np.abs(got - want) <= fp.error_bound(n))
    assert fp.step == 2.0**-32  # the budget of the module docstring: 1000 nodes, W = 1e6


def test_clipped_values_are_counted_in_the_report_and_the_sum_is_of_the_clipped_values():
    nodes = ["a", "b", "c"]
    updates = {n: ParameterSet({"w": np.array([0.5, 3.0, -7.0, 1.0])}) for n in nodes}
    weights = {n: 2.0 for n in nodes}
    result = run_round(PairwiseMasking(clip=1.0), updates, weights).result
    assert result.report["clipped"] == {"params": 6, "extras": 0}  # 2 values on 3 nodes
    assert result.report["clip_range"]["params"] == 1.0
    np.testing.assert_allclose(result.sums["w"], [3.0, 6.0, -6.0, 6.0], atol=1e-9)


def test_the_clipping_range_is_chosen_from_the_global_model_when_not_given():
    nodes, updates, weights, _ = make_round(3, 10)
    reference = ParameterSet({k: np.asarray(v) * 0 + 3.0 for k, v in updates["node-00"].items()})
    result = run_round(PairwiseMasking(clip_margin=2.0), updates, weights,
                       reference=reference).result
    assert result.report["clip_range"]["params"] == 6.0  # 2 x the largest global value
    with pytest.raises(ConfigurationError, match="clipping range"):
        PairwiseMasking().researcher_session(1, nodes)  # neither clip= nor reference=


def test_encoding_refuses_non_finite_values_and_weights_above_the_maximum():
    enc = Encoding(n_nodes=3, max_weight=100.0, clip=1.0, extras_clip=1.0)
    with pytest.raises(ConfigurationError, match="NaN or infinite"):
        enc.encode(ParameterSet({"w": np.array([1.0, np.nan])}), 1.0)
    with pytest.raises(ConfigurationError, match="max_weight"):
        enc.encode(ParameterSet({"w": np.ones(2)}), 101.0)
    with pytest.raises(ConfigurationError, match="weight"):
        enc.encode(ParameterSet({"w": np.ones(2)}), 0.0)


# --- Shamir --------------------------------------------------------------------------------


def test_any_t_shares_recover_the_secrets_and_fewer_do_not():
    secrets_ = [123456789, PRIME - 1, 0]
    xs = list(range(1, 8))
    shares = split(secrets_, 4, xs)
    for subset in ([1, 2, 3, 4], [7, 5, 3, 1], xs):
        assert combine({x: shares[x - 1] for x in subset}, 4) == secrets_
    with pytest.raises(ShareError, match="at least t=4"):
        combine({x: shares[x - 1] for x in (1, 2, 3)}, 4)
    # three shares are consistent with any secret: they interpolate to something else
    assert combine({x: shares[x - 1] for x in (1, 2, 3)}, 3) != secrets_


def test_a_corrupted_share_is_caught_when_more_than_t_shares_are_given():
    blobs = split_bytes([b"k" * 32, b"s" * 16], 3, [1, 2, 3, 4, 5])
    points = {x: blobs[x - 1] for x in range(1, 6)}
    assert combine_bytes(points, 3, [32, 16]) == [b"k" * 32, b"s" * 16]
    bad = bytearray(points[5])
    bad[10] ^= 1
    points[5] = bytes(bad)
    with pytest.raises(ShareError, match="inconsistent"):
        combine_bytes(points, 3, [32, 16])



def test_a_round_of_1000_members_recovers_its_secrets_and_names_a_corrupted_share():
    # Recovery after drop-outs at a thousand members: every share beyond the t used is
    # checked against the polynomial (in O(t) each: about half a second here, where the
    # quadratic check took ~26 s), and a corrupted one is still named.
    secrets_ = [PRIME - 2, 987654321]
    xs = list(range(1, 1001))
    points = dict(zip(xs, split(secrets_, 500, xs), strict=True))
    assert combine(points, 500) == secrets_
    points[777] = [points[777][0] ^ 1, points[777][1]]
    with pytest.raises(ShareError, match="x=777") as caught:
        combine(points, 500)
    assert caught.value.x == 777

# --- the schemes' sums ----------------------------------------------------------------------


@pytest.mark.parametrize("n_nodes,size", [(2, 1), (3, 1000), (10, 100_000), (50, 1000)])
@pytest.mark.parametrize("scheme", [PlainAggregation(), PairwiseMasking(),
                                    PairwiseMasking(ring_bits=32)],
                         ids=["plain", "masking", "masking-32"])
def test_secure_sum_equals_the_plain_weighted_sum(scheme, n_nodes, size):
    nodes, updates, weights, extras = make_round(n_nodes, size, seed=n_nodes, with_extras=True)
    # the global model sets the clipping range: 4 x its largest value, 8 (no clipping here)
    reference = ParameterSet({k: np.full_like(v, 2) for k, v in updates[nodes[0]].items()})
    result = run_round(scheme, updates, weights, extras=extras, reference=reference,
                       weights_hint=weights, floors=SMALL).result
    check_sum(result, updates, weights, nodes, extras)
    assert result.report["scheme"] == scheme.name


@pytest.mark.parametrize("n_nodes", [2, 4])
def test_masking_sums_ten_million_values(n_nodes):
    nodes = [f"n{i}" for i in range(n_nodes)]
    base = np.random.default_rng(1).standard_normal(10_000_000, dtype=np.float32)
    updates = {n: ParameterSet({"w": base * np.float32(i + 1)}) for i, n in enumerate(nodes)}
    weights = {n: float(7 + 9 * i) for i, n in enumerate(nodes)}
    result = run_round(PairwiseMasking(clip=40.0, max_weight=100.0), updates, weights,
                       floors=SMALL).result
    want = plain_sum(updates, weights, nodes)
    assert np.max(np.abs(result.sums["w"] - want)) <= result.report["error_bound"]["params"]
    assert result.total_weight == sum(weights.values())
    assert result.report["clipped"]["params"] == 0


# --- drop-outs ------------------------------------------------------------------------------


@pytest.mark.parametrize("ring_bits", [64, 32])
@pytest.mark.parametrize("lost", [["node-01"], ["node-01", "node-03"]])
def test_nodes_lost_after_sending_their_masked_update_are_recovered(lost, ring_bits):
    nodes, updates, weights, _ = make_round(5, 1000, seed=5)
    result = run_round(PairwiseMasking(threshold=3, clip=8.0, ring_bits=ring_bits), updates,
                       weights,
                       lost_before_unmask=lost).result
    check_sum(result, updates, weights, nodes)  # their updates arrived: all five count
    assert result.report["unmask_replies"] == 5 - len(lost)


def test_a_third_loss_below_the_threshold_is_a_clear_error_never_a_wrong_sum():
    nodes, updates, weights, _ = make_round(5, 1000, seed=5)
    lost = ["node-01", "node-03", "node-04"]
    with pytest.raises(SecureAggregationError, match="at least t=3") as info:
        run_round(PairwiseMasking(threshold=3, clip=8.0), updates, weights,
                  lost_before_unmask=lost)
    assert sorted(info.value.failures) == lost
    assert isinstance(info.value, RoundError)


@pytest.mark.parametrize("ring_bits", [64, 32])
def test_nodes_lost_during_training_have_their_pairwise_masks_removed(ring_bits):
    nodes, updates, weights, _ = make_round(5, 1000, seed=6)
    result = run_round(PairwiseMasking(threshold=3, clip=8.0, ring_bits=ring_bits), updates,
                       weights,
                       lost_before_protect=["node-02"], lost_before_unmask=["node-04"]).result
    survivors = [n for n in nodes if n != "node-02"]
    check_sum(result, updates, weights, survivors)
    assert result.report["dropped"] == ["node-02"] and result.report["recovered"] == ["node-02"]


def test_the_sum_survives_a_failed_attempt_and_can_be_asked_for_again():
    nodes = ["a", "b", "c", "d"]
    researcher, sessions = open_round(PairwiseMasking(threshold=3, clip=4.0), nodes)
    for i, node in enumerate(nodes[:3]):  # d drops out while training
        researcher.add_protected(node, sessions[node].protect(
            ParameterSet({"w": np.full(5, float(i))}), 1.0, researcher.train_options(node)))
    requests = researcher.unmask_requests()
    researcher.add_unmask("a", sessions["a"].answer("unmask", requests["a"]))
    with pytest.raises(SecureAggregationError, match="t=3"):
        researcher.unprotect_sum()  # too few replies yet: the masked sum is left as it was
    for node in ("b", "c"):
        researcher.add_unmask(node, sessions[node].answer("unmask", requests[node]))
    first = researcher.unprotect_sum()
    assert np.allclose(first.sums["w"], 0 + 1 + 2, rtol=0, atol=1e-9)
    assert researcher.unprotect_sum().sums.equal(first.sums)  # masks are removed once


def test_too_few_nodes_at_setup_fail_before_anyone_trains():
    nodes, updates, weights, _ = make_round(5, 10)
    with pytest.raises(SecureAggregationError, match="answered the setup"):
        run_round(PairwiseMasking(clip=8.0), updates, weights,
                  lost_at_setup=["node-00", "node-01", "node-02"])


# --- what the researcher sees --------------------------------------------------------------


def reveals(received: np.ndarray, secret: np.ndarray, as_fixed_point: FixedPoint) -> bool:
    """True when the researcher's view of one node's payload gives its update away.

    Two checks: the payload read as fixed-point correlates with the update (beyond 6 standard
    errors), or its 64-bit words are not uniform (chi-square of the top byte and KS test on
    the words, p < 1e-6).
    """
    from scipy import stats  # lazily: only this test needs it

    if received.dtype in (np.uint64, np.uint32):
        decoded = as_fixed_point.decode(received)
        words = received.astype(np.uint64) << np.uint64(64 - 8 * received.itemsize)
    else:  # floats in clear (the plain scheme): look at their bits and values alike
        decoded = received.astype(np.float64)
        words = decoded.view(np.uint64)
    r = np.corrcoef(decoded, secret)[0, 1]
    correlated = abs(r) > 6 / np.sqrt(secret.size)
    top = np.bincount((words >> np.uint64(56)).astype(np.int64), minlength=256)
    chi2 = stats.chisquare(top).pvalue < 1e-6
    ks = stats.kstest(words.astype(np.float64) / 2.0**64, "uniform").pvalue < 1e-6
    return bool(correlated or chi2 or ks)


@pytest.mark.parametrize("ring_bits", [64, 32])
def test_one_nodes_masked_payload_is_indistinguishable_from_uniform_noise(ring_bits):
    nodes, updates, weights, _ = make_round(4, 200_000, seed=9)
    seen = {}

    def keep(node, payload):
        seen[node] = payload

    run_round(PairwiseMasking(clip=8.0, ring_bits=ring_bits), updates, weights,
              on_payload=keep)
    enc = Encoding(4, max(weights.values()), 8.0, 8.0, ring_bits=ring_bits)  # the round's
    secret = weights["node-00"] * updates["node-00"]["w"].astype(np.float64)
    view = seen["node-00"]["values"][:secret.size]
    assert view.dtype == (np.uint32 if ring_bits == 32 else np.uint64)
    assert not reveals(view, secret, enc.values)
    # the same check catches the update when masking is off: the bare fixed-point encoding ...
    bare, _ = enc.encode(updates["node-00"], weights["node-00"], dtype=view.dtype.type)
    assert reveals(bare[:secret.size], secret, enc.values)
    # ... and the plain scheme's payload
    run_round(PlainAggregation(), updates, weights, on_payload=keep)
    assert reveals(np.asarray(seen["node-00"]["params"]["w"]) * weights["node-00"], secret,
                   enc.values)


# --- bad input ------------------------------------------------------------------------------


def test_a_tampered_share_is_named_as_an_authentication_failure():
    nodes = ["a", "b", "c"]
    researcher, sessions = open_round(PairwiseMasking(clip=1.0), nodes)
    for node in nodes:
        update = ParameterSet({"w": np.ones(4)})
        options = researcher.train_options(node)
        researcher.add_protected(node, sessions[node].protect(update, 1.0, options))
    requests = researcher.unmask_requests()
    blob = bytearray(requests["c"]["shares"]["a"])
    blob[-1] ^= 1
    requests["c"]["shares"]["a"] = bytes(blob)
    with pytest.raises(ProtocolError, match="share from node 'a' to node 'c' failed "
                                            "authentication"):
        sessions["c"].answer("unmask", requests["c"])
    # the node keeps serving: the genuine request still works
    researcher.add_unmask("a", sessions["a"].answer("unmask", requests["a"]))


def test_a_node_never_reveals_both_secrets_of_the_same_node():
    nodes = ["a", "b", "c", "d"]
    researcher, sessions = open_round(PairwiseMasking(threshold=3, clip=1.0), nodes)
    for node in nodes:
        options = researcher.train_options(node)
        researcher.add_protected(node, sessions[node].protect(
            ParameterSet({"w": np.ones(2)}), 1.0, options))
    msg = researcher.unmask_requests()["a"]
    sessions["a"].answer("unmask", msg)
    second = {**msg, "survivors": ["a", "b", "c"], "dropped": ["d"]}
    with pytest.raises(ProtocolError, match="reveal both masks"):
        sessions["a"].answer("unmask", second)
    with pytest.raises(ProtocolError, match="must split"):
        sessions["b"].answer("unmask", {**msg, "survivors": ["a", "b", "zed"]})


def test_wrong_shapes_unknown_nodes_and_other_sessions_are_refused():
    nodes, updates, weights, _ = make_round(3, 5)
    reference = ParameterSet({k: np.zeros_like(v) for k, v in updates[nodes[0]].items()})
    bad = dict(updates, **{"node-01": ParameterSet({"w": np.zeros(6, np.float32),
                                                    "m": np.zeros((2, 3)),
                                                    "count": np.array(1)})})
    with pytest.raises(ConfigurationError, match="global model's layout"):
        run_round(PairwiseMasking(), bad, weights, reference=reference)
    # without a reference the researcher compares the nodes' layouts
    with pytest.raises(ProtocolError, match="differs in layout"):
        run_round(PairwiseMasking(clip=4.0), bad, weights)

    researcher, sessions = open_round(PairwiseMasking(clip=1.0), nodes)
    with pytest.raises(ProtocolError, match="from 'mallory'"):
        researcher.add_setup("mallory", {"session": researcher.session_id})
    with pytest.raises(ConfigurationError, match="participants"):
        researcher.train_options("mallory")
    options = researcher.train_options("node-00")
    with pytest.raises(ProtocolError, match="belongs to session"):
        sessions["node-00"].protect(updates["node-00"], 1.0, {**options, "session": "other"})
    with pytest.raises(ProtocolError, match="Unknown secure-aggregation phase"):
        sessions["node-00"].answer("train", options)
    with pytest.raises(ProtocolError, match="Did you mean 'masking'"):
        open_node_session("node-00", {**options, "scheme": "maskin", "params": {}})


def test_schemes_are_registered_and_configured_by_their_constructor():
    assert plugins.load("secagg", "plain") is PlainAggregation
    assert plugins.load("secagg", "masking") is PairwiseMasking
    assert plugins.load("secagg", "joye-libert") is JoyeLibert
    scheme = PairwiseMasking(threshold=3, clip=2.0)
    assert PairwiseMasking(**scheme.get_params()).get_params() == scheme.get_params()
    assert PairwiseMasking.tolerates_dropout and not JoyeLibert.tolerates_dropout
    with pytest.raises(ConfigurationError, match="strict majority of the round's 2 nodes"):
        scheme.researcher_session(1, ["a", "b"])
    with pytest.raises(ConfigurationError, match=r"strict majority .* Received threshold=2"):
        PairwiseMasking(threshold=2).researcher_session(1, ["a", "b", "c", "d"])
    with pytest.raises(ConfigurationError, match="positive"):
        PairwiseMasking(clip=-1.0)
    with pytest.raises(ConfigurationError, match="ring_bits"):
        PairwiseMasking(ring_bits=40)


# --- the 32-bit ring ------------------------------------------------------------------------


def test_a_32_bit_ring_halves_the_upload_and_sums_within_its_coarser_bound():
    nodes, updates, weights, _ = make_round(10, 1000, seed=3)
    seen = {}
    results = {}
    for bits in (64, 32):
        results[bits] = run_round(
            PairwiseMasking(clip=8.0, ring_bits=bits), updates, weights,
            on_payload=lambda node, payload, bits=bits: seen.setdefault(bits, payload)).result
        check_sum(results[bits], updates, weights, nodes)
    assert seen[32]["values"].nbytes * 2 == seen[64]["values"].nbytes
    step = {bits: results[bits].report["step"]["params"] for bits in (64, 32)}
    assert step[32] == step[64] * 2.0**32  # the same budget, 32 bits fewer
    assert results[32].total_weight == results[64].total_weight  # integer weights: exact


def test_at_the_clipping_limit_the_32_bit_ring_does_not_wrap():
    nodes = [f"n{i}" for i in range(10)]
    for sign in (1.0, -1.0):
        updates = {n: ParameterSet({"w": np.full(4, sign * 9.0)}) for n in nodes}
        weights = {n: 100.0 for n in nodes}
        result = run_round(PairwiseMasking(clip=8.0, max_weight=100.0, ring_bits=32), updates,
                           weights).result
        assert np.all(np.abs(result.sums["w"] - sign * 10 * 100 * 8.0)
                      <= result.report["error_bound"]["params"])
        assert result.report["clipped"]["params"] == 40


def test_a_node_masks_only_in_the_ring_of_its_scheme():
    nodes = ["a", "b", "c"]
    researcher, sessions = open_round(PairwiseMasking(clip=1.0, ring_bits=32), nodes)
    options = researcher.train_options("a")
    # a researcher swapping the encoding's ring for another one is refused, not followed
    sent = Encoding.from_wire(options["encoding"])
    for bits in (64, 16):
        other = Encoding(3, sent.max_weight, 1.0, 1.0, sent.params_layout, ring_bits=bits)
        wide = {**options, "encoding": other.to_wire()}
        with pytest.raises(ProtocolError, match="ring"):
            sessions["a"].protect(ParameterSet({"w": np.ones(2)}), 1.0, wide)
    payload = sessions["a"].protect(ParameterSet({"w": np.ones(2)}), 1.0, options)
    assert payload["values"].dtype == np.uint32
    with pytest.raises(ProtocolError, match="uint32 values"):
        researcher.add_protected("b", {**payload, "values": payload["values"].astype(np.uint64)})


def test_a_32_bit_ring_refuses_a_model_whose_clip_counts_could_wrap():
    enc = Encoding(2, 1.0, 1.0, 1.0, ring_bits=32)
    huge = ParameterSet({"w": np.zeros(2**31, dtype=np.uint8)})
    with pytest.raises(ConfigurationError, match="64-bit ring"):
        enc.encode(huge, 1.0, dtype=np.uint32)
