"""The noise is calibrated to the stated sensitivity, and the epsilon reported is true.

Update-level and central DP use the replace-one relation (a dataset's, or one node's, whole
contribution replaced by any other). Each test builds two neighbouring inputs at the
largest distance the relation allows, measures the noise the mechanism really adds with a
fixed generator, and checks that noise over distance is the noise multiplier the
accountant is given; then it cross-checks the epsilon reported against dp-accounting's
accountants (RDP, and PLD where it applies) for the same mechanism, described in
dp-accounting's own terms.
"""

from __future__ import annotations

import numpy as np
import pytest

dp_accounting = pytest.importorskip("dp_accounting")

from fedcore.params import ParameterSet  # noqa: E402
from fedcore.privacy import DEFAULT_ORDERS, CentralDP, PrivacySpec, UpdateDP  # noqa: E402
from fedcore.privacy.accountant import Accountant  # noqa: E402

REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE
SETTINGS = [(0.8, 1, 1e-5), (0.8, 10, 1e-3), (1.1, 10, 1e-5), (2.0, 1, 1e-3), (5.0, 1, 1e-3),
            (5.0, 10, 1e-5)]  # noise multiplier, rounds, delta


def _distance(a, b) -> float:
    return float(np.sqrt(sum(np.sum((np.asarray(a[k], np.float64) - b[k]) ** 2) for k in a)))


def _rdp(event, count: int, delta: float, relation=None) -> float:
    kwargs = {} if relation is None else {"neighboring_relation": relation}
    accountant = dp_accounting.rdp.RdpAccountant(orders=list(DEFAULT_ORDERS), **kwargs)
    accountant.compose(event, count)
    return accountant.get_epsilon(delta)


def _pld(event, count: int, delta: float) -> float:
    accountant = dp_accounting.pld.PLDAccountant(REPLACE_ONE)
    accountant.compose(event, count)
    return accountant.get_epsilon(delta)


def test_update_dp_noise_over_the_neighbours_distance_is_the_noise_multiplier():
    """Two datasets whose updates point opposite ways: once clipped they lie 2 * clip
    apart, the largest distance replace-one allows. The released updates' noise, measured
    over many draws of a fixed generator, has std noise_multiplier x that distance."""
    clip, z, draws = 0.5, 1.3, 4000
    glob = ParameterSet({"w": np.zeros(8), "n": np.array(0)})
    direction = np.arange(1.0, 9.0) / np.linalg.norm(np.arange(1.0, 9.0))
    d1 = ParameterSet({"w": 7 * direction, "n": np.array(5)})    # norm 7: clipped to 0.5
    d2 = ParameterSet({"w": -3 * direction, "n": np.array(9)})   # norm 3: clipped to 0.5
    dp = UpdateDP(clip=clip, noise_multiplier=z)
    rng = np.random.default_rng(0)
    out1 = np.array([dp.apply(glob, d1, rng)[0]["w"] for _ in range(draws)])
    out2 = np.array([dp.apply(glob, d2, rng)[0]["w"] for _ in range(draws)])
    distance = np.linalg.norm(out1.mean(0) - out2.mean(0))
    assert distance == pytest.approx(2 * clip, rel=0.05)     # the replace-one sensitivity
    noise = np.concatenate([out1 - out1.mean(0), out2 - out2.mean(0)]).std()
    assert noise == pytest.approx(z * 2 * clip, rel=0.03)    # what the node adds
    assert noise / distance == pytest.approx(z, rel=0.06)    # what the accountant is told
    assert dp.event() == (z, 1.0, 1) and dp.sensitivity == 2 * clip == dp.sigma / z
    assert int(dp.apply(glob, d1, rng)[0]["n"]) == 0          # counters: the global value


@pytest.mark.parametrize("z, rounds, delta", SETTINGS)
def test_update_dp_epsilon_agrees_with_dp_accounting(z, rounds, delta):
    """What a node reports after ``rounds`` update-level rounds, against dp-accounting:
    RDP of the Gaussian with noise multiplier sigma / sensitivity (equal, same orders), and
    PLD of the same mechanism in dp-accounting's replace-one terms (records, here the whole
    clipped update, of norm <= clip, noise std sigma = z * 2 * clip: GaussianDpEvent(sigma /
    clip) under REPLACE_ONE). PLD is tight: the RDP figure may lie a little above it, never
    below."""
    spec = PrivacySpec.parse({"mechanism": "update", "clip": 0.7, "noise_multiplier": z,
                              "delta": delta})
    reported = spec.reply([(z, 1.0, 1)], [(z, 1.0, 1)] * rounds)["epsilon_total"]
    sigma, clip = spec.sigma, spec.clip
    rdp = _rdp(dp_accounting.GaussianDpEvent(sigma / spec.sensitivity), rounds, delta)
    assert reported == pytest.approx(rdp, rel=1e-6)
    pld = _pld(dp_accounting.GaussianDpEvent(sigma / clip), rounds, delta)
    assert pld <= reported <= 1.25 * pld, (reported, pld)  # RDP: 6 % to 17 % above


def test_central_dp_noise_over_the_neighbours_distance_is_the_noise_multiplier():
    """Two federations of four nodes that differ in one node's data (replace-one), that
    node's update pointing opposite ways: the clipped means lie 2 * clip / 4 apart, and the
    noise on the released mean has std noise_multiplier x that distance."""
    clip, z, n, dim = 1.0, 0.9, 4, 50_000
    glob = ParameterSet({"w": np.zeros(dim), "steps": np.array(3)})
    unit = np.ones(dim) / np.sqrt(dim)
    others = [ParameterSet({"w": s * unit, "steps": np.array(9)}) for s in (0.2, 0.5, 3.0)]
    means = []
    for sign, seed in ((1, 1), (-1, 2)):
        agg = CentralDP(clip=clip, noise_multiplier=z, seed=seed)
        agg.start(glob, 1)
        for i, update in enumerate([*others, ParameterSet({"w": sign * 5 * unit,
                                                           "steps": np.array(9)})]):
            agg.add(update, 1.0, f"node-{i}")
        released = agg.result()
        exact = (0.2 + 0.5 + 1.0 + sign * 1.0) / n * unit  # the clipped updates' mean
        means.append(exact)
        noise = released["w"] - exact
        assert noise.std() == pytest.approx(z * 2 * clip / n, rel=0.02)
        assert int(released["steps"]) == 3  # integers: the global value, not the nodes'
        report = agg.privacy_report()
        assert report["sensitivity"] == 2 * clip / n and report["relation"] == "replace-one"
        assert report["sigma"] / report["sensitivity"] == pytest.approx(z)
    assert _distance({"w": means[0]}, {"w": means[1]}) == pytest.approx(2 * clip / n)


@pytest.mark.parametrize("z, sample_rate", [(0.8, 1.0), (1.1, 1.0), (1.0, 0.5), (2.0, 0.2)])
def test_central_dp_epsilon_agrees_with_dp_accounting(z, sample_rate):
    """Five rounds of central DP against dp-accounting's RDP accountant for the same
    mechanism: a Gaussian with noise multiplier sigma / sensitivity on a fixed-size subset
    of the nodes drawn without replacement (the Fraction strategy), replace-one relation."""
    glob = ParameterSet({"w": np.zeros(3)})
    agg = CentralDP(clip=1.0, noise_multiplier=z, sample_rate=sample_rate, seed=0)
    for rnd in range(1, 6):
        agg.start(glob, rnd)
        agg.add(ParameterSet({"w": np.ones(3)}), 1.0, "a")
        agg.add(ParameterSet({"w": -np.ones(3)}), 1.0, "b")
        agg.result()
    report = agg.privacy_report()
    event = dp_accounting.GaussianDpEvent(report["sigma"] / report["sensitivity"])
    if sample_rate < 1:
        event = dp_accounting.SampledWithoutReplacementDpEvent(10, round(10 * sample_rate),
                                                               event)
    reference = _rdp(event, 5, 1e-5, REPLACE_ONE)
    assert agg.epsilon == pytest.approx(reference, rel=1e-6)
    if sample_rate == 1:
        pld = _pld(dp_accounting.GaussianDpEvent(z * 2), 5, 1e-5)
        assert pld <= agg.epsilon <= 1.25 * pld
    # the accountant keeps its sampling through a checkpoint
    again = CentralDP(clip=1.0, noise_multiplier=z, sample_rate=sample_rate)
    again.load_state_dict(agg.state_dict())
    assert again.epsilon == agg.epsilon
    assert Accountant.from_state(agg.state_dict()["accountant"]).sampling == (
        "without-replacement")
