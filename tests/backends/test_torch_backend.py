from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from fedcore import Experiment, simulate  # noqa: E402
from fedcore.data import ArrayDataset  # noqa: E402
from fedcore.params import ParameterSet  # noqa: E402
from fedcore.wire import codec  # noqa: E402
from fedcore.wire.messages import Envelope, TrainReply  # noqa: E402
from fedcore_torch import TorchTrainingPlan, convert  # noqa: E402


class DigitsPlan(TorchTrainingPlan):
    def init_model(self):
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, 10))

    def training_step(self, data, target):
        return F.cross_entropy(self.model(data), target)


class FragilePlan(DigitsPlan):
    """Fails on a node whose scans hold negative intensities (a corrupt export)."""

    def training_step(self, data, target):
        if bool((data < 0).any()):
            raise ValueError("negative pixel intensity in this site's scans")
        return super().training_step(data, target)


class AsyncLoadingPlan(DigitsPlan):
    """Fetches something with asyncio inside training, as some data libraries do."""

    def training_step(self, data, target):
        scale = asyncio.run(self._scale())
        return F.cross_entropy(self.model(data * scale), target)

    async def _scale(self):
        await asyncio.sleep(0)
        return 1.0


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # Small models on two shared cores: intra-op threads only contend (10x slower when
    # another process is busy), so every timing-sensitive test here uses one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return train_test_split(X / 16.0, y, test_size=0.2, random_state=0, stratify=y)


def _accuracy(model, X, y):
    model.eval()
    with torch.no_grad():
        return float((model(torch.as_tensor(X, dtype=torch.float32)).argmax(1).numpy()
                      == y).mean())


def test_federated_torch_mlp_matches_a_centralized_one(digits):
    Xtr, Xte, ytr, yte = digits
    rounds, epochs, batch, lr = 40, 2, 32, 0.2
    training_args = {"epochs": epochs, "batch_size": batch, "lr": lr}
    with simulate.from_arrays(Xtr, ytr, n_nodes=5, tags=["digits"]) as fed:
        exp = Experiment(DigitsPlan, tags=["digits"], federation=fed.url, progress=False,
                         training_args=training_args, round_limit=rounds, test_ratio=0.0,
                         evaluate_global=False, evaluate_local=False)
        exp.run()
        federated = _accuracy(exp.trained_plan().model, Xte, yte)
    h = exp.history
    assert len(h) == rounds * 5 and set(h["status"]) == {"ok"}
    assert h.groupby("round")["n_samples"].sum().tolist() == [len(Xtr)] * rounds

    # Centralized: the same model, initial weights, optimizer and batch size, trained on the
    # pooled data for as many epochs as each node trained in all (rounds x local epochs).
    torch.manual_seed(0)
    model = DigitsPlan().init_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    X = torch.as_tensor(Xtr, dtype=torch.float32)
    y = torch.as_tensor(ytr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(rounds * epochs):
        order = torch.randperm(len(X), generator=generator)
        for start in range(0, len(X), batch):
            idx = order[start:start + batch]
            optimizer.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            optimizer.step()
    centralized = _accuracy(model, Xte, yte)

    assert centralized > 0.95
    assert abs(federated - centralized) <= 0.02, (federated, centralized)


def test_get_parameters_shares_memory_with_the_model():
    plan = DigitsPlan()
    plan.build(seed=0)
    params = plan.get_parameters()
    state = plan.model.state_dict()
    assert list(params) == list(state)
    for name, tensor in state.items():
        assert np.shares_memory(params[name], tensor.numpy()), name
    with torch.no_grad():
        plan.model[0].bias += 1.0  # training in place shows through without a new call
    assert np.array_equal(params["0.bias"], plan.model[0].bias.detach().numpy())


def test_set_parameters_takes_read_only_arrays_from_a_frame_and_never_writes_them():
    sender = DigitsPlan()
    sender.build(seed=1)
    frame = codec.encode(Envelope(TrainReply(params=sender.get_parameters(), n_samples=1)))
    received = codec.decode(frame).body.params
    assert not any(a.flags.writeable for a in received.values())
    as_sent = received.copy()

    plan = DigitsPlan({}, {"epochs": 1, "lr": 0.5})
    plan.build(seed=2)
    plan.set_parameters(received)
    assert plan.get_parameters().equal(received)
    rng = np.random.default_rng(0)
    plan.fit(ArrayDataset(rng.random((64, 64)), rng.integers(0, 10, 64)), seed=0)
    assert not plan.get_parameters().equal(as_sent)  # the model trained...
    assert received.equal(as_sent)  # ...and the frame it came from is untouched
    assert not any(np.shares_memory(received[k], t.numpy())
                   for k, t in plan.model.state_dict().items())


def test_set_parameters_from_a_frame_warns_nothing():
    # torch warns about read-only arrays once per process, so only a fresh one can tell.
    script = textwrap.dedent("""
        import warnings
        import torch
        from fedcore.wire import codec
        from fedcore.wire.messages import Envelope, TrainReply
        from fedcore_torch import convert

        model = torch.nn.Linear(4, 3)
        frame = codec.encode(Envelope(TrainReply(params=convert.get_parameters(model),
                                                 n_samples=1)))
        received = codec.decode(frame).body.params
        other = torch.nn.Linear(4, 3)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            convert.set_parameters(other, received)
        assert torch.equal(other.weight, model.weight) and torch.equal(other.bias, model.bias)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.fixture
def gpu_visible(monkeypatch):
    """A machine where CUDA looks available (the real one, or a CPU one pretending)."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_a_node_that_forbids_the_gpu_gets_a_cpu_model(gpu_visible):
    plan = DigitsPlan({}, {"use_gpu": True})
    plan.node_settings = {"allow_gpu": False}
    plan.build(seed=0)
    assert plan.device() == "cpu"
    assert {p.device.type for p in plan.model.parameters()} == {"cpu"}


def test_a_plan_that_declines_the_gpu_gets_a_cpu_model(gpu_visible):
    plan = DigitsPlan({}, {"use_gpu": False})
    plan.build(seed=0)
    assert plan.device() == "cpu"
    assert {p.device.type for p in plan.model.parameters()} == {"cpu"}


def test_history_reports_the_device_each_node_trained_on(tmp_path, digits):
    Xtr, _, ytr, _ = digits
    fed = simulate.SimulatedFederation(root=tmp_path)
    # node-01's administrator switched the GPU off in its config; node-02 kept the default.
    (tmp_path / "node-01").mkdir()
    (tmp_path / "node-01" / "config.toml").write_text(
        'node_id = "node-01"\nname = "node-01"\nallow_gpu = false\n')
    with fed:
        for i, node_id in enumerate(["node-01", "node-02"]):
            fed.add_node(node_id).datasets.add_arrays(f"part{i}", ["digits"], Xtr[i::2],
                                                      ytr[i::2])
        exp = Experiment(DigitsPlan, tags=["digits"], federation=fed.url, progress=False,
                         training_args={"epochs": 1})
        rows = exp.run_once().set_index("node")
    assert set(rows["status"]) == {"ok"}
    assert rows.loc["node-01", "device"] == "cpu"
    assert rows.loc["node-02", "device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def _federation(root, Xtr, ytr, node_ids, corrupt=()):
    fed = simulate.SimulatedFederation(root=root)
    for node_id in node_ids:
        i = int(node_id[-2:])
        X = Xtr[i::3] - (1.0 if node_id in corrupt else 0.0)
        fed.add_node(node_id).datasets.add_arrays(f"scans-{node_id}", ["digits"], X,
                                                  ytr[i::3])
    return fed


def test_a_node_whose_training_step_raises_fails_alone(tmp_path, digits):
    Xtr, _, ytr, _ = digits
    args = dict(tags=["digits"], progress=False, training_args={"epochs": 1, "lr": 0.1},
                evaluate_global=False)
    with _federation(tmp_path / "a", Xtr, ytr, ["node-00", "node-01", "node-02"],
                     corrupt=["node-01"]) as fed:
        exp = Experiment(FragilePlan, federation=fed.url, **args)
        exp.run(2)  # the node keeps serving: it fails again in round 2, and only it
    h = exp.history.set_index(["round", "node"])
    for rnd in (1, 2):
        bad = h.loc[(rnd, "node-01")]
        assert bad["status"] == "failed" and bad["n_samples"] == 0
        assert "ValueError" in bad["error"]
        assert "negative pixel intensity in this site's scans" in bad["error"]
        assert h.loc[(rnd, "node-00"), "status"] == h.loc[(rnd, "node-02"), "status"] == "ok"

    # The global model is exactly what the two healthy nodes make on their own.
    with _federation(tmp_path / "b", Xtr, ytr, ["node-00", "node-02"]) as fed:
        healthy = Experiment(FragilePlan, federation=fed.url, **args)
        healthy.run(2)
    assert exp.parameters.equal(healthy.parameters)


def test_a_plan_may_run_its_own_asyncio_loop_in_simulation(digits):
    # Simulated nodes share fedcore's event loop, but plans still run on a worker thread,
    # as on a deployed node: asyncio.run inside training works in both.
    Xtr, _, ytr, _ = digits
    with simulate.from_arrays(Xtr[:200], ytr[:200], n_nodes=2, tags=["digits"]) as fed:
        exp = Experiment(AsyncLoadingPlan, tags=["digits"], federation=fed.url,
                         progress=False, training_args={"epochs": 1})
        rows = exp.run_once()
    assert set(rows["status"]) == {"ok"}, rows.get("error")


class RebuiltDigitsPlan(DigitsPlan):
    """The same model, built afresh on the node every round."""

    reusable = False


def test_a_reused_model_trains_exactly_like_a_rebuilt_one(tmp_path, digits):
    Xtr, _, ytr, _ = digits
    finals = []
    for plan in (DigitsPlan, RebuiltDigitsPlan):
        with simulate.from_arrays(Xtr[:300], ytr[:300], n_nodes=3, tags=["digits"]) as fed:
            exp = Experiment(plan, tags=["digits"], federation=fed.url, progress=False,
                             training_args={"epochs": 1, "lr": 0.1}, seed=3)
            exp.run(3)
            finals.append(exp.parameters)
    assert finals[0].equal(finals[1])


class MomentumDigitsPlan(DigitsPlan):
    """Its own optimizer, with state between steps (a momentum buffer)."""

    def init_optimizer(self):
        return torch.optim.SGD(self.model.parameters(), lr=self.training.lr, momentum=0.9)


class RebuiltMomentumDigitsPlan(MomentumDigitsPlan):
    reusable = False


@pytest.mark.parametrize("plans", [(DigitsPlan, RebuiltDigitsPlan),
                                   (MomentumDigitsPlan, RebuiltMomentumDigitsPlan)],
                         ids=["default-optimizer", "own-optimizer"])
def test_a_reused_plan_starts_each_round_with_a_fresh_optimizer(digits, plans):
    # The reused plan keeps its default optimizer between rounds; a plan's own optimizer is
    # built every round. Either way no momentum or step state leaks into the next round.
    from fedcore.node.executor import run_round
    from fedcore.plan import PlanBundle
    from fedcore.wire.messages import TrainRequest

    Xtr, _, ytr, _ = digits
    ds = ArrayDataset(Xtr[:100], ytr[:100])
    info = {**ds.metadata(), "categories": {"target": list(range(10))}}
    finals = []
    for plan_class in plans:
        warm = None
        params = None
        for rnd in (1, 2, 3):
            if params is None:
                first = plan_class({}, {"epochs": 1, "lr": 0.1}, info)
                first.build(seed=0)
                params = first.get_parameters().copy()
            request = TrainRequest(plan=PlanBundle.from_class(plan_class).to_wire(),
                                   params=params, dataset_id="d", data_info=info,
                                   training_args={"epochs": 1, "lr": 0.1})
            reply, plan = run_round(plan_class, request, ds, "n", rnd, {},
                                    warm=warm if plan_class.reusable else None)
            warm, params = plan, reply.params
        finals.append(params)
    assert finals[0].equal(finals[1])


def test_a_reused_plan_trains_on_the_dataset_of_each_round(digits):
    # The reused plan keeps its converted samples for the next round of the same dataset;
    # given another dataset (or other samples) it trains on those, like a fresh plan.
    from fedcore.node.executor import run_round
    from fedcore.plan import PlanBundle
    from fedcore.wire.messages import TrainRequest

    Xtr, _, ytr, _ = digits
    first, second = ArrayDataset(Xtr[:40], ytr[:40]), ArrayDataset(Xtr[40:80], ytr[40:80])
    info = {**first.metadata(), "categories": {"target": list(range(10))}}
    built = DigitsPlan({}, {"epochs": 1, "lr": 0.1}, info)
    built.build(seed=0)
    request = TrainRequest(plan=PlanBundle.from_class(DigitsPlan).to_wire(),
                           params=built.get_parameters().copy(), dataset_id="d",
                           data_info=info, training_args={"epochs": 1, "lr": 0.1})
    _, warm = run_round(DigitsPlan, request, first, "n", 1, {})
    for ds in (first, second, first.subset(range(20))):
        reused, warm = run_round(DigitsPlan, request, ds, "n", 2, {}, warm=warm)
        fresh, _ = run_round(DigitsPlan, request, ds, "n", 2, {})
        assert reused.n_samples == fresh.n_samples
        assert reused.params.equal(fresh.params)
        assert reused.train_stats == fresh.train_stats


def test_a_reply_from_a_reused_model_does_not_alias_it(digits):
    from fedcore.node.executor import run_round
    from fedcore.plan import PlanBundle
    from fedcore.wire.messages import TrainRequest

    Xtr, _, ytr, _ = digits
    ds = ArrayDataset(Xtr[:100], ytr[:100])
    info = {**ds.metadata(), "categories": {"target": list(range(10))}}
    plan = DigitsPlan({}, {"epochs": 1}, info)
    plan.build(seed=0)
    request = TrainRequest(plan=PlanBundle.from_class(DigitsPlan).to_wire(),
                           params=plan.get_parameters().copy(), dataset_id="d",
                           training_args={"epochs": 1}, data_info=info)
    reply, kept = run_round(DigitsPlan, request, ds, "n", 1, {}, warm=plan)
    assert kept is plan
    for name, tensor in plan.model.state_dict().items():
        assert not np.shares_memory(reply.params[name], tensor.numpy())


def _round_of(plan_class, digits, training_args):
    from fedcore.plan import PlanBundle
    from fedcore.wire.messages import TrainRequest

    Xtr, _, ytr, _ = digits
    ds = ArrayDataset(Xtr[:100], ytr[:100])
    info = {**ds.metadata(), "categories": {"target": list(range(10))}}
    built = plan_class({}, training_args, info)
    built.build(seed=0)
    request = TrainRequest(plan=PlanBundle.from_class(plan_class).to_wire(),
                           params=built.get_parameters().copy(), dataset_id="d",
                           data_info=info, training_args=training_args)
    return request, ds


@pytest.mark.parametrize("every_s", [0.0, 3600.0])
def test_progress_reaches_the_node_with_the_last_step_and_the_rounds_loss(
        digits, monkeypatch, every_s):
    # The default report only forwards to the node, which sends one message a second: the
    # loop calls it at most every REPORT_EVERY_S, and always for the round's last step.
    from fedcore.node.executor import run_round

    monkeypatch.setattr("fedcore.plan.base.REPORT_EVERY_S", every_s)
    request, ds = _round_of(DigitsPlan, digits, {"epochs": 2, "batch_size": 10})
    reports: list[dict] = []
    reply, _ = run_round(DigitsPlan, request, ds, "n", 1,
                         {"progress": lambda **fields: reports.append(fields)})
    steps = [r["step"] for r in reports]
    assert steps == (list(range(1, 21)) if every_s == 0 else [20])
    assert reports[-1]["samples"] == 200 and reports[-1]["fraction"] == 1.0
    assert reports[-1]["loss"] == reply.train_stats["loss"] > 0


class StepLoggingPlan(DigitsPlan):
    """Its own report: it hears every step, as before the loop's interval."""

    heard: list[int] = []

    def report(self, *, step, loss=None, epoch=0, samples=0, fraction=None):
        StepLoggingPlan.heard.append(step)


def test_a_plan_that_overrides_report_hears_every_step(digits):
    from fedcore.node.executor import run_round

    request, ds = _round_of(StepLoggingPlan, digits, {"epochs": 2, "batch_size": 10})
    StepLoggingPlan.heard = []
    run_round(StepLoggingPlan, request, ds, "n", 1, {})
    assert StepLoggingPlan.heard == list(range(1, 21))


def test_a_kept_model_holds_no_gradients_between_rounds(digits):
    # A node keeps its built model between rounds; its gradients would be a second copy of
    # the model per node, and the next round's first step drops them anyway.
    from fedcore.node.executor import run_round

    request, ds = _round_of(DigitsPlan, digits, {"epochs": 1})
    _, kept = run_round(DigitsPlan, request, ds, "n", 1, {})
    assert all(p.grad is None for p in kept.model.parameters())


def test_set_parameters_casts_into_a_bfloat16_model_and_a_float32_one():
    # numpy has no bfloat16: that model is set by torch's copy_, under no_grad; float64
    # arrays go into a float32 model cast as copy_ casts them. Both stay trainable leaves.
    weight = np.arange(6, dtype=np.float64).reshape(2, 3) / 4
    weight.flags.writeable = False
    params = ParameterSet({"weight": weight, "bias": np.array([1.5, -2.0])})
    for dtype in (torch.bfloat16, torch.float32):
        model = nn.Linear(3, 2).to(dtype)
        convert.set_parameters(model, params)
        assert model.weight.dtype == dtype and model.weight.requires_grad
        assert model.weight.is_leaf and model.weight.grad_fn is None
        assert torch.equal(model.weight, torch.tensor(weight, dtype=dtype))
        assert torch.equal(model.bias, torch.tensor([1.5, -2.0], dtype=dtype))
    with pytest.raises(ValueError, match="'weight' has shape \\(1, 3\\)"):
        convert.set_parameters(nn.Linear(3, 2), ParameterSet(
            {"weight": weight[:1], "bias": np.zeros(2)}))


class CountingSGD(torch.optim.SGD):
    zero_grads = 0

    def zero_grad(self, set_to_none=True):
        CountingSGD.zero_grads += 1
        super().zero_grad(set_to_none)


class OwnOptimizerPlan(DigitsPlan):
    def init_optimizer(self):
        return CountingSGD(self.model.parameters(), lr=self.training.lr, momentum=0.9)


def test_a_plans_own_optimizer_is_zeroed_by_its_own_zero_grad_at_every_step(digits):
    # The default SGD's gradients are dropped directly; a plan's optimizer keeps its own.
    from fedcore.node.executor import run_round

    request, ds = _round_of(OwnOptimizerPlan, digits, {"epochs": 2, "batch_size": 10})
    CountingSGD.zero_grads = 0
    reply, _ = run_round(OwnOptimizerPlan, request, ds, "n", 1, {})
    assert reply.train_stats["steps"] == 20 and CountingSGD.zero_grads == 20


def test_the_default_optimizer_trains_as_a_plain_torch_loop(digits):
    # What the kept SGD does without its zero_grad: the same weights, bit for bit.
    Xtr, _, ytr, _ = digits
    plan = DigitsPlan({}, {"epochs": 2, "batch_size": 16, "lr": 0.1})
    plan.build(seed=0)
    start = plan.get_parameters().copy()
    for seed in (3, 4):  # the second round reuses the kept optimizer
        plan.set_parameters(start)
        plan.fit(ArrayDataset(Xtr[:90], ytr[:90]), seed=seed)
    model = DigitsPlan().init_model()
    convert.set_parameters(model, start)
    X = torch.as_tensor(Xtr[:90], dtype=torch.float32)
    y = torch.as_tensor(ytr[:90])
    generator = torch.Generator().manual_seed(4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        order = torch.randperm(len(X), generator=generator)
        for begin in range(0, len(X), 16):
            idx = order[begin:begin + 16]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            optimizer.step()
    assert plan.get_parameters().equal(convert.get_parameters(model))
