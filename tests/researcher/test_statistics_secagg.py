"""Federated statistics under secure aggregation, over real in-process nodes and messages.

Pooled results are checked against the same request in clear and against pandas on the
concatenated data; what a node sends is recorded on the node itself.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedcore import FederatedStatistics, Node
from fedcore.errors import ConfigurationError, GovernanceError, SecureAggregationError
from fedcore.params import ParameterSet
from fedcore.researcher.statistics import POOLED
from fedcore.secagg import JoyeLibert, PairwiseMasking
from tests._support.faults import DiesBeforeUnmasking
from tests._support.statistics import federation as _plain_federation

SIZES = (500, 800, 1200, 300)
EVERY_NODE = [f"node-{i:02d}" for i in range(1, 6)]


class Recording(Node):
    """A node that keeps the statistics replies it sends."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent = []

    async def _on_stats(self, env):
        reply = await super()._on_stats(env)
        self.sent.append(reply)
        return reply


def _site(i, n, seed=0):
    rng = np.random.default_rng(seed + i)
    glucose = 1e6 + rng.normal(i, 1.0 + i, n)  # a large offset: hard on naive variance
    glucose[rng.random(n) < 0.05] = np.nan
    return pd.DataFrame({"age": rng.integers(18, 95, n), "glucose": glucose,
                         "label": rng.integers(0, 2, n)})


def _federation(tmp_path, frames, configs=None, kinds=None):
    """test_statistics's hospitals, each node a :class:`Recording` unless ``kinds`` says."""
    return _plain_federation(tmp_path, frames, configs, kinds, node_class=Recording)


@pytest.fixture
def sites():
    return [_site(i, n) for i, n in enumerate(SIZES)]


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def test_masked_statistics_equal_the_plain_ones_and_pandas_with_no_node_row(tmp_path, sites):
    no_suppression = {f"node-{i:02d}": "min_count = 0" for i in range(1, 5)}
    whole = pd.concat(sites, ignore_index=True)
    g = whole["glucose"].dropna().to_numpy()
    edges = np.linspace(g.min(), g.max(), 13)
    age_edges = [20, 30.5, 50.2, 50.8, 80, 200]  # uneven, values below, an empty bin
    results = {}
    with _federation(tmp_path, sites, no_suppression) as fed:
        for scheme in (None, "masking"):
            with FederatedStatistics(fed.url, "cohort", secagg=scheme) as stats:
                results[scheme] = (stats.describe(["age", "glucose"]),
                                   stats.histogram("glucose", bins=edges),
                                   stats.histogram("age", bins=age_edges),
                                   stats.quantiles("glucose", [0.1, 0.5, 0.9], bins=12,
                                                   range=(g.min(), g.max())))
        sent = {n.node_id: n.sent for n in fed.nodes}
        audit = fed.nodes[0].audit_log()
    plain, masked = results[None], results["masking"]
    table, hist, uneven, quantiles = masked
    assert list(table.index) == [("age", POOLED), ("glucose", POOLED)]  # no node's row
    assert list(hist.counts.index) == [POOLED] == list(quantiles.index)
    assert hist.suppressed.empty
    for column in ("age", "glucose"):
        values = whole[column].dropna().to_numpy(dtype=float)
        row, clear = table.loc[(column, POOLED)], plain[0].loc[(column, POOLED)]
        assert row["count"] == clear["count"] == len(values)  # exact
        assert row["missing"] == whole[column].isna().sum()
        for key, expected in (("mean", values.mean()), ("var", values.var(ddof=1)),
                              ("sum", values.sum())):
            assert _rel(row[key], clear[key]) < 1e-12, key
            assert _rel(row[key], expected) < 1e-9, key
        assert np.isnan(row["min"]) and np.isnan(row["max"]) and row["status"] == "ok"
        assert row["note"] == ("secure aggregation (masking) of 4 nodes: per-node values "
                               "hidden; min/max are not sums: not available")
    np.testing.assert_array_equal(hist.pooled, np.histogram(g, bins=edges)[0])
    np.testing.assert_array_equal(hist.pooled, plain[1].pooled)
    np.testing.assert_array_equal(uneven.pooled, np.histogram(whole["age"], age_edges)[0])
    assert uneven.totals.loc[POOLED].tolist() == plain[2].totals.loc[POOLED].tolist()
    assert uneven.totals.loc[POOLED, "below"] == (whole["age"] < 20).sum() > 0
    labels = ["10%", "50%", "90%"]
    np.testing.assert_array_equal(quantiles.loc[POOLED, labels].to_numpy(float),
                                  plain[3].loc[POOLED, labels].to_numpy(float))
    width = (g.max() - g.min()) / 12
    assert np.all(np.abs(quantiles.loc[POOLED, labels].to_numpy(float)
                         - np.quantile(g, [0.1, 0.5, 0.9])) <= width)
    # Nothing of one node travelled in clear: no results, a masked vector of uint64.
    for node, replies in sent.items():
        secure = replies[len(replies) // 2:]  # the plain requests came first
        assert all(r.results == [] and r.secagg["values"].dtype == np.uint64 for r in secure)
        count = sites[int(node[-1]) - 1]["age"].notna().sum()
        assert count not in secure[0].secagg["values"]
    assert [e.get("secagg") for e in audit if e["event"] == "statistics"][-1] == "masking"


def test_small_counts_are_withheld_before_protection_and_suppressed_nodes_send_zeros(
        tmp_path, sites):
    sites[1].loc[:2, "age"] = 200  # three very old patients at node-02: a small cell
    tiny = sites[3].iloc[:3]  # node-04 has three patients: it withholds everything
    frames = [*sites[:3], tiny]
    edges = [0, 50, 100, 150, 250]
    results = {}
    with _federation(tmp_path, frames) as fed:
        for scheme in (None, "plain", "masking"):  # plain: the identity scheme, readable
            with FederatedStatistics(fed.url, "cohort", secagg=scheme) as stats:
                results[scheme] = (stats.describe("age"), stats.histogram("age", bins=edges))
        tiny_sent = fed.nodes[3].sent[5]  # 3 requests per scheme: plain's histogram
    plain_table, plain_hist = results[None]
    for scheme in ("plain", "masking"):
        table, hist = results[scheme]
        pooled = table.loc[("age", POOLED)]
        assert pooled["count"] == plain_table.loc[("age", POOLED), "count"] == sum(
            len(s) for s in sites[:3])
        assert _rel(pooled["mean"], pd.concat(sites[:3])["age"].mean()) < 1e-12
        assert "1 node(s) withheld the variable (fewer than min_count records) and count " \
               "as zeros" in pooled["note"]
        np.testing.assert_array_equal(hist.pooled, plain_hist.pooled)  # small cells left out
        assert hist.totals.loc[POOLED, "withheld"] == plain_hist.totals.loc[POOLED, "withheld"]
        assert f"2 small cell(s) withheld by the nodes " \
               f"({plain_hist.totals.loc[POOLED, 'withheld']} values)" in hist.notes[POOLED]
    # The suppressed node's protected vector is zeros but its "suppressed" flag: nothing a
    # researcher could get back by subtracting one request from another.
    vector = tiny_sent.secagg["params"]["q0"] + tiny_sent.secagg["extras"]["lo"]["q0"]
    assert vector[4] == 1 and not np.delete(vector, 4).any()


def test_a_node_lost_before_unmasking_is_recovered_until_too_few_remain(tmp_path, caplog):
    frames = [_site(i, 100) for i in range(5)]
    whole = pd.concat(frames)["age"]
    edges = [0, 30, 60, 100]
    scheme = PairwiseMasking(threshold=3)
    with _federation(tmp_path, frames, kinds={"node-02": DiesBeforeUnmasking}) as fed, \
            FederatedStatistics(fed.url, "cohort", secagg=scheme, timeout=10) as stats:
        hist = stats.histogram("age", bins=edges)
    # Its protected counts arrived before it left: the sum still holds all five nodes.
    np.testing.assert_array_equal(hist.pooled, np.histogram(whole, edges)[0])
    assert "of 5 nodes" in hist.notes[POOLED]
    assert "node-02" in caplog.text and "(unmask)" in caplog.text
    dying = dict.fromkeys(["node-01", "node-02", "node-04"], DiesBeforeUnmasking)
    with _federation(tmp_path / "again", frames, kinds=dying) as fed, \
            FederatedStatistics(fed.url, "cohort", secagg=scheme, timeout=10) as stats:
        with pytest.raises(SecureAggregationError, match="at least t=3 are needed"):
            stats.histogram("age", bins=edges)  # an error, never a wrong result


def test_a_node_refusing_between_setup_and_reply_is_left_out_of_the_secure_sum(tmp_path,
                                                                                sites):
    small_keys = "secagg_min_key_bits = 512"  # a test's speed
    configs = {"node-01": small_keys, "node-02": small_keys, "node-04": small_keys,
               "node-03": f"statistics = false\n{small_keys}"}
    expected = pd.concat([sites[0], sites[1], sites[3]])["age"]
    for scheme in ("masking", JoyeLibert(key_size=512)):  # JL asks again without it
        with _federation(tmp_path / str(id(scheme)), sites, configs) as fed, \
                FederatedStatistics(fed.url, "cohort", secagg=scheme) as stats:
            table = stats.describe("age")
        pooled = table.loc[("age", POOLED)]
        assert pooled["count"] == len(expected)
        assert _rel(pooled["var"], expected.var()) < 1e-12
        assert "excludes node-03 (refused)" in pooled["note"]


def test_a_node_requiring_secure_aggregation_refuses_plain_statistics(tmp_path, sites):
    required = {f"node-{i:02d}": "secagg_required = true" for i in (1, 2, 3)}
    with _federation(tmp_path, sites[:3], required) as fed:
        with FederatedStatistics(fed.url, "cohort") as stats, \
                pytest.raises(GovernanceError, match="Every node refused") as info:
            stats.describe("age")
        with FederatedStatistics(fed.url, "cohort", secagg="plain") as stats, \
                pytest.raises(GovernanceError, match="uses plain aggregation"):
            stats.describe("age")  # the identity scheme is no protection
        with FederatedStatistics(fed.url, "cohort", secagg="masking") as stats:
            table = stats.describe("age")
        events = [e["event"] for e in fed.nodes[0].audit_log()]
    assert "policy secagg_required" in str(info.value) and "secagg=" in str(info.value)
    assert table.loc[("age", POOLED), "count"] == sum(SIZES[:3])
    assert events.count("statistics-refused") == 2 and "statistics" in events


def test_joye_libert_sums_statistics_too(tmp_path, sites):
    frames = [s.iloc[:40] for s in sites[:3]]
    whole = pd.concat(frames)
    scheme = JoyeLibert(key_size=512)
    configs = {f"node-{i:02d}": "min_count = 0\nsecagg_min_key_bits = 512" for i in (1, 2, 3)}
    with _federation(tmp_path, frames, configs) as fed, \
            FederatedStatistics(fed.url, "cohort", secagg=scheme) as stats:
        table = stats.describe("glucose")
        hist = stats.histogram("age", bins=[0, 40, 60, 100])
    pooled = table.loc[("glucose", POOLED)]
    values = whole["glucose"].dropna()
    assert pooled["count"] == len(values) and pooled["missing"] == whole["glucose"].isna().sum()
    assert _rel(pooled["mean"], values.mean()) < 1e-12
    assert _rel(pooled["var"], values.var()) < 1e-9
    np.testing.assert_array_equal(hist.pooled, np.histogram(whole["age"], [0, 40, 60, 100])[0])
    assert "secure aggregation (joye-libert) of 3 nodes" in hist.notes[POOLED]
    assert scheme.modulus_ is None  # the user's object is untouched; statistics use a copy


def test_secure_requests_that_cannot_be_answered_are_explained(tmp_path, sites):
    with pytest.raises(ConfigurationError, match=r"Expected a fedcore.secagg scheme or its "
                                                 r"name.*Received: secagg=3"):
        FederatedStatistics("inproc://x", "cohort", secagg=3)
    with _federation(tmp_path, sites[:3]) as fed:
        with FederatedStatistics(fed.url, "cohort", secagg="masking") as stats:
            with pytest.raises(ConfigurationError, match="under secure aggregation nodes send "
                                                         r"only sums.*Pass range="):
                stats.histogram("age", bins=5)
            with pytest.raises(ConfigurationError, match="Pass range="):
                stats.quantiles("age")
            with pytest.raises(ConfigurationError, match=r"Column 'weight' is not in the "
                                                         r"dataset"):
                stats.describe("weight")
            assert stats.histogram("age", bins=5, range=(0, 100)).pooled.sum() == sum(
                SIZES[:3])
        with FederatedStatistics(fed.url, "cohort", nodes=["node-01"],
                                 secagg="masking") as stats:
            with pytest.raises(ConfigurationError, match="at least 2 nodes: the sum of one "
                                                         "node is its own values"):
                stats.describe("age")


def test_protected_payload_layout_is_the_vector_per_query(tmp_path, sites):
    """The identity scheme shows what the masks hide: one vector per query, cut in two."""
    with _federation(tmp_path, sites[:2], {"node-01": "min_count = 0"}) as fed, \
            FederatedStatistics(fed.url, "cohort", secagg="plain") as stats:
        stats.histogram("age", bins=[0, 50, 100])
        payload = fed.nodes[0].sent[-1].secagg
    hi, lo = payload["params"], payload["extras"]["lo"]
    assert isinstance(hi, ParameterSet) and list(hi) == ["q0"] == list(lo)
    age = sites[0]["age"]
    expected = [len(age), 0, age.sum(), (age ** 2).sum(), 0, 0, 0, 0,
                *np.histogram(age, [0, 50, 100])[0]]
    np.testing.assert_allclose(hi["q0"] + lo["q0"], expected, rtol=1e-15)


@pytest.mark.parametrize("offset, scale", [(3e-8, 1e-9), (5e13, 1e12)])
def test_secure_statistics_do_not_depend_on_the_scale_of_the_data(tmp_path, offset, scale):
    """Tiny values keep their precision; huge ones (sums of squares beyond 2^80) still fit."""
    rng = np.random.default_rng(7)
    frames = [pd.DataFrame({"x": offset + scale * rng.normal(size=n)}) for n in (50, 80, 120)]
    values = pd.concat(frames)["x"].to_numpy()
    with _federation(tmp_path, frames) as fed, \
            FederatedStatistics(fed.url, "cohort", secagg="masking") as stats:
        row = stats.describe("x").loc[("x", POOLED)]
    assert row["count"] == 250
    assert _rel(row["mean"], values.mean()) < 1e-12
    assert _rel(row["var"], values.var(ddof=1)) < 1e-9


def test_an_experiment_with_secure_aggregation_asks_its_statistics_securely(tmp_path, sites):
    """exp.statistics() inherits exp.secagg: nodes that require it answer, pooled only."""
    pytest.importorskip("sklearn")
    from fedcore import Experiment
    from fedcore_sklearn import SklearnTrainingPlan

    class Plan(SklearnTrainingPlan):
        def init_model(self):
            from sklearn.linear_model import SGDClassifier

            return SGDClassifier()

    required = {f"node-{i:02d}": "secagg_required = true" for i in (1, 2, 3)}
    with _federation(tmp_path, sites[:3], required) as fed:
        exp = Experiment(Plan, tags=["cohort"], federation=fed.url, progress=False,
                         secagg="masking")
        with exp.statistics() as stats:
            table = stats.describe("age")
        exp.close()
    assert list(table.loc["age"].index) == [POOLED]
    assert table.loc[("age", POOLED), "count"] == sum(SIZES[:3])


def test_masking_in_a_32_bit_ring_sums_statistics_in_64_bits(tmp_path, sites):
    frames = [s.iloc[:40] for s in sites[:3]]
    whole = pd.concat(frames)
    scheme = PairwiseMasking(ring_bits=32)  # too coarse for exact counts: statistics widen it
    configs = {f"node-{i:02d}": "min_count = 0" for i in (1, 2, 3)}
    with _federation(tmp_path, frames, configs) as fed, \
            FederatedStatistics(fed.url, "cohort", secagg=scheme) as stats:
        table = stats.describe("glucose")
    pooled = table.loc[("glucose", POOLED)]
    values = whole["glucose"].dropna()
    assert pooled["count"] == len(values)
    assert _rel(pooled["mean"], values.mean()) < 1e-12
    assert scheme.ring_bits == 32  # the user's object is untouched
