"""Differential privacy: the accountant, update-level and central DP, the node's budget."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

pytest.importorskip("dp_accounting")

import dp_accounting  # noqa: E402

from fedcore.errors import ConfigurationError  # noqa: E402
from fedcore.governance import Request  # noqa: E402
from fedcore.governance.ledger import PrivacyLedger  # noqa: E402
from fedcore.node import Node  # noqa: E402
from fedcore.params import ParameterSet  # noqa: E402
from fedcore.privacy import (  # noqa: E402
    DEFAULT_ORDERS,
    Accountant,
    CentralDP,
    PrivacySpec,
    UpdateDP,
    clip_update,
    epsilon,
    train_size,
)

# --- the accountant -------------------------------------------------------------------------

GRID = list(itertools.product([0.8, 1.0, 1.1, 2.0, 5.0], [0.004, 0.02, 0.1, 1.0]))
STEPS, DELTAS = (1, 50, 2000), (1e-5, 1e-3)


def _reference(events, delta: float) -> float:
    """dp-accounting's own RDP accountant over the same orders (Opacus's DEFAULT_ALPHAS)."""
    acc = dp_accounting.rdp.RdpAccountant(orders=list(DEFAULT_ORDERS))
    for z, q, steps in events:
        acc.compose(_event(z, q), steps)
    return acc.get_epsilon(delta)


def _event(z: float, q: float):
    event = dp_accounting.GaussianDpEvent(z)
    return event if q == 1 else dp_accounting.PoissonSampledDpEvent(q, event)


def test_epsilon_matches_dp_accounting_over_a_grid():
    for z, q in GRID:
        reference = dp_accounting.rdp.RdpAccountant(orders=list(DEFAULT_ORDERS))
        done = 0
        for steps in STEPS:  # grow one reference accountant step count by step count
            reference.compose(_event(z, q), steps - done)
            done = steps
            for delta in DELTAS:
                ours, ref = epsilon([(z, q, steps)], delta), reference.get_epsilon(delta)
                assert abs(ours - ref) <= 1e-6, (z, q, steps, delta, ours, ref)


def test_rounds_with_different_parameters_compose_as_in_dp_accounting():
    history = [(1.1, 0.01, 300), (1.3, 0.02, 150), (1.1, 0.01, 300), (2.0, 1.0, 1)]
    acc = Accountant()
    totals = []
    for event in history:  # one round at a time, as a node records them
        acc.extend([event])
        totals.append(acc.epsilon(1e-5))
    assert abs(totals[-1] - _reference(history, 1e-5)) <= 1e-6
    assert totals == sorted(totals) and totals[0] < totals[-1]  # spending only grows
    assert acc.events[0] == (1.1, 0.01, 300)


def test_the_accountant_state_is_plain_data_that_round_trips():
    acc = Accountant([(1.1, 0.01, 100)])
    acc.add(1.1, 0.01, 100)  # the same parameters again: merged into one event
    acc.add(0.9, 1.0)
    state = json.loads(json.dumps(acc.state_dict()))
    assert state == {"events": [[1.1, 0.01, 200], [0.9, 1.0, 1]]}
    again = Accountant.from_state(state)
    assert again.epsilon(1e-5) == acc.epsilon(1e-5) > 0
    assert Accountant().epsilon(1e-5) == 0.0
    assert acc.epsilon_with([(0.9, 1.0, 1)], 1e-5) > acc.epsilon(1e-5)
    assert len(acc.events) == 2  # epsilon_with records nothing


def test_bad_accountant_input_is_explained():
    with pytest.raises(ConfigurationError, match="noise_multiplier must be a number >= 0"):
        Accountant([(-1.0, 0.1, 3)])
    with pytest.raises(ConfigurationError, match=r"sample_rate must be in \(0, 1\]"):
        epsilon([(1.0, 1.5, 3)], 1e-5)
    with pytest.raises(ConfigurationError, match=r"delta must be a number in \(0, 1\)"):
        epsilon([(1.0, 0.5, 3)], 1.0)
    assert epsilon([(0.0, 0.5, 3)], 1e-5) == float("inf")  # no noise, no privacy


# --- the request's parameters ---------------------------------------------------------------


@pytest.mark.parametrize("given, message", [
    ({"mechanism": "update", "clip": 1.0, "noise_multiplier": -0.5},
     r"privacy\['noise_multiplier'\] must be a number > 0. Received: -0.5"),
    ({"mechanism": "update", "clip": 1.0, "noise_multiplier": 1.0, "delta": 1.0},
     r"delta must be a number in \(0, 1\).*Received: 1.0"),
    ({"mechanism": "update", "noise_multiplier": 1.0}, r"privacy needs 'clip'"),
    ({"mechanism": "update", "clip": 0, "noise_multiplier": 1.0}, r"'clip'\] must be a number"),
    ({"mechanism": "laplace", "clip": 1.0, "noise_multiplier": 1.0},
     r"must be one of \['update', 'dp-sgd'\]"),
    ({"mechanism": "update", "clip": 1.0, "noise_multipler": 1.0},
     r"Did you mean 'noise_multiplier'"),
])
def test_bad_privacy_parameters_get_clear_messages(given, message):
    with pytest.raises(ConfigurationError, match=message):
        PrivacySpec.parse(given)


def test_costs_are_known_before_training():
    update = PrivacySpec.parse({"mechanism": "update", "clip": 1, "noise_multiplier": 1.2})
    assert update.events(n_train=1000) == [(1.2, 1.0, 1)]
    sgd = PrivacySpec.parse({"mechanism": "dp-sgd", "max_grad_norm": 1,
                             "noise_multiplier": 1.2})
    assert sgd.clip == 1.0  # Opacus's name is accepted
    # 100 samples, batches of 32: 4 Poisson batches an epoch at rate 1/4; 3 epochs
    assert sgd.events(n_train=100, training_args={"batch_size": 32, "epochs": 3}) == [
        (1.2, 0.25, 12)]
    assert sgd.events(n_train=100, training_args={"batch_size": 32, "epochs": 3,
                                                  "num_updates": 5}) == [(1.2, 0.25, 5)]


def test_train_size_is_what_the_node_trains_on():
    from fedcore.data.array import ArrayDataset

    for n, ratio in itertools.product([1, 2, 7, 100, 101], [0.0, 0.1, 0.25, 0.5, 0.9]):
        train, _ = ArrayDataset(np.zeros((n, 1))).split(ratio, seed=0)
        assert train_size(n, ratio) == len(train), (n, ratio)


# --- update-level DP ------------------------------------------------------------------------


def _params(rng, n=1000):
    return ParameterSet({"w": rng.normal(size=(n, 4)).astype(np.float32),
                         "b": rng.normal(size=4), "steps": np.array(7)})


def test_clipping_bounds_the_update_norm(rng):
    glob = _params(rng)
    local = ParameterSet({k: (v * 3 + 1 if v.dtype.kind == "f" else v + 5)
                          for k, v in glob.items()})
    delta, norm, clipped = clip_update(glob, local, clip=0.5)
    assert clipped and norm > 0.5
    assert np.sqrt(sum(np.sum(d ** 2) for d in delta.values())) == pytest.approx(0.5)
    assert set(delta) == {"w", "b"}  # integer counters are no update to clip
    small = ParameterSet({k: (v + 1e-4 if v.dtype.kind == "f" else v) for k, v in
                          glob.items()})
    _, small_norm, clipped = clip_update(glob, small, clip=0.5)
    assert not clipped and small_norm < 0.5


def test_update_dp_noise_has_the_promised_standard_deviation():
    rng = np.random.default_rng(1)
    glob = ParameterSet({"w": np.zeros((400, 500), np.float32), "n": np.array(3)})
    local = ParameterSet({"w": np.full((400, 500), 10.0, np.float32), "n": np.array(4)})
    dp = UpdateDP(clip=0.5, noise_multiplier=2.0, delta=1e-5)
    out, report = dp.apply(glob, local, rng=np.random.default_rng(7))
    # replace-one: two clipped updates lie up to 2 * clip apart; std = z * 2 * clip
    assert report["sensitivity"] == dp.sensitivity == 1.0
    assert report["clipped"] and report["sigma"] == 2.0 and report["norm"] > 4000
    noise = out["w"].astype(np.float64) - 0.5 / np.sqrt(200_000)  # clipped update is flat
    assert noise.std() == pytest.approx(2.0, rel=0.02) and abs(noise.mean()) < 0.02
    assert out["w"].dtype == np.float32 and int(out["n"]) == 3  # counters stay on the node
    assert dp.event() == (2.0, 1.0, 1)
    del rng
    # without a generator the noise is drawn from a CSPRNG-seeded one: never repeated
    a, _ = dp.apply(glob, local)
    b, _ = dp.apply(glob, local)
    assert not np.array_equal(a["w"], b["w"])


def test_update_dp_rejects_bad_settings():
    with pytest.raises(ConfigurationError, match="noise_multiplier'\\] must be a number > 0"):
        UpdateDP(clip=1.0, noise_multiplier=-1)
    with pytest.raises(ConfigurationError, match="delta"):
        UpdateDP(clip=1.0, noise_multiplier=1.0, delta=2)


# --- central DP -----------------------------------------------------------------------------


def test_central_dp_clips_each_update_and_noises_the_mean():
    glob = ParameterSet({"w": np.zeros(10_000)})
    agg = CentralDP(clip=1.0, noise_multiplier=0.5, seed=3)
    agg.start(glob, 1)
    agg.add(ParameterSet({"w": np.full(10_000, 100.0)}), 500.0, "big")  # weight ignored
    agg.add(ParameterSet({"w": np.full(10_000, 0.001)}), 1.0, "small")
    out = agg.result()
    noise = out["w"] - (0.01 + 0.001) / 2  # clipped big update: 1/sqrt(10000) per value
    # replace-one: the mean of 2 updates clipped to 1 moves by up to 2 * 1 / 2
    assert noise.std() == pytest.approx(0.5 * 2 * 1.0 / 2, rel=0.05)
    report = agg.privacy_report()
    assert report["nodes"] == 2 and report["clipped"] == 1 and report["sigma"] == 0.5
    assert report["sensitivity"] == 1.0 and report["relation"] == "replace-one"
    assert report["epsilon"] == report["epsilon_total"] == agg.epsilon > 0
    assert agg.result() is out and len(agg.accountant_.events) == 1  # accounted once
    assert CentralDP.sum_only is False


def test_central_dp_is_configured_by_plain_data():
    agg = CentralDP(clip=0.5, noise_multiplier=1.0, sample_rate=0.5, aggregator="fedprox",
                    aggregator_params={"mu": 0.1})
    assert json.loads(json.dumps(agg.get_params())) == {
        "clip": 0.5, "noise_multiplier": 1.0, "delta": 1e-5, "sample_rate": 0.5,
        "aggregator": "fedprox", "aggregator_params": {"mu": 0.1}, "seed": None}
    assert agg.round_options()["mu"] == 0.1  # the inner algorithm still reaches the nodes
    with pytest.raises(ConfigurationError, match="sample_rate is the fraction of nodes"):
        CentralDP(clip=1.0, noise_multiplier=1.0, sample_rate=0)
    with pytest.raises(ConfigurationError, match="registered name"):
        CentralDP(clip=1.0, noise_multiplier=1.0, aggregator=object())


# --- the node's budget ----------------------------------------------------------------------

UPDATE_DP = {"mechanism": "update", "clip": 1.0, "noise_multiplier": 1.0}


@pytest.fixture
def node(tmp_path, rng):
    node = Node(tmp_path / "home", node_id="hosp", approval_required=False)
    node.datasets.add_arrays("cohort", ["cohort"], rng.normal(size=(200, 3)),
                             rng.integers(0, 2, 200))
    return node


def _request(node: Node, privacy=None, **kwargs) -> Request:
    (entry,) = node.datasets.list()
    return Request(kind="train", researcher="alice", dataset=entry, n_samples=200,
                   plan_hash="0" * 64, plan_name="Plan", privacy=privacy or {}, **kwargs)


def test_the_budget_accepts_rounds_until_the_next_would_cross_it(node):
    one = epsilon([(1.0, 1.0, 1)], 1e-5)
    three, four = epsilon([(1.0, 1.0, 3)], 1e-5), epsilon([(1.0, 1.0, 4)], 1e-5)
    limit = round((three + four) / 2, 2)  # room for three rounds, not four
    node.set_policy(dp_max_epsilon=limit, dp_delta=1e-5)
    ledger = PrivacyLedger(node.db)
    (entry,) = node.datasets.list()
    accepted = 0
    while True:
        decision = node.review(_request(node, UPDATE_DP))
        if not decision.allowed:
            break
        ledger.record(entry["id"], [(1.0, 1.0, 1)], delta=1e-5)  # what the node wires
        accepted += 1
    assert accepted == 3
    assert decision.policy == "privacy-budget"
    spent = ledger.spent(entry["id"])[0]
    assert spent == pytest.approx(three)
    reason = decision.reason
    assert f"spent epsilon {spent:.4g} of {limit:g}" in reason
    assert f"{limit - spent:.4g} remains" in reason
    assert f"would cost {one:.4g}" in reason and f"bringing the total to {four:.4g}" in reason
    # the refusal is on record, and spent nothing
    assert node.audit_log()[-1]["allowed"] is False
    assert ledger.spent(entry["id"])[0] == spent


def test_dp_sgd_rounds_are_priced_from_the_dataset_size_and_arguments(node):
    node.set_policy(dp_max_epsilon=3.0)
    sgd = {"mechanism": "dp-sgd", "clip": 1.0, "noise_multiplier": 1.0}
    cheap = _request(node, sgd, training_args={"batch_size": 10, "epochs": 1},
                     test_ratio=0.25)
    assert node.review(cheap).allowed
    costly = _request(node, sgd, training_args={"batch_size": 150, "epochs": 20},
                      test_ratio=0.25)
    decision = node.review(costly)
    # 150 training samples (200 minus the test split) in one batch of 150: rate 1, 20 steps
    expected = epsilon([(1.0, 1.0, 20)], 1e-5)
    assert not decision.allowed and f"would cost {expected:.4g}" in decision.reason


def test_spent_budget_survives_reopening_the_node(node, tmp_path):
    (entry,) = node.datasets.list()
    ledger = PrivacyLedger(node.db)
    total, delta = ledger.record(entry["id"], [(1.1, 0.01, 500)], delta=1e-5)
    ledger.record(entry["id"], [(1.1, 0.01, 500)], delta=1e-5)
    node.db.close()
    again = PrivacyLedger(Node(tmp_path / "home").db)
    eps, delta = again.spent(entry["id"])
    assert delta == 1e-5 and eps == pytest.approx(epsilon([(1.1, 0.01, 1000)], 1e-5))
    assert eps > total
    (row,) = again.list()
    assert row["rounds"] == 2 and row["events"] == [[1.1, 0.01, 1000]]


def test_a_node_requiring_dp_refuses_requests_without_it(node):
    node.set_policy(dp_required=True)
    decision = node.review(_request(node))
    assert not decision.allowed and "policy dp_required" in decision.reason
    assert node.review(_request(node, UPDATE_DP)).allowed
    bad = node.review(_request(node, {**UPDATE_DP, "delta": 3}))
    assert not bad.allowed and "differential privacy is invalid" in bad.reason
    node.set_policy(dp_required=False, dp_max_epsilon={"other": 1.0})
    assert node.review(_request(node)).allowed  # no cap on this dataset, DP not required
    node.set_policy(dp_max_epsilon={"cohort": 1.0})
    decision = node.review(_request(node))
    assert not decision.allowed and "has a privacy budget" in decision.reason


def test_a_node_requiring_secure_aggregation_refuses_plain_requests(node):
    node.set_policy(secagg_required=True)
    for secagg in (None, {}, {"scheme": "plain"}, "plain"):
        decision = node.review(_request(node, secagg=secagg))
        assert not decision.allowed and "policy secagg_required" in decision.reason
    assert node.review(_request(node, secagg={"scheme": "masking", "threshold": 2})).allowed


def test_budget_policy_settings_are_checked(node):
    with pytest.raises(ConfigurationError, match=r"dp_delta must be a number in \(0, 1\)"):
        node.set_policy(dp_delta=2)
    with pytest.raises(ConfigurationError, match="dp_max_epsilon must be a number > 0"):
        node.set_policy(dp_max_epsilon=-1)
    with pytest.raises(ConfigurationError, match="dp_max_epsilon must be"):
        node.set_policy(dp_max_epsilon={"*": "lots"})
    assert node.policy["dp_max_epsilon"] is None and node.policy["dp_delta"] == 1e-5


def test_cli_budget_lists_spent_and_limit(node, tmp_path, capsys):
    from fedcore_node.cli import main

    (entry,) = node.datasets.list()
    PrivacyLedger(node.db).record(entry["id"], [(1.0, 1.0, 2)], delta=1e-5)
    node.set_policy(dp_max_epsilon=10)
    home = str(tmp_path / "home")
    assert main(["--home", home, "budget", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    spent = epsilon([(1.0, 1.0, 2)], 1e-5)
    assert row["dataset"] == entry["id"] and row["name"] == "cohort"
    assert row["epsilon_spent"] == pytest.approx(spent) and row["epsilon_limit"] == 10
    assert row["epsilon_remaining"] == pytest.approx(10 - spent) and row["dp_rounds"] == 1
    assert main(["--home", home, "budget"]) == 0
    out = capsys.readouterr().out
    assert "cohort" in out and f"{spent:.4g}" in out and "epsilon at delta 1e-05" in out
    assert main(["--home", home, "policy", "set", "dp_max_epsilon={cohort=4}"]) == 0
    capsys.readouterr()
    assert main(["--home", home, "budget", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["epsilon_limit"] == 4
    assert main(["--home", home, "policy", "set", "dp_delta=7"]) == 1
    assert "dp_delta must be a number in (0, 1)" in capsys.readouterr().err


def test_the_reply_reports_parameters_and_epsilon_but_no_data():
    spec = PrivacySpec.parse({**UPDATE_DP, "delta": 1e-6})
    reply = spec.reply([(1.0, 1.0, 1)], total_events=[(1.0, 1.0, 3)])
    assert reply == {"mechanism": "update", "noise_multiplier": 1.0, "clip": 1.0,
                     "delta": 1e-6, "relation": "replace-one", "sensitivity": 2.0,
                     "events": [[1.0, 1.0, 1]],
                     "epsilon": epsilon([(1.0, 1.0, 1)], 1e-6),
                     "epsilon_total": epsilon([(1.0, 1.0, 3)], 1e-6),
                     "withheld": ["metrics_global", "metrics_local", "train_stats",
                                  "progress_loss"]}
    assert json.loads(json.dumps(reply)) == reply  # plain data for the wire


def test_the_budget_is_checked_again_on_what_a_round_really_spent(node):
    """PrivacyBudget.overspent: the node's last check before an update leaves it."""
    from fedcore.governance import PrivacyBudget

    one, two = epsilon([(1.0, 1.0, 1)], 1e-5), epsilon([(1.0, 1.0, 2)], 1e-5)
    node.set_policy(dp_max_epsilon=(one + two) / 2, dp_delta=1e-5)
    (budget,) = [p for p in node.governance.policies if isinstance(p, PrivacyBudget)]
    (entry,) = node.datasets.list()
    assert budget.overspent(entry, [(1.0, 1.0, 1)]) is None
    reason = budget.overspent(entry, [(1.0, 1.0, 2)])
    assert reason and "withheld" in reason and f"epsilon total {two:.4g}" in reason
    node.set_policy(dp_max_epsilon={"other": 0.1})
    (budget,) = [p for p in node.governance.policies if isinstance(p, PrivacyBudget)]
    assert budget.overspent(entry, [(1.0, 1.0, 50)]) is None  # no cap on this dataset


def test_the_noise_floor_raises_or_refuses_and_the_budget_prices_the_raised_noise(node):
    sgd = {"mechanism": "dp-sgd", "clip": 1.0, "noise_multiplier": 0.3}
    node.set_policy(dp_min_noise_multiplier=2.0)
    decision = node.review(_request(node, sgd, training_args={"batch_size": 150}))
    assert decision.allowed and decision.privacy == {**sgd, "noise_multiplier": 2.0,
                                                     "delta": 1e-5}
    assert "raised to this node's minimum 2" in decision.reason
    assert node.review(_request(node, {**sgd, "noise_multiplier": 2.5})).privacy == {}
    # With a budget, the round is priced at the raised noise: 150 samples, one step, rate 1.
    at_floor, asked = epsilon([(2.0, 1.0, 1)], 1e-5), epsilon([(0.3, 1.0, 1)], 1e-5)
    node.set_policy(dp_max_epsilon=(at_floor + asked) / 2)
    assert node.review(_request(node, sgd, training_args={"batch_size": 150},
                                test_ratio=0.25)).allowed
    node.set_policy(on_excess="refuse")
    decision = node.review(_request(node, sgd))
    assert not decision.allowed and "policy dp_min_noise_multiplier" in decision.reason
    with pytest.raises(ConfigurationError, match="dp_min_noise_multiplier must be a number > 0"):
        node.set_policy(dp_min_noise_multiplier=0)
