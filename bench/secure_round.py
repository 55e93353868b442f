"""Secure aggregation in whole rounds: ``Experiment.run_once()`` with and without it.

Ten simulated nodes (``--nodes``; real ``Node`` objects with their registries and audit
logs, in-process transport, every message encoded and decoded) train a torch MLP
``features -> h -> h -> 10`` whose ``h`` gives ~1M and ~10M float32 parameters
(``--sizes``). Each node holds ``--samples`` synthetic samples (standard normal features,
random labels; 20 % held out for evaluation); torch runs on ``--threads`` thread(s), 1 by
default (on a shared 2-core machine two threads made training times swing 5x). Two
workloads, chosen before measuring:

- **train**: 1 local epoch over the node's training samples, batch 32, SGD, global and local
  evaluation on (the defaults a user gets);
- **no training**: one SGD step (``num_updates=1``), evaluation off: the worst case, where
  the round is almost only transfer and aggregation, so secure aggregation weighs most.

For each, six experiments on the same federation take turns, round after round (the first
round of each is a warm-up, left out): ``secagg=None`` (plain), ``secagg=PairwiseMasking()``
(the default scheme, masks precomputed while training), the same with the precomputation
switched off (``masking, direct``: the masks made in ``protect``, after training, as before
it existed), masking with the last 2 nodes dropping out after the setup and share
exchanges: they train, then fail instead of protecting their update (their reply is an
error), so the researcher must rebuild their mask keys from the others' shares and remove
their pairwise masks (drop-out recovery), and ``PairwiseMasking(ring_bits=32)`` with and
without the precomputation (``masking, 32-bit``: half the keystream, additions and upload).

Under simulation the nodes share one worker thread (see ``fedcore.simulate``): their
training and ``protect`` run one after another, so a round holds every node's work, and their
answers to the setup, share and unmask exchanges run one after another on one event loop.
On a federation they work in parallel: the estimates count one node's work, and each
exchange as long as its slowest node's answer (timed on every node; their CPU time per node
is printed too). Each masking node computes its combined mask in a thread
of its own while it trains (``NodeSession.prepare``); the output gives that precomputation's
CPU time per node apart from what ``protect`` still does after training (encode, one
addition, and any wait for the precomputation), and estimates a federation both ways: with
a spare core beside the training (the precomputation hidden up to the node's training time)
and without one (its CPU time added to the node's).

Joye-Libert runs whole rounds too, on a small model (``--jl-hidden``) so that a round ends in
about a minute, once encrypting after training and once with the masks precomputed while
the nodes train; its cost per million values is extrapolated linearly from it (the output
says so).

Run: ``python bench/secure_round.py`` (~5 min; ``--help`` for options).
"""

from __future__ import annotations

import argparse
import logging
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from fedcore import Experiment, Node, simulate
from fedcore.errors import SecureAggregationError
from fedcore.node._secagg import SecaggSessions
from fedcore.secagg import JoyeLibert, NodeContext, PairwiseMasking, ResearcherSession, masking
from fedcore.secagg import _bigint as B
from fedcore.secagg import joye_libert as joye_libert_module
from fedcore.secagg.context import EphemeralSigner, keys_statement
from fedcore_torch import TorchTrainingPlan

TARGET_RATIO = 1.5
FEATURES = 512
CLASSES = 10
HIDDEN = {1_000_000: 772, 10_000_000: 2911}  # h**2 + 524 h + 10 parameters with 512 features
DIRECT = "masking, direct"  # no precomputation: the masks made after training, in protect
RING32 = "masking, 32-bit"  # PairwiseMasking(ring_bits=32): half the keystream and upload
#: The direct twin of each precomputing mode: its rest stands for a federation's (see report)
TWIN = {"masking": DIRECT, "masking, 2 dropped": DIRECT, RING32: f"{RING32} direct"}
WORKLOADS = {
    "train": ({"epochs": 1, "batch_size": 32, "lr": 0.01}, True),
    "no training": ({"epochs": 1, "batch_size": 32, "lr": 0.01, "num_updates": 1}, False),
}


class MLP(TorchTrainingPlan):
    """The plan every node trains: two hidden layers of ``hidden`` units."""

    def init_model(self):
        f, h = int(self.model_args["inputs"]), int(self.model_args["hidden"])
        return nn.Sequential(nn.Linear(f, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                             nn.Linear(h, 10))

    def training_step(self, data, target):
        return F.cross_entropy(self.model(data), target)


class BenchSessions(SecaggSessions):
    """A node's sessions that time ``protect`` and the exchanges, skip the precomputation
    while ``direct`` is set, and drop out instead of protecting while ``drop`` is set."""

    direct = False
    drop = False

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.protect_s: list[float] = []
        self.precompute_s: list[float] = []  # CPU time of the mask's thread
        self.wait_s: list[float] = []  # protect waiting for that thread
        self.dropped = 0  # rounds it dropped out of (its failed row has no timings)
        #: This round's setup, share and unmask exchanges: phase -> seconds (wall, CPU)
        self.exchange_s: dict[str, float] = {}
        self.exchange_cpu_s: dict[str, float] = {}

    def answer(self, request: Any, binding: Any) -> Any:
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return super().answer(request, binding)
        finally:
            phase = request.phase
            self.exchange_s[phase] = (self.exchange_s.get(phase, 0.0)
                                      + time.perf_counter() - start)
            self.exchange_cpu_s[phase] = (self.exchange_cpu_s.get(phase, 0.0)
                                          + time.thread_time() - cpu)

    def prepare(self, session: Any, options: Any, reference: Any) -> None:
        if not self.direct:
            super().prepare(session, options, reference)

    def protect(self, session: Any, options: Any, update: Any, weight: float,
                extras: Any) -> Any:
        if self.drop:  # after setup, shares and training, before its update leaves
            self.dropped += 1
            raise SecureAggregationError(f"{self.node_id} dropped out (benchmark)")
        start = time.perf_counter()
        out = super().protect(session, options, update, weight, extras)
        self.protect_s.append(time.perf_counter() - start)
        timings = getattr(session, "timings", {})  # what the precomputation took
        self.precompute_s.append(timings.get("precompute_cpu_s", 0.0))
        self.wait_s.append(timings.get("wait_s", 0.0))
        return out


class BenchNode(Node):
    """A node whose secure-aggregation sessions are :class:`BenchSessions`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # private: the node's own terms (floors, key, peers) as a real node's
        self._secagg = self.bench = BenchSessions(self.node_id, self._secagg_context)


class KeepsSession:
    """Keeps the researcher's session of the last round, to read its timings."""

    session: ResearcherSession | None = None

    def researcher_session(self, *args: Any, **kwargs: Any) -> ResearcherSession:
        self.session = super().researcher_session(*args, **kwargs)  # type: ignore[misc]
        return self.session


class TimedMasking(KeepsSession, PairwiseMasking):
    """The default masking scheme, its researcher's timings kept."""


class TimedJoyeLibert(KeepsSession, JoyeLibert):
    """Joye-Libert, its researcher's timings kept."""


def n_params(features: int, hidden: int) -> int:
    return features * hidden + hidden + hidden * hidden + hidden + hidden * CLASSES + CLASSES


def federation(n_nodes: int, samples: int, features: int) -> simulate.SimulatedFederation:
    fed = simulate.SimulatedFederation()
    for i in range(n_nodes):
        node_id = f"node-{i + 1:02d}"
        node = BenchNode(fed.root / node_id, node_id=node_id,
                         executor=fed._executor,  # the simulation's shared worker
                         approval_required=False)
        node.start(fed.url)
        fed.nodes.append(node)
        rng = np.random.default_rng(i)
        X = rng.standard_normal((samples, features), dtype=np.float32)
        node.datasets.add_arrays(f"part-{i}", ["bench"], X, rng.integers(0, CLASSES, samples))
    return fed


def one_round(exp: Experiment, nodes: Sequence[BenchNode], dropping: Sequence[BenchNode],
              direct: bool = False) -> dict[str, float]:
    """Run one round; its wall time and composition from the history columns.

    ``direct``: the nodes mask after training, without the precomputation.
    """
    benches = [node.bench for node in nodes]
    for b in benches:
        b.direct = direct
        b.protect_s.clear()
        b.precompute_s.clear()
        b.wait_s.clear()
        b.exchange_s.clear()
        b.exchange_cpu_s.clear()
        b.dropped = 0
    for node in dropping:
        node.bench.drop = True
    try:
        rows: pd.DataFrame = exp.run_once()
    finally:
        for node in dropping:
            node.bench.drop = False
    ok = rows[rows["status"] == "ok"]
    assert len(ok) == len(nodes) - len(dropping), rows[["node", "status", "error"]]
    protect = [s for b in benches for s in b.protect_s]
    precompute = [s for b in benches for s in b.precompute_s]
    # protect's own work after training: on a federation a node waits for its own
    # precomputation only when it outlasts its training, which the estimates account for
    after = [p - w for b in benches for p, w in zip(b.protect_s, b.wait_s, strict=True)]
    lost = sum(b.dropped for b in benches)
    round_s = float(rows["round_s"].iloc[0])
    # one node after another under simulation: the round holds every node's work (a
    # dropped node's row has no timings: counted at the others' mean)
    node_s = float(ok["total_s"].sum()) * (1 + lost / len(ok))
    train_s = float(ok["train_s"].sum()) * (1 + lost / len(ok))
    session = getattr(exp.secagg, "session", None)
    # The nodes answer the setup, share and unmask exchanges one after another here (one
    # event loop), in parallel on a federation: each exchange then lasts as long as its
    # slowest node's answer.
    phases = {p for b in benches for p in b.exchange_s}
    exchanges = sum(s for b in benches for s in b.exchange_s.values())
    exchanges_fed = sum(max(b.exchange_s.get(p, 0.0) for b in benches) for p in phases)
    exchange_cpu = [sum(b.exchange_cpu_s.values()) for b in benches if b.exchange_cpu_s]
    return {"round": round_s, "train": train_s, "node": node_s, "protect": sum(protect),
            "researcher": sum(session.timings.values()) if session is not None else 0.0,
            "protect_node": statistics.median(protect) if protect else 0.0,
            "after_node": statistics.median(after) if after else 0.0,
            "precompute_node": statistics.median(precompute) if precompute else 0.0,
            "exchanges": exchanges, "exchanges_fed": exchanges_fed,
            "exchange_cpu_node": statistics.median(exchange_cpu) if exchange_cpu else 0.0,
            "rest": round_s - node_s - sum(protect)}


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def compare(n_nodes: int, samples: int, features: int, hidden: int, workload: str,
            repeats: int) -> dict[str, dict[str, float]]:
    """Plain, masking and masking with 2 drop-outs, taking turns; medians per mode."""
    training_args, evaluate = WORKLOADS[workload]
    # Every node precomputes, as on its own machine (a process holds at most
    # MAX_PRECOMPUTED masks: in a simulation the nodes past it would mask directly).
    masking._precomputed = threading.BoundedSemaphore(n_nodes)
    with federation(n_nodes, samples, features) as fed:
        nodes: list[BenchNode] = fed.nodes  # type: ignore[assignment]
        modes: dict[str, tuple[Experiment, list[BenchNode], bool]] = {}
        for mode, scheme, dropping, direct in (
                ("plain", None, [], False),
                ("masking", TimedMasking(), [], False),
                (DIRECT, TimedMasking(), [], True),
                ("masking, 2 dropped", TimedMasking(), nodes[-2:], False),
                (RING32, TimedMasking(ring_bits=32), [], False),
                (TWIN[RING32], TimedMasking(ring_bits=32), [], True)):
            exp = Experiment(MLP, tags=["bench"], federation=fed.url, seed=0,
                             model_args={"inputs": features, "hidden": hidden},
                             training_args=training_args, evaluate_global=evaluate,
                             evaluate_local=evaluate, progress=False, secagg=scheme)
            modes[mode] = (exp, dropping, direct)
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for i in range(repeats + 1):
            for mode, (exp, dropping, direct) in modes.items():
                result = one_round(exp, nodes, dropping, direct)
                if i:  # round 1 of each experiment warms up (imports, model building)
                    runs[mode].append(result)
        for exp, _, _ in modes.values():
            exp.close()
    return {m: medians(r) for m, r in runs.items()}


def report(size: int, workload: str, res: dict[str, dict[str, float]], n_nodes: int,
           samples: int) -> None:
    plain = res["plain"]
    what = "1 epoch of" if workload == "train" else "1 SGD step on"
    print(f"\n{size:,} float32 parameters, workload '{workload}' ({what} "
          f"{int(samples * 0.8)} samples per node, evaluation "
          f"{'on' if WORKLOADS[workload][1] else 'off'})")
    print(f"  plain round {fmt(plain['round'])}: nodes' training {fmt(plain['train'])}, "
          f"nodes' other work {fmt(plain['node'] - plain['train'])} (model loading, "
          f"evaluation), the rest {fmt(plain['rest'])} (messages, codec, aggregation); "
          f"{n_nodes} nodes one after another")
    print(f"  {'mode':<22} {'round':>9} {'vs plain':>9} {'training':>9} {'precompute':>11} "
          f"{'protect/node':>13} {'(after)':>8} {'exch./node':>11} {'researcher':>10} "
          f"{'rest':>9} {'fed. est.: spare core':>22} {'no spare':>9} {'(serial exch.)':>15}")
    node_plain = plain["node"] / n_nodes
    base = node_plain + plain["rest"]
    for mode, m in res.items():
        ratio = m["round"] / plain["round"]
        # Nodes in parallel: one node's work (this machine's mean), its precomputation
        # (hidden up to that work when a core is spare, added to it when none is), its
        # protect after training, its answers to the exchanges (each exchange as long as its
        # slowest node's answer), then the researcher's side (the rest); the upload's
        # doubling is in the rest only.
        rest, serial = fed_rest(m), m["rest"]
        if m["precompute_node"]:
            # Simulated, the other nodes' mask threads share the cores with the researcher
            # and inflate the rest; on a federation they run on the nodes' own machines:
            # take the direct twin's rest (same ring), plus this mode's extra researcher work.
            twin = res[TWIN[mode]]
            rest = fed_rest(twin) + m["researcher"] - twin["researcher"]
            serial = twin["rest"] + m["researcher"] - twin["researcher"]
        spare = (max(node_plain, m["precompute_node"]) + m["after_node"] + rest) / base
        busy = (node_plain + m["precompute_node"] + m["after_node"] + rest) / base
        # the estimate before the exchanges were counted in parallel (as in older tables)
        spare_serial = (max(node_plain, m["precompute_node"]) + m["after_node"] + serial) / base
        verdict = "" if mode == "plain" else (
            f"  (target {TARGET_RATIO}x: {'met' if ratio <= TARGET_RATIO else 'missed'} here, "
            f"{'met' if spare <= TARGET_RATIO else 'missed'} / "
            f"{'met' if busy <= TARGET_RATIO else 'missed'} on a federation)")
        print(f"  {mode:<22} {fmt(m['round']):>9} {ratio:>8.2f}x {fmt(m['train']):>9} "
              f"{fmt(m['precompute_node']):>11} {fmt(m['protect_node']):>13} "
              f"{fmt(m['after_node']):>8} {m['exchange_cpu_node'] * 1e3:>8.2f} ms "
              f"{fmt(m['researcher']):>10} {fmt(m['rest']):>9} "
              f"{spare:>21.2f}x {busy:>8.2f}x {spare_serial:>14.2f}x{verdict}")
    recovery = res["masking, 2 dropped"]["researcher"] - res["masking"]["researcher"]
    print(f"  drop-out recovery: the researcher's secure-aggregation work grows by "
          f"{fmt(recovery)} when 2 of {n_nodes} nodes drop out")


def fed_rest(m: dict[str, float]) -> float:
    """The rest as on a federation: the nodes' answers to each exchange in parallel."""
    return m["rest"] - m["exchanges"] + m["exchanges_fed"]


def joye_libert(n_nodes: int, samples: int, hidden: int, key_size: int) -> None:
    features = 16
    size = n_params(features, hidden)
    times = {}
    # Every node precomputes its masks, as on its own machine (see compare()).
    joye_libert_module._precomputed = threading.BoundedSemaphore(n_nodes)
    with federation(n_nodes, samples, features) as fed:
        nodes: list[BenchNode] = fed.nodes  # type: ignore[assignment]
        for name, scheme, direct in (("plain", None, False),
                                     ("direct", TimedJoyeLibert(key_size=key_size), True),
                                     ("prepared", TimedJoyeLibert(key_size=key_size), False)):
            exp = Experiment(MLP, tags=["bench"], federation=fed.url, seed=0, timeout=3600,
                             model_args={"inputs": features, "hidden": hidden},
                             training_args=WORKLOADS["train"][0], progress=False,
                             secagg=scheme)
            if scheme is None:  # warms the nodes up for both; one round per Joye-Libert mode
                one_round(exp, nodes, [])
            times[name] = one_round(exp, nodes, [], direct=direct)
            exp.close()
    plain, jl, pre = times["plain"], times["direct"], times["prepared"]
    per_m = (jl["round"] - plain["round"]) / size * 1e6
    print(f"\nJoye-Libert ({key_size}-bit, exponentiations on {B.workers()} thread(s)), one "
          f"round of a {size:,}-parameter model ({features} -> {hidden} -> {hidden} -> 10, 1 "
          f"epoch): {fmt(jl['round'])} against {fmt(plain['round'])} plain "
          f"({jl['round'] / plain['round']:.0f}x); protect {fmt(jl['protect_node'])} per node, "
          f"researcher {fmt(jl['researcher'])}.")
    print(f"  With the masks precomputed while the node trains: round {fmt(pre['round'])}, "
          f"protect {fmt(pre['protect_node'])} per node of which {fmt(pre['after_node'])} "
          f"after the precomputation (training here is shorter than it: the rest is waiting).")
    print(f"  Extrapolated linearly per value (not measured): {per_m / 3600:.1f} h more per "
          f"round per million parameters here ({n_nodes} nodes one after another); on a "
          f"federation {jl['protect_node'] / size * 1e6 / 60:.0f} min of protect per node "
          f"(computed during training when it lasts that long, leaving "
          f"{pre['after_node'] / size * 1e6:.1f} s after it) then "
          f"{jl['researcher'] / size * 1e6 / 60:.0f} min on the researcher, per million.")


def round_key_signatures(n_nodes: int, repeats: int = 200) -> tuple[float, float]:
    """Seconds one node spends per masking round signing its keys and verifying its peers'.

    Exactly the work the signed round keys add: one Ed25519 signature in the setup, and in
    the share phase one verification per other member, each of a statement built from the
    session, the members and the keys. Medians over ``repeats`` rounds of the CPU time of
    that work (steady on a shared machine) and of its wall time.
    """
    members = [f"node-{i + 1:02d}" for i in range(n_nodes)]
    signers = {m: EphemeralSigner() for m in members}
    contexts = {m: NodeContext(signer=signers[m], experiment="bench") for m in members}
    keys = {m: {"c_pk": secrets.token_bytes(32), "s_pk": secrets.token_bytes(32)}
            for m in members}
    me = members[0]
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.thread_time(), time.perf_counter()
        signed = {m: contexts[m].sign_keys(keys_statement(
            "masking", "s" * 32, "bench", 1, members, m, keys[m])) for m in members}
        c1, w1 = time.thread_time(), time.perf_counter()
        for m in members:
            contexts[me].verify(me, m, keys_statement("masking", "s" * 32, "bench", 1,
                                                      members, m, keys[m]),
                                signed[m]["identity"], signed[m]["sig"], "round keys")
        c2, w2 = time.thread_time(), time.perf_counter()
        # one node signs its own keys (1 / n of the signing above) and verifies the others
        cpu.append((c1 - c0) / n_nodes + c2 - c1)
        wall.append((w1 - w0) / n_nodes + w2 - w1)
    return statistics.median(cpu), statistics.median(wall)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--sizes", type=int, nargs="+", default=sorted(HIDDEN),
                    choices=sorted(HIDDEN))
    ap.add_argument("--samples", type=int, default=640, help="samples per node (80 %% train)")
    ap.add_argument("--repeats", type=int, default=3, help="measured rounds per mode")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--jl-hidden", type=int, default=64, help="0 skips Joye-Libert")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier "
                    "timings on a shared machine)")
    ap.add_argument("--jl-key-size", type=int, default=2048)
    args = ap.parse_args(argv)
    if args.nodes < 5:
        ap.error(f"--nodes must be at least 5 (2 drop-outs must leave the default threshold "
                 f"n // 2 + 1 of survivors). Received {args.nodes}.")
    logging.getLogger("fedcore").setLevel(logging.ERROR)  # the drop-outs' warnings
    torch.set_num_threads(args.threads)
    print(f"{args.nodes} simulated nodes, torch on {args.threads} thread(s), medians of "
          f"{args.repeats} rounds per mode, modes taking turns.\n"
          "  rest: round - nodes' work - protect (messages, codec, the researcher's "
          "aggregation and unmasking)\n"
          "  researcher: the researcher's secure-aggregation work (folding the masked "
          "payloads, unmasking, decoding), within the rest\n"
          "  precompute: CPU time of a node's mask thread, run while it trains\n"
          "  protect/node: protect after training (wall, any wait for the thread included);"
          " (after): without that wait\n"
          "  exch./node: CPU time of one node's answers to the setup, share and unmask "
          "exchanges, median\n"
          "  fed. est.: (one node's work, its precompute overlapped when a core is spare or "
          "added when none is, + (after) + the rest) / plain's, as if the nodes worked in "
          "parallel (network transfer not included): in the rest, each exchange counts its "
          "slowest node's answer, not all ten one after another; with a precomputation the "
          "rest is the direct mode's (+ the extra researcher work): simulated, the rest also "
          "holds the other nodes' mask threads\n"
          "  (serial exch.): the spare-core estimate with the nodes' answers one after "
          "another, as this script computed it before")
    cpu, wall = round_key_signatures(args.nodes)
    print(f"\nSigned round keys: {cpu * 1e3:.2f} ms of CPU per node per round ({wall * 1e3:.2f}"
          f" ms wall on this machine now; {args.nodes} nodes: 1 Ed25519 signature + "
          f"{args.nodes - 1} verifications; target <= 5 ms: "
          f"{'met' if cpu <= 0.005 else 'missed'})")
    for size in args.sizes:
        hidden = HIDDEN[size]
        for workload in args.workloads:
            res = compare(args.nodes, args.samples, FEATURES, hidden, workload, args.repeats)
            report(n_params(FEATURES, hidden), workload, res, args.nodes, args.samples)
    if args.jl_hidden:
        joye_libert(args.nodes, args.samples, args.jl_hidden, args.jl_key_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
