"""One round of training on a node: the steps of a TrainRequest, in order."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from fedcore import plugins
from fedcore.aggregators._local import LocalState, local_algorithm
from fedcore.data import Dataset
from fedcore.data.preprocessing import PreprocessedDataset, Preprocessing
from fedcore.errors import ConfigurationError, GovernanceError
from fedcore.params import ParameterSet
from fedcore.plan import LocalTraining, TrainingPlan
from fedcore.plan.metrics import evaluate
from fedcore.plan.personal import LocalParameters
from fedcore.privacy.dpsgd import PrivateTraining, check_wrappable
from fedcore.privacy.release import PrivateRelease
from fedcore.privacy.spec import PrivacySpec
from fedcore.wire.messages import TrainReply, TrainRequest


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (stable across processes and platforms)."""
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def run_round(plan_class: type[TrainingPlan], request: TrainRequest, dataset: Dataset,
              node_id: str, round: int, settings: dict[str, Any],
              warm: TrainingPlan | None = None, state: LocalState | None = None,
              ) -> tuple[TrainReply, TrainingPlan]:
    """Split, evaluate the global model, train, evaluate the update, and reply.

    The train/test split depends on the experiment's seed only, so the test samples stay
    the same in every round and never leak into training. ``warm`` is a plan built for the
    same experiment and arguments in an earlier round (for plans whose ``reusable`` flag
    says that loading parameters restores their whole state); it saves building the model.
    ``request.algorithm`` names the aggregation algorithm whose node side wraps training
    (:mod:`fedcore.aggregators._local`); ``state`` is where it keeps values between rounds
    (the node passes one in its home; required when the request names an algorithm or the
    plan has local parameters, which it keeps there: :mod:`fedcore.plan.personal`).
    ``request.fine_tune`` trains the federated model further on this node only: the
    result is kept in ``state`` and evaluated, and the reply carries the global model back
    unchanged. Returns the reply and the plan, for reuse.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    algorithm = local_algorithm(request.algorithm, plan_class)
    if algorithm is not None and state is None:
        raise ConfigurationError(
            f"Aggregator {request.algorithm.get('name')!r} keeps state on the node: pass "
            "run_round a LocalState (the node gives one in its home).")
    personal = LocalParameters(plan_class, state)
    if request.preprocessing:  # the experiment's fitted transform, before the split
        dataset = PreprocessedDataset(dataset, Preprocessing.from_wire(request.preprocessing))
    train, test = dataset.split(request.test_ratio, seed=derive_seed(request.seed, node_id))
    plan = warm
    if plan is None:
        plan = plan_class(request.model_args, request.training_args, request.data_info)
        plan.node_settings = {k: v for k, v in settings.items() if k != "progress"}
        plan.build(seed=request.seed)
    # The global model, with this node's own local parameters (never the request's).
    start = personal.start(plan, request.params)
    plan.reset_local_algorithm()
    plan.progress_callback = settings.get("progress")
    privacy = PrivacySpec.parse(request.privacy)
    private = private_training(plan_class, privacy)
    release = PrivateRelease.of(privacy)  # under DP only what the noise covers leaves
    if release is not None:
        release.check(algorithm)
        plan.progress_callback = release.progress(plan.progress_callback)
    timings["setup_s"] = time.perf_counter() - t0

    metrics_global: dict[str, float] = {}
    t = time.perf_counter()
    if request.evaluate_global and len(test) and release is None:
        metrics_global = evaluate(plan.task, *plan.predict(test))
    timings["eval_global_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if algorithm is not None:
        assert state is not None
        algorithm.before_fit(plan, start, state)
    seed = derive_seed(request.seed, round, node_id)
    try:
        if private is not None:  # the node's installed DP-SGD runs the round, not plan.fit
            train_stats = private.train(plan, train, seed,
                                        LocalTraining.common(request.training_args))
        else:
            train_stats = plan.fit(train, seed=seed)
    finally:
        plan.progress_callback = None  # a warm plan must not report into a later round
    timings["train_s"] = time.perf_counter() - t

    metrics_local: dict[str, float] = {}
    t = time.perf_counter()
    if request.evaluate_local and len(test) and release is None:
        metrics_local = evaluate(plan.task, *plan.predict(test))
    timings["eval_local_s"] = time.perf_counter() - t

    spent: dict[str, Any] = {}
    # What the node keeps of its own is the model it trained, not the noised release.
    trained = ParameterSet(plan.get_parameters()).copy() \
        if personal.active and release is not None else None
    if release is not None:  # first: the algorithm's extras derive from what is released
        # DP-SGD: the model the node's wrapper trained, charged at the wrapper's count.
        params, spent = release.apply(plan, start, private)
    else:
        params = ParameterSet(plan.get_parameters())
    extras: dict[str, Any] = {}
    if algorithm is not None:  # last: the node's state changes only once the round is done
        assert state is not None
        extras = algorithm.after_fit(plan, start, state)
    if request.fine_tune:  # the fine-tuned model stays here; the global one goes back
        personal.keep_fine_tuned(params)
        params = request.params
    else:
        params = personal.keep(params, trained)  # the local parameters stay here
    if plan.reusable:  # the model lives on: the reply must not alias it
        params = params.snapshot()  # a copy no one writes: sent without another
    timings["total_s"] = time.perf_counter() - t0
    reply = TrainReply(
        params=params,
        n_samples=len(train),
        n_test=len(test),
        metrics_global=metrics_global,
        metrics_local=metrics_local,
        train_stats=dict(train_stats or {}),
        timings=timings,
        device=plan.device(),
        extras=extras,
        privacy=spent,
    )
    return (reply if release is None else release.reply(reply)), plan


def private_training(plan_class: type[TrainingPlan],
                     privacy: PrivacySpec | None) -> PrivateTraining | None:
    """The node's DP-SGD for a round of ``plan_class`` (``None`` unless DP-SGD is asked).

    Taken from the backend installed on the node (the plug-in registry's class for the
    plan's backend), never from the plan class; :class:`~fedcore.errors.GovernanceError`
    says why the node refuses (no DP-SGD in that backend, a plan that overrides what the
    wrapper relies on: :func:`fedcore.privacy.dpsgd.check_wrappable`).
    """
    if privacy is None or privacy.mechanism != "dp-sgd":
        return None
    try:
        base = plugins.load("backends", str(plan_class.backend))
    except ConfigurationError as exc:
        raise GovernanceError(f"DP-SGD was asked for, but this node cannot load the plan's "
                              f"backend: {exc}") from None
    return check_wrappable(plan_class, base, privacy)


#: ``json.dumps(..., sort_keys=True, default=repr)`` without building an encoder per call.
_key_text = json.JSONEncoder(sort_keys=True, default=repr).encode


def plan_key(experiment: str, plan_hash: str, request: TrainRequest) -> str:
    """What must match for a plan built in one round to serve another."""
    args = _key_text([request.model_args, request.training_args, request.data_info])
    return hashlib.sha256(f"{experiment}\0{plan_hash}\0{args}".encode()).hexdigest()
