"""One round of training on a node: the steps of a TrainRequest, in order."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from fedcore.aggregators._local import LocalState, local_algorithm
from fedcore.data import Dataset
from fedcore.errors import ConfigurationError
from fedcore.params import ParameterSet
from fedcore.plan import TrainingPlan
from fedcore.plan.metrics import evaluate
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
    (the node passes one in its home; required when the request names an algorithm).
    Returns the reply and the plan, for reuse.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    algorithm = local_algorithm(request.algorithm, plan_class)
    if algorithm is not None and state is None:
        raise ConfigurationError(
            f"Aggregator {request.algorithm.get('name')!r} keeps state on the node: pass "
            "run_round a LocalState (the node gives one in its home).")
    train, test = dataset.split(request.test_ratio, seed=derive_seed(request.seed, node_id))
    plan = warm
    if plan is None:
        plan = plan_class(request.model_args, request.training_args, request.data_info)
        plan.node_settings = {k: v for k, v in settings.items() if k != "progress"}
        plan.build(seed=request.seed)
    plan.set_parameters(request.params)
    plan.reset_local_algorithm()
    plan.progress_callback = settings.get("progress")
    privacy = PrivacySpec.parse(request.privacy)
    release = PrivateRelease.of(privacy)  # under DP only what the noise covers leaves
    if release is not None:
        release.check(algorithm)
        plan.progress_callback = release.progress(plan.progress_callback)
    if privacy is not None and privacy.mechanism == "dp-sgd":
        if "dp-sgd" not in plan_class.supports:
            raise ConfigurationError(
                f"DP-SGD was asked for, which {plan_class.__name__} (backend "
                f"{plan_class.backend!r}) does not support. Use privacy={{'mechanism': "
                "'update', ...}} (update-level DP works with every backend), or a torch plan.")
        plan.privacy = privacy
    timings["setup_s"] = time.perf_counter() - t0

    metrics_global: dict[str, float] = {}
    t = time.perf_counter()
    if request.evaluate_global and len(test) and release is None:
        metrics_global = evaluate(plan.task, *plan.predict(test))
    timings["eval_global_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if algorithm is not None:
        assert state is not None
        algorithm.before_fit(plan, request.params, state)
    try:
        train_stats = plan.fit(train, seed=derive_seed(request.seed, round, node_id))
    finally:
        plan.progress_callback = None  # a warm plan must not report into a later round
    timings["train_s"] = time.perf_counter() - t

    metrics_local: dict[str, float] = {}
    t = time.perf_counter()
    if request.evaluate_local and len(test) and release is None:
        metrics_local = evaluate(plan.task, *plan.predict(test))
    timings["eval_local_s"] = time.perf_counter() - t

    params = ParameterSet(plan.get_parameters())
    spent: dict[str, Any] = {}
    if release is not None:  # first: the algorithm's extras derive from what is released
        params, spent = release.apply(plan, request.params)
    extras: dict[str, Any] = {}
    if algorithm is not None:  # last: the node's state changes only once the round is done
        assert state is not None
        extras = algorithm.after_fit(plan, request.params, state)
    if plan.reusable:
        params = params.copy()  # the model lives on: the reply must not alias it
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


def plan_key(experiment: str, plan_hash: str, request: TrainRequest) -> str:
    """What must match for a plan built in one round to serve another."""
    args = json.dumps([request.model_args, request.training_args, request.data_info],
                      sort_keys=True, default=repr)
    return hashlib.sha256(f"{experiment}\0{plan_hash}\0{args}".encode()).hexdigest()
