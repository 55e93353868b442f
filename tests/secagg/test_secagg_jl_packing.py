"""Joye-Libert packing: several fixed-point values per plaintext, sums that never carry.

The expected sums are computed apart from the scheme: each node's update encoded with the
round's fixed-point parameters, the integers added, the total decoded. A packed round must
give exactly those floats; a carry from one slot into the next would change them.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedcore.errors import ConfigurationError, ProtocolError
from fedcore.params import ParameterSet
from fedcore.secagg import JoyeLibert, open_node_session
from fedcore.secagg import _bigint as B
from fedcore.secagg.fixedpoint import Encoding
from fedcore.secagg.local import context_for, open_sessions, run_round, through_the_wire
from tests._support.secagg import SMALL, plain_sum

CLIP, MAX_WEIGHT = 8.0, 1000.0


def extreme_round(n_nodes: int, size: int, seed: int):
    """Updates at the clip range's ends (both signs) and random values, every weight maximal."""
    rng = np.random.default_rng(seed)
    nodes = [f"node-{i:02d}" for i in range(n_nodes)]
    updates = {}
    for i, node in enumerate(nodes):
        w = rng.uniform(-CLIP, CLIP, size)
        w[:4] = [CLIP, -CLIP, -CLIP * (i + 1) / n_nodes, -1e-9]  # extremes, negatives, tiny
        updates[node] = ParameterSet({"w": w.astype(np.float64),
                                      "b": -np.full(3, CLIP, dtype=np.float32)})
    return nodes, updates, {n: MAX_WEIGHT for n in nodes}


def fixed_point_sum(scheme: JoyeLibert, nodes, updates, weights) -> ParameterSet:
    """What the round must return: the nodes' encodings added as integers, decoded."""
    enc = Encoding(len(nodes), MAX_WEIGHT, CLIP, CLIP, ring_bits=scheme.value_bits)
    total = None
    for node in nodes:
        vector, layout = enc.encode(updates[node], weights[node])
        total = vector if total is None else total + vector  # uint64: wraps modulo 2^64
    sums, _, _, _ = enc.decode(total, layout, len(nodes))
    return sums


@pytest.mark.parametrize("n_nodes", [3, 10])
@pytest.mark.parametrize("value_bits", [16, 40, 64])
def test_a_packed_round_gives_exactly_the_fixed_point_sum(n_nodes, value_bits):
    nodes, updates, weights = extreme_round(n_nodes, 97, seed=n_nodes + value_bits)
    scheme = JoyeLibert(key_size=512, clip=CLIP, max_weight=MAX_WEIGHT, value_bits=value_bits)
    result = run_round(scheme, updates, weights, floors=SMALL).result
    want = fixed_point_sum(scheme, nodes, updates, weights)
    for key in ("w", "b"):
        np.testing.assert_array_equal(result.sums[key], want[key])  # bit for bit
        err = np.max(np.abs(result.sums[key] - plain_sum(updates, weights, nodes, key)))
        assert err <= result.report["error_bound"]["params"]
    assert result.total_weight == n_nodes * MAX_WEIGHT
    slot = value_bits + 8  # one carry byte: up to 255 nodes
    assert result.report["values_per_ciphertext"] == (512 - 1) // slot
    assert result.report["step"]["params"] == 2.0 ** (
        int(np.ceil(np.log2(n_nodes * MAX_WEIGHT * CLIP))) - (value_bits - 2))


def test_the_default_packs_42_values_where_64_bit_values_packed_28():
    nodes, updates, weights = extreme_round(3, 100, seed=1)
    counts = {}
    for bits in (40, 64):
        scheme = JoyeLibert(key_size=2048, clip=CLIP, max_weight=MAX_WEIGHT, value_bits=bits)
        report = run_round(scheme, updates, weights).result.report
        counts[bits] = (report["values_per_ciphertext"], report["ciphertexts"])
    assert counts == {40: (42, 3), 64: (28, 4)}  # 103 + 3 values


def test_more_nodes_than_the_packing_holds_is_refused_clearly():
    scheme = JoyeLibert(key_size=512, clip=CLIP, max_nodes=3)
    nodes = [f"node-{i}" for i in range(4)]
    with pytest.raises(ConfigurationError, match=r"at most 3 nodes.*Received 4 nodes.*"
                                                 r"JoyeLibert\(max_nodes=4\)"):
        scheme.researcher_session(1, nodes)
    # a node refuses the same round, should a researcher open it with a smaller max_nodes
    opening = JoyeLibert(key_size=512, clip=CLIP).researcher_session(1, nodes).setup_requests()
    msg = dict(through_the_wire(opening["node-0"]))
    msg["params"] = {**msg["params"], "max_nodes": 3}
    with pytest.raises(ProtocolError, match="at most 3 nodes"):
        open_node_session("node-0", msg, context_for(SMALL, "node-0"))


def test_a_packing_that_does_not_fit_below_the_modulus_is_refused():
    with pytest.raises(ConfigurationError, match="fit below N"):
        JoyeLibert(key_size=256, value_bits=64, max_nodes=2**250)
    with pytest.raises(ConfigurationError, match="value_bits"):
        JoyeLibert(value_bits=42)


def test_a_node_refuses_an_encoding_in_another_ring_than_the_packing():
    nodes, updates, weights = extreme_round(3, 5, seed=2)
    scheme = JoyeLibert(key_size=512, clip=CLIP, max_weight=MAX_WEIGHT)
    researcher, sessions = open_sessions(scheme, nodes, floors=SMALL)
    options = dict(through_the_wire(researcher.train_options(nodes[0])))
    wide = Encoding(3, MAX_WEIGHT, CLIP, CLIP, ring_bits=64).to_wire()
    options["encoding"] = wide  # 64-bit values would carry into the next 48-bit slot
    with pytest.raises(ProtocolError, match="64-bit ring.*40-bit values"):
        sessions[nodes[0]].protect(updates[nodes[0]], weights[nodes[0]], options)


def test_the_researcher_decrypts_without_exponentiating_and_sees_no_key_share(monkeypatch):
    nodes, updates, weights = extreme_round(3, 50, seed=4)
    scheme = JoyeLibert(key_size=512, clip=CLIP, max_weight=MAX_WEIGHT)
    payloads = {}
    researcher, sessions = open_sessions(scheme, nodes, floors=SMALL)
    for node in nodes:
        payloads[node] = through_the_wire(sessions[node].protect(
            updates[node], weights[node], through_the_wire(researcher.train_options(node))))
        assert set(payloads[node]) == {"session", "node", "ciphertexts", "layout"}
    calls = []
    monkeypatch.setattr(B, "powmod_many", lambda *a: calls.append(a) or [])
    for node in nodes:
        researcher.add_protected(node, payloads[node])
    result = researcher.unprotect_sum()
    assert calls == []  # the round keys add up to 0: the product is 1 + sum * N
    np.testing.assert_array_equal(result.sums["w"],
                                  fixed_point_sum(scheme, nodes, updates, weights)["w"])
