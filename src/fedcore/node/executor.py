"""One round of training on a node: the steps of a TrainRequest, in order."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from ..data import Dataset
from ..messages import TrainReply, TrainRequest
from ..metrics import evaluate
from ..params import ParameterSet
from ..plan import TrainingPlan


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (stable across processes and platforms)."""
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def run_round(plan_class: type[TrainingPlan], request: TrainRequest, dataset: Dataset,
              node_id: str, round: int, settings: dict[str, Any],
              warm: TrainingPlan | None = None) -> tuple[TrainReply, TrainingPlan]:
    """Split, evaluate the global model, train, evaluate the update, and reply.

    The train/test split depends on the experiment's seed only, so the test samples stay
    the same in every round and never leak into training. ``warm`` is a plan built for the
    same experiment and arguments in an earlier round (for plans whose ``reusable`` flag
    says that loading parameters restores their whole state); it saves building the model.
    Returns the reply and the plan, for reuse.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    train, test = dataset.split(request.test_ratio, seed=derive_seed(request.seed, node_id))
    plan = warm
    if plan is None:
        plan = plan_class(request.model_args, request.training_args, request.data_info)
        plan.node_settings = dict(settings)
        plan.build(seed=request.seed)
    plan.set_parameters(request.params)
    timings["setup_s"] = time.perf_counter() - t0

    metrics_global: dict[str, float] = {}
    t = time.perf_counter()
    if request.evaluate_global and len(test):
        metrics_global = evaluate(plan.task, *plan.predict(test))
    timings["eval_global_s"] = time.perf_counter() - t

    t = time.perf_counter()
    train_stats = plan.fit(train, seed=derive_seed(request.seed, round, node_id))
    timings["train_s"] = time.perf_counter() - t

    metrics_local: dict[str, float] = {}
    t = time.perf_counter()
    if request.evaluate_local and len(test):
        metrics_local = evaluate(plan.task, *plan.predict(test))
    timings["eval_local_s"] = time.perf_counter() - t

    params = ParameterSet(plan.get_parameters())
    if plan.reusable:
        params = params.copy()  # the model lives on: the reply must not alias it
    timings["total_s"] = time.perf_counter() - t0
    return TrainReply(
        params=params,
        n_samples=len(train),
        n_test=len(test),
        metrics_global=metrics_global,
        metrics_local=metrics_local,
        train_stats=dict(train_stats or {}),
        timings=timings,
        device=plan.device(),
    ), plan


def plan_key(experiment: str, plan_hash: str, request: TrainRequest) -> str:
    """What must match for a plan built in one round to serve another."""
    args = json.dumps([request.model_args, request.training_args, request.data_info],
                      sort_keys=True, default=repr)
    return hashlib.sha256(f"{experiment}\0{plan_hash}\0{args}".encode()).hexdigest()
