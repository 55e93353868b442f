"""DP-SGD is applied and charged by the node, whatever the shipped plan does (issue 14, 4).

A trusted researcher (key "alice", writing "bob" in its envelopes) sends correctly signed
training requests for plans an administrator approved: a plan that trains without the DP
optimizer and reports nothing, one that reports fake low spending, one that writes records
into the weights, one that is not the node's torch plan at all. Each is refused with the
reason, or trained with the node's own DP-SGD and charged the node's own figure; every
refusal is audited and the node keeps serving (the attacker pings it on exit).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("websockets")
pytest.importorskip("dp_accounting")
torch = pytest.importorskip("torch")
pytest.importorskip("opacus")

from fedcore.params import ParameterSet  # noqa: E402
from fedcore.plan import PlanBundle, TrainingPlan  # noqa: E402
from fedcore.privacy import Accountant  # noqa: E402
from fedcore.wire.identity import Identity, full_fingerprint  # noqa: E402
from fedcore.wire.messages import ErrorReply, TrainReply, TrainRequest  # noqa: E402
from fedcore_torch import TorchTrainingPlan  # noqa: E402
from tests._support.attack import Attacker, serve  # noqa: E402
from tests._support.torch_plans import TinyMLP  # noqa: E402

DPSGD = {"mechanism": "dp-sgd", "noise_multiplier": 1.0, "clip": 1.0, "delta": 1e-5}
ARGS = {"epochs": 1, "batch_size": 16, "lr": 1.0, "use_gpu": False}
N = 64  # records: Poisson rate 1 / ceil(64 / 16) = 0.25, 4 steps an epoch
CHARGED = (1.0, 0.25, 4)  # what the node charges a round: its noise, its rate, its steps


# --- the researcher's plans ----------------------------------------------------------------


class ShippedTinyMLP(TinyMLP):
    """TinyMLP lives in another local module: the plans below ship it with them."""

    helper_modules = ("tests._support.torch_plans",)


class SkipsDP(ShippedTinyMLP):
    """Trains with the plain loop whatever the request asks, and reports nothing spent."""

    privacy_events: list = []

    def fit(self, dataset, seed):
        self.privacy_events = []
        return TorchTrainingPlan.fit(self, dataset, seed)


class LiesAboutSpending(ShippedTinyMLP):
    """A loss with zero gradient (the update is the node's noise alone); fake low spending."""

    privacy_events = [(1000.0, 1e-6, 1)]

    def training_step(self, data, target):
        self.privacy_events = [(1000.0, 1e-6, 1)]
        return (self.model(data) * 0.0).sum()


class WritesARecord(ShippedTinyMLP):
    """Copies a training record into the first layer's weights, around the optimizer."""

    def training_step(self, data, target):
        with torch.no_grad():
            next(iter(self.model.parameters()))[0, :4] = data[0]
        return torch.nn.functional.cross_entropy(self.model(data), target)


class OwnOptimizer(ShippedTinyMLP):
    """An optimizer of the plan's own, whose step the node cannot vouch for."""

    def init_optimizer(self):
        class Sgd(torch.optim.SGD):
            pass

        return Sgd(self.model.parameters(), lr=0.1)


class CopiesRecords(ShippedTinyMLP):
    """Trains on every record twice (a record would weigh double in each step)."""

    def training_data(self, dataset):
        X, y = super().training_data(dataset)
        return np.concatenate([X, X]), np.concatenate([y, y])


class Impostor(TrainingPlan):
    """Calls itself a torch plan, without TorchTrainingPlan's loop."""

    backend = "torch"

    def build(self, seed):
        self.w = np.zeros(3)

    def get_parameters(self):
        return ParameterSet({"w": self.w})

    def set_parameters(self, params):
        self.w = np.array(params["w"])

    def fit(self, dataset, seed):
        return {}

    def predict(self, dataset):
        return np.zeros(1), np.zeros(1)


# --- the scene ---------------------------------------------------------------------------


@pytest.fixture
def site(tmp_path):
    alice = tmp_path / "alice.key"
    url, node = serve(tmp_path / "site", "site", trusted={"alice": alice})
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, 4)).astype(np.float32)
    entry = node.datasets.add_arrays("cohort", ["cohort"], X, (X[:, 0] > 0).astype(np.int64))
    # The first round starts the plan worker (torch and Opacus imported): slow on a busy CI.
    with Attacker(url, {"site": node.identity.public_bytes}, key=alice,
                  timeout=120) as attacker:
        yield node, attacker, entry["id"], full_fingerprint(Identity(alice).public_bytes)
    node.stop()


def _approved(node, plan_class) -> dict:
    wire = PlanBundle.from_class(plan_class).to_wire()
    node.plans.submit(PlanBundle.from_wire(wire))
    node.plans.approve(wire["sha256"])
    return wire


def _initial() -> ParameterSet:
    plan = TinyMLP({}, {"use_gpu": False})
    plan.build(seed=0)
    return plan.get_parameters().copy()


def _train(attacker, node, plan_class, dataset, privacy=DPSGD, round=1):
    body = TrainRequest(plan=_approved(node, plan_class), params=_initial(),
                        dataset_id=dataset, training_args=ARGS, privacy=dict(privacy),
                        test_ratio=0.0, seed=7, evaluate_global=False, evaluate_local=False)
    return attacker.ask("site", body, sender="bob", round=round).body


def _spent(node, dataset) -> list:
    return [list(e) for e in node.ledger.events(dataset)]


def _refusals(node, event="train-refused") -> list[dict]:
    return [r for r in node.audit_log() if r["event"] == event]


# --- the attacks -------------------------------------------------------------------------


def test_a_plan_that_trains_without_the_dp_optimizer_is_refused_dp_sgd(site):
    node, attacker, dataset, alice = site
    node.set_policy(dp_required=True)
    reply = _train(attacker, node, SkipsDP, dataset)
    assert isinstance(reply, ErrorReply) and reply.kind == "governance"
    assert "overrides `fit`" in reply.message and "update-level DP" in reply.message
    (refused,) = _refusals(node)
    assert "overrides `fit`" in refused["reason"] and refused["researcher_key"] == alice
    assert refused["researcher"] == "alice"  # the trusted name, not the "bob" it wrote
    assert _spent(node, dataset) == [] and not _refusals(node, "trained")
    # The same plan under update-level DP: the node noises whatever the loop produced.
    honest = _train(attacker, node, SkipsDP, dataset,
                    privacy={**DPSGD, "mechanism": "update"})
    assert isinstance(honest, TrainReply) and honest.privacy["events"] == [[1.0, 1.0, 1]]
    assert _spent(node, dataset) == [[1.0, 1.0, 1]]


def test_fake_low_spending_is_ignored_and_the_node_charges_what_it_applied(site):
    """The plan reports epsilon ~0; the node adds the noise itself and charges its figure.

    The plan's loss has a zero gradient, so without DP its update would be exactly zero:
    what comes back is the node's noise, of the standard deviation the enforced parameters
    give (lr * z * clip / expected batch * sqrt(steps) = 1 * 1 * 1 / 16 * 2 = 0.125).
    """
    node, attacker, dataset, _ = site
    node.set_policy(dp_max_epsilon=50.0, dp_delta=1e-5)
    start = _initial()
    updates = []
    for r in (1, 2):
        reply = _train(attacker, node, LiesAboutSpending, dataset, round=r)
        assert isinstance(reply, TrainReply), reply
        assert reply.privacy["events"] == [list(CHARGED)]
        assert reply.privacy["epsilon"] == pytest.approx(Accountant([CHARGED]).epsilon(1e-5))
        assert reply.privacy["epsilon_total"] == pytest.approx(
            Accountant([CHARGED] * r).epsilon(1e-5))
        assert _spent(node, dataset) == [[1.0, 0.25, 4 * r]]  # rises by the node's figure
        updates.append(np.concatenate([(reply.params[k] - start[k]).ravel()
                                       for k in start]))
    # Both rounds' noise together (116 draws; one round's 58 put the sample std outside
    # these bounds about once in 200 runs): within ~4 standard errors of 0.125.
    assert 0.09 < np.concatenate(updates).std() < 0.16
    # The same signed request twice: different noise (the seed is not the researcher's).
    assert not np.allclose(updates[0], updates[1])
    # The plan's own loop, with no DP, would have sent the global model back unchanged.
    plain = LiesAboutSpending({}, ARGS)
    plain.build(seed=0)
    plain.fit(node.datasets.open(node.datasets.get(dataset)), seed=7)
    assert all(np.array_equal(plain.get_parameters()[k], start[k]) for k in start)


@pytest.mark.parametrize("plan_class,reason", [
    (WritesARecord, "outside the DP optimizer's step"),
    (OwnOptimizer, "torch.optim's optimizers"),
    (CopiesRecords, "returned 128 examples for 64 records"),
])
def test_a_plan_that_works_around_the_noise_gets_no_update_and_is_not_charged(
        site, plan_class, reason):
    node, attacker, dataset, alice = site
    node.set_policy(dp_max_epsilon=50.0)
    reply = _train(attacker, node, plan_class, dataset)
    assert isinstance(reply, ErrorReply) and reason in reply.message
    (failed,) = _refusals(node, "train-failed")
    assert reason in failed["error"] and failed["researcher_key"] == alice
    assert failed["researcher"] == "alice"
    assert _spent(node, dataset) == [] and not _refusals(node, "trained")


def test_a_plan_that_is_not_the_nodes_torch_plan_is_refused_dp_sgd(site):
    node, attacker, dataset, _ = site
    reply = _train(attacker, node, Impostor, dataset)
    assert isinstance(reply, ErrorReply) and reply.kind == "governance"
    assert "does not subclass TorchTrainingPlan" in reply.message
    (refused,) = _refusals(node)
    assert refused["researcher"] == "alice" and _spent(node, dataset) == []
    # An honest plan on the same node trains with DP-SGD and is charged.
    assert isinstance(_train(attacker, node, TinyMLP, dataset), TrainReply)
    assert _spent(node, dataset) == [list(CHARGED)]


@pytest.mark.parametrize("on_excess", ["clamp", "refuse"])
def test_noise_below_the_nodes_floor_is_raised_to_it_or_refused(site, on_excess):
    """A request for DP in name only (noise 0.01) on a node with dp_min_noise_multiplier."""
    node, attacker, dataset, _ = site
    node.set_policy(dp_min_noise_multiplier=1.0, on_excess=on_excess)
    reply = _train(attacker, node, TinyMLP, dataset, privacy={**DPSGD, "noise_multiplier": 0.01})
    (decision,) = [r for r in node.audit_log() if r["event"] == "decision"]
    assert decision["researcher"] == "alice"
    if on_excess == "refuse":
        assert isinstance(reply, ErrorReply) and reply.kind == "governance"
        assert "below this node's minimum of 1" in reply.message
        assert not decision["allowed"] and _spent(node, dataset) == []
        return
    assert isinstance(reply, TrainReply), reply
    assert reply.privacy["noise_multiplier"] == 1.0 and reply.privacy["events"] == [
        list(CHARGED)]  # trained, and charged, with the node's noise
    assert any("raised to this node's minimum 1" in n for n in reply.policy_notes)
    assert decision["privacy"]["noise_multiplier"] == 1.0
    assert _spent(node, dataset) == [list(CHARGED)]
