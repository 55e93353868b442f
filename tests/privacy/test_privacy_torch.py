"""Opacus: its accountant against fedcore's, and DP-SGD on a tiny torch model."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

pytest.importorskip("dp_accounting")
torch = pytest.importorskip("torch")
pytest.importorskip("opacus")

from opacus.accountants import RDPAccountant  # noqa: E402
from opacus.accountants.analysis.rdp import compute_rdp  # noqa: E402

from fedcore.errors import ConfigurationError  # noqa: E402
from fedcore.privacy import DEFAULT_ORDERS, Accountant, PrivacySpec, epsilon  # noqa: E402
from fedcore.privacy.accountant import _rdp  # noqa: E402
from fedcore_torch.privacy import DPSGD  # noqa: E402

GRID = list(itertools.product([0.8, 1.0, 1.1, 2.0, 5.0], [0.004, 0.02, 0.1, 1.0],
                              [1, 50, 2000], [1e-5, 1e-3]))


def _opacus(z: float, q: float, steps: int, delta: float) -> tuple[float, float]:
    acc = RDPAccountant()
    acc.history = [(z, q, steps)]
    with warnings.catch_warnings():  # "optimal order is the largest alpha"
        warnings.simplefilter("ignore")
        eps, order = acc.get_privacy_spent(delta=delta)
    return float(eps), float(order)


def test_fedcore_uses_opacus_orders():
    assert list(DEFAULT_ORDERS) == [float(a) for a in RDPAccountant.DEFAULT_ALPHAS]


def test_epsilon_matches_opacus_wherever_the_two_libraries_agree_on_the_rdp():
    """fedcore's accountant is dp-accounting's; Opacus differs from it in two places.

    At fractional orders dp-accounting (>= 0.4.4) bounds the Renyi divergence by a series
    of absolute values where Opacus sums the signed series: never smaller, so fedcore's
    epsilon is then at least Opacus's. And dp-accounting returns 0 when delta alone
    already covers the divergence. Wherever both compute the same RDP at Opacus's best
    order, the epsilons agree to 1e-6; that is most of the grid, all of sample rate 1.
    """
    agreed = 0
    for z, q, steps, delta in GRID:
        ours = epsilon([(z, q, steps)], delta)
        theirs, order = _opacus(z, q, steps, delta)
        rdp_opacus = float(compute_rdp(q=q, noise_multiplier=z, steps=1, orders=[order])[0])
        rdp_ours = _rdp(z, q, DEFAULT_ORDERS)[DEFAULT_ORDERS.index(order)]
        if ours > 0 and abs(rdp_opacus - rdp_ours) <= 1e-9 * rdp_opacus:
            assert abs(ours - theirs) <= 1e-6, (z, q, steps, delta, ours, theirs)
            agreed += 1
        elif ours > 0:
            assert ours >= theirs - 1e-9, (z, q, steps, delta, ours, theirs)
        else:  # dp-accounting's KL shortcut: delta covers the whole divergence
            assert theirs < 0.05, (z, q, steps, delta, theirs)
    assert agreed >= len(GRID) // 2
    assert all(abs(epsilon([(z, 1.0, s)], d) - _opacus(z, 1.0, s, d)[0]) <= 1e-6
               for z, _, s, d in GRID)


def _exact_rdp(q: float, sigma: float, order: float) -> float:
    """The subsampled Gaussian's Renyi divergence by numerical integration (mpmath, 40 digits).

    ``log E_{z ~ N(0, s^2)} [(1 - q + q exp((2z - 1) / 2s^2)) ^ order] / (order - 1)``.
    """
    import mpmath

    with mpmath.workdps(40):
        def f(z):
            return mpmath.npdf(z, 0, sigma) * (
                1 - q + q * mpmath.exp((2 * z - 1) / (2 * sigma * sigma))) ** order

        a = mpmath.quad(f, [-mpmath.inf, -20, 0, 0.5, 5, 20, 60, mpmath.inf])
        return float(mpmath.log(a) / (order - 1))


@pytest.mark.parametrize("z,q,order", [(0.8, 0.1, 1.5), (1.0, 0.1, 1.7), (0.8, 0.02, 2.6),
                                       (1.1, 0.1, 1.8), (2.0, 0.1, 2.4)])
def test_where_the_libraries_differ_opacus_is_exact_and_fedcore_never_below(z, q, order):
    """Which of the two is right where they disagree: the integral itself decides.

    Opacus's signed series is the exact divergence (to 1e-9 relative); dp-accounting's series
    of absolute values, hence fedcore's, is an upper bound (or no bound at all at that order:
    ``inf``, the order is skipped): fedcore's epsilon is never below the true one.
    """
    exact = _exact_rdp(q, z, order)
    theirs = float(compute_rdp(q=q, noise_multiplier=z, steps=1, orders=[order])[0])
    ours = _rdp(z, q, DEFAULT_ORDERS)[DEFAULT_ORDERS.index(order)]
    assert abs(theirs - exact) <= 1e-9 * exact, (theirs, exact)
    assert ours >= exact * (1 - 1e-12), (ours, exact)
    assert ours > exact * (1 + 1e-6)  # the gap this test documents


def test_the_gap_to_opacus_is_small_wherever_epsilon_is_of_practical_size():
    """Below epsilon 10 fedcore's epsilon is within 0.5 % of Opacus's over the whole grid."""
    gaps = []
    for z, q, steps, delta in GRID:
        theirs, _ = _opacus(z, q, steps, delta)
        ours = epsilon([(z, q, steps)], delta)
        if 0.1 < theirs < 10:
            gaps.append((ours - theirs) / theirs)
    assert len(gaps) >= 60
    assert all(-1e-6 <= g <= 0.005 for g in gaps), max(gaps)


# --- DP-SGD on a tiny model -----------------------------------------------------------------


def _data(n: int = 64):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 4)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    return X, y


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def _loss(model, X, y) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(torch.as_tensor(X)),
                                                       torch.as_tensor(y)))


def _train(dp: DPSGD, model, X, y, *, epochs: int, batch_size: int, lr: float = 0.5,
           on_step=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    private, optimizer, loader = dp.make_private(model, optimizer, (X, y), batch_size)
    if on_step is not None:  # look at what Opacus computed, then let it account the step
        accountant_hook = optimizer.step_hook
        optimizer.step_hook = lambda opt: (on_step(opt), accountant_hook(opt))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note about full backward hooks
        for _ in range(epochs):
            for xb, yb in loader:
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(private(xb), yb).backward()
                optimizer.step()
    return dp.release()


def test_dp_sgd_trains_clips_and_costs_what_was_predicted():
    X, y = _data()
    model = _model()
    before = _loss(model, X, y)
    clip = 0.5
    bounds = []

    def on_step(opt):  # the clipped per-sample gradients Opacus summed for this batch
        batch = len(opt.grad_samples[0])
        summed = torch.sqrt(sum((p.summed_grad ** 2).sum() for p in opt.params))
        bounds.append(float(summed) <= batch * clip * (1 + 1e-4))

    dp = DPSGD(noise_multiplier=1.0, clip=clip, delta=1e-5, seed=0)
    trained = _train(dp, model, X, y, epochs=2, batch_size=8, on_step=on_step)
    assert trained is model and _loss(model, X, y) < before  # it learned
    assert bounds and all(bounds)
    clipping = dp.clipping()
    assert clipping["max_norm"] > clip and 0 < clipping["clipped_fraction"] <= 1
    # the cost Opacus recorded is the one a node predicts before the round
    spec = PrivacySpec.parse({"mechanism": "dp-sgd", "noise_multiplier": 1.0, "clip": clip})
    predicted = spec.events(n_train=len(X), training_args={"epochs": 2, "batch_size": 8})
    assert dp.events() == predicted == [(1.0, 0.125, 16)]
    assert dp.sample_rate == 0.125 and dp.steps == 16
    assert abs(dp.epsilon() - Accountant(predicted).epsilon(1e-5)) <= 1e-6
    assert abs(dp.epsilon() - dp.opacus_epsilon()) <= 1e-6
    report = dp.report()
    assert report["events"] == [[1.0, 0.125, 16]] and report["epsilon"] == dp.epsilon()
    assert "max_norm" not in report  # data-dependent figures stay on the node


def test_the_released_model_is_plain_again_and_trains_another_round():
    X, y = _data()
    model = _model()
    _train(DPSGD(1.0, 1.0, seed=1), model, X, y, epochs=1, batch_size=16)
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    second = DPSGD(1.0, 1.0, seed=2)
    _train(second, model, X, y, epochs=1, batch_size=16)  # a warm plan's next round
    assert second.events() == [(1.0, 0.25, 4)]


def test_dp_sgd_refuses_models_and_settings_it_cannot_protect():
    with pytest.raises(ConfigurationError, match="ModuleValidator.fix"):
        bn = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        DPSGD(1.0, 1.0).make_private(bn, torch.optim.SGD(bn.parameters(), lr=0.1), _data(),
                                     batch_size=8)
    with pytest.raises(ConfigurationError, match="noise_multiplier'\\] must be a number > 0"):
        DPSGD(noise_multiplier=-1.0, clip=1.0)
    with pytest.raises(ConfigurationError, match="DPSGD runs the 'dp-sgd' mechanism"):
        DPSGD.from_spec({"mechanism": "update", "clip": 1.0, "noise_multiplier": 1.0})


def test_the_nodes_dp_sgd_counts_every_noised_step_empty_poisson_batches_included():
    """TorchPrivateTraining: 3 records in batches of 1 (rate 1/3), 5 epochs of 3 steps.

    About a third of Poisson batches are empty; each still takes a noised step, and the
    round is charged the 15 steps the node predicts from its own data size.
    """
    from fedcore.data import ArrayDataset
    from fedcore.plan import LocalTraining
    from fedcore_torch.privacy import TorchPrivateTraining
    from tests._support.torch_plans import TinyMLP

    X, y = _data(3)
    plan = TinyMLP({}, {"use_gpu": False})
    plan.build(seed=0)
    before = plan.get_parameters().copy()
    spec = PrivacySpec.parse({"mechanism": "dp-sgd", "noise_multiplier": 1.0, "clip": 1.0})
    training = LocalTraining.common({"epochs": 5, "batch_size": 1})
    dp = TorchPrivateTraining(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = dp.train(plan, ArrayDataset(X, y), 0, training)
    assert stats["steps"] == dp.steps == 15
    assert dp.events() == spec.events(n_train=3, training_args=training) == [(1.0, 1 / 3, 15)]
    after = dp.parameters(plan)
    assert all(not np.array_equal(after[k], before[k]) for k in before)  # noise everywhere
    assert not any(hasattr(p, "grad_sample") for p in plan.model.parameters())
