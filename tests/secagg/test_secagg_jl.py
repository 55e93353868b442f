"""Joye-Libert secure aggregation, in memory, every message through the wire codec.

Most rounds use a 512-bit modulus to stay fast; one uses the default 2048 bits. Its speed on
large models is measured in bench/secure_aggregation.py, not here.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fedcore.errors import ProtocolError, SecureAggregationError
from fedcore.params import ParameterSet
from fedcore.secagg import JoyeLibert, open_node_session
from fedcore.secagg.local import context_for, run_round
from tests._support.secagg import SMALL, check_sum, make_round


@pytest.mark.parametrize("n_nodes,size", [(2, 1), (3, 100), (10, 500), (50, 20)])
def test_joye_libert_sum_equals_the_plain_weighted_sum(n_nodes, size):
    nodes, updates, weights, extras = make_round(n_nodes, size, seed=n_nodes, with_extras=True)
    result = run_round(JoyeLibert(key_size=512, clip=8.0), updates, weights, extras=extras,
                       weights_hint=weights, floors=SMALL).result
    check_sum(result, updates, weights, nodes, extras)
    assert result.report["scheme"] == "joye-libert"


def test_the_default_2048_bit_modulus_packs_42_values_per_ciphertext_for_10_nodes():
    nodes, updates, weights, _ = make_round(10, 50, seed=3)
    scheme = JoyeLibert(clip=8.0)
    result = run_round(scheme, updates, weights).result
    check_sum(result, updates, weights, nodes)
    assert result.report["key_size"] == 2048
    assert result.report["values_per_ciphertext"] == 42  # 48-bit slots below N
    assert result.report["ciphertexts"] == 2  # 50 + 6 + 1 values and 3 of bookkeeping
    # the first node generated the modulus; the next round reuses it (no new generation)
    assert scheme.modulus_ is not None and scheme.modulus_.bit_length() == 2048
    first = scheme.modulus_
    session = scheme.researcher_session(2, nodes)
    assert session.dealer is None and session.modulus == first


@pytest.mark.parametrize("stage", ["lost_at_setup", "lost_before_protect"])
def test_a_missing_node_is_a_clear_error_never_a_wrong_sum(stage):
    nodes, updates, weights, _ = make_round(4, 10)
    with pytest.raises(SecureAggregationError, match="needs every node") as info:
        run_round(JoyeLibert(key_size=512, clip=8.0), updates, weights, floors=SMALL,
                  **{stage: ["node-02"]})
    assert list(info.value.failures) == ["node-02"]


def open_jl_round(nodes):
    scheme = JoyeLibert(key_size=512, clip=4.0)
    researcher = scheme.researcher_session(1, nodes)
    sessions = {}
    for node, msg in researcher.setup_requests().items():
        sessions[node] = open_node_session(node, msg, context_for(SMALL))
        researcher.add_setup(node, sessions[node].answer("setup", msg))
    for node, msg in researcher.share_requests().items():
        researcher.add_shares(node, sessions[node].answer("share_keys", msg))
    return researcher, sessions


def test_a_tampered_key_share_or_ciphertext_is_caught():
    nodes = ["a", "b", "c"]
    update = ParameterSet({"w": np.linspace(-1, 1, 30)})
    researcher, sessions = open_jl_round(nodes)
    options = researcher.train_options("b")
    blob = bytearray(options["shares"]["a"])
    blob[20] ^= 4
    with pytest.raises(ProtocolError, match="key share from node 'a' to node 'b' failed "
                                            "authentication"):
        sessions["b"].protect(update, 1.0, {**options, "shares": {**options["shares"],
                                                                  "a": bytes(blob)}})
    for node in nodes:
        payload = sessions[node].protect(update, 1.0, researcher.train_options(node))
        if node == "c":
            cts = payload["ciphertexts"].copy()
            cts[0, 5] ^= 1
            payload = {**payload, "ciphertexts": cts}
        researcher.add_protected(node, payload)
    with pytest.raises(SecureAggregationError, match="failed its check"):
        researcher.unprotect_sum()


def test_without_gmpy2_python_integers_give_the_same_sum_and_one_log_line():
    script = textwrap.dedent(
        """
        import importlib.abc, logging, sys
        import numpy as np

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "gmpy2":
                    raise ImportError("No module named 'gmpy2'")
                return None

        sys.meta_path.insert(0, Block())
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        from fedcore.params import ParameterSet
        from fedcore.secagg import JoyeLibert
        from fedcore.secagg import NodeFloors
        from fedcore.secagg.local import run_round

        ups = {n: ParameterSet({"w": np.arange(20.0) * (i + 1)}) for i, n in enumerate("abc")}
        out = run_round(JoyeLibert(key_size=256, clip=100.0), ups, dict.fromkeys("abc", 2.0),
                        floors=NodeFloors(min_key_bits=256))
        assert np.allclose(out.result.sums["w"], np.arange(20.0) * 12), out.result.sums["w"]
        print(out.result.report["bigint"])
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "python"
    assert out.stderr.count("gmpy2 is not installed") == 1
    assert 'pip install -c constraints.txt ".[secagg-fast]"' in out.stderr


def test_a_published_modulus_is_used_only_by_nodes_whose_administrator_installed_it():
    from fedcore.secagg import NodeFloors
    from fedcore.secagg import _bigint as B
    from fedcore.secagg.context import modulus_digest

    nodes, updates, weights, _ = make_round(3, 20, seed=4)
    modulus = B.biprime(512)
    digest = modulus_digest(modulus.to_bytes(64, "little"))
    installed = NodeFloors(min_key_bits=512, jl_moduli=frozenset({digest}))
    scheme = JoyeLibert(key_size=512, modulus=modulus, clip=8.0)
    check_sum(run_round(scheme, updates, weights, floors=installed).result, updates, weights,
              nodes)
    with pytest.raises(ProtocolError, match="no node vouches for it"):
        run_round(scheme, updates, weights, floors=NodeFloors(min_key_bits=512))


def test_later_rounds_reuse_the_modulus_the_first_node_generated_and_signed():
    nodes, updates, weights, _ = make_round(3, 20, seed=6)
    scheme = JoyeLibert(key_size=512, clip=8.0)
    first = run_round(scheme, updates, weights, floors=SMALL).result
    dealt, cert = scheme.modulus_, scheme.modulus_cert_
    assert cert["dealer"] == nodes[0] and len(cert["sig"]) == 64
    second = run_round(scheme, updates, weights, round=2, floors=SMALL).result
    for result in (first, second):
        check_sum(result, updates, weights, nodes)
    assert scheme.modulus_ == dealt  # no node generated another one
    scheme.modulus_cert_ = {**cert, "sig": bytes(64)}  # a forged certificate
    with pytest.raises(ProtocolError, match="Joye-Libert modulus of node 'node-00' does not "
                                            "verify"):
        run_round(scheme, updates, weights, round=3, floors=SMALL)
