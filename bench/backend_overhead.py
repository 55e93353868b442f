"""Per-backend cost of ParameterSet conversion, and per-round framework overhead.

    python bench/backend_overhead.py [--params 100] [--repeats 5]

1. Conversion of a large model (``--params`` million float32 parameters in 10 layers) to
   and from a ParameterSet, per backend, against ``np.copyto`` of the same bytes (memcpy
   speed: one copy) and ``np.array`` (one copy into new memory). Target: at most one copy,
   at memcpy speed. The framework's own bare calls are timed too, as its floor.
2. One round of local training of the digits MLP (64-32-10, 1 epoch, batch 32, on 1437
   samples) through the plan (set_parameters + fit + get_parameters) against the same
   training in each framework's own serial loop. Target: <= 1.3x.
Medians of ``--repeats`` runs after a warm-up (the per-round table: of 5 x ``--repeats``
runs, alternating the plan's round and the framework's own loop).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import timed  # noqa: E402

from fedcore.data import ArrayDataset  # noqa: E402
from fedcore.params import ParameterSet  # noqa: E402

HAVE = {m: importlib.util.find_spec(m) is not None for m in ("torch", "tensorflow", "jax")}
LAYERS = 10
ROUND_FACTOR = 5  # the per-round table runs 5 x --repeats rounds of each, alternately


def conversion(n_params: int, repeats: int) -> None:
    per = n_params // LAYERS
    rows = per // 1000
    nbytes = LAYERS * rows * 1000 * 4
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    memcpy, _ = timed(lambda: np.copyto(dst, src), repeats)
    # Loading parameters into an immutable (JAX) or freshly adopted (TF) buffer writes new
    # memory: the page faults of a fresh allocation are part of any such copy.
    fresh, _ = timed(lambda: np.array(src), repeats)
    print(f"model: {LAYERS * rows * 1000 / 1e6:.0f}M float32 parameters, {nbytes / 1e6:.0f} MB; "
          f"np.copyto: {memcpy * 1e3:.0f} ms ({nbytes / memcpy / 1e9:.1f} GB/s); "
          f"np.array (into new memory): {fresh * 1e3:.0f} ms ({fresh / memcpy:.2f}x)")
    print(f"{'backend':30} {'get ms':>8} {'get/memcpy':>10} {'set ms':>8} {'set/memcpy':>10}")

    def report(name: str, get: float, set_: float) -> None:
        print(f"{name:30} {get * 1e3:8.1f} {get / memcpy:10.2f} {set_ * 1e3:8.1f} "
              f"{set_ / memcpy:10.2f}")

    if HAVE["torch"]:
        import torch

        from fedcore_torch import convert as tc

        model = torch.nn.Sequential(*[torch.nn.Linear(1000, rows, bias=False)
                                      for _ in range(LAYERS)])
        received = ParameterSet((k, np.ones(v.shape, np.float32))
                                for k, v in tc.get_parameters(model).items())
        get, _ = timed(lambda: tc.get_parameters(model), repeats)
        set_, _ = timed(lambda: tc.set_parameters(model, received), repeats)
        report("torch", get, set_)
        del model
    if HAVE["tensorflow"]:
        import tensorflow as tf

        from fedcore_tf import convert as kc

        # Dense layers alternating 1000 -> rows -> 1000: every kernel holds rows x 1000.
        model = tf.keras.Sequential([tf.keras.Input((1000,))] + [
            tf.keras.layers.Dense(rows if i % 2 == 0 else 1000, use_bias=False,
                                  kernel_initializer="zeros") for i in range(LAYERS)])
        received = ParameterSet((k, np.ones(v.shape, np.float32))
                                for k, v in kc.get_parameters(model).items())
        get, _ = timed(lambda: kc.get_parameters(model), repeats)
        set_, _ = timed(lambda: kc.set_parameters(model, received), repeats)
        report("tf", get, set_)
        # TensorFlow's own ways: variable.numpy() and variable.assign(array), bare.
        variables = [w for _, w in kc.named_weights(model)]
        arrays = list(received.values())
        get, _ = timed(lambda: [w.numpy() for w in variables], repeats)
        set_, _ = timed(lambda: [w.assign(a) for w, a in zip(variables, arrays, strict=True)],
                        repeats)
        report("  tf bare numpy() / assign()", get, set_)
        del model, variables
    if HAVE["jax"]:
        import jax
        import jax.numpy as jnp

        from fedcore_jax import convert as jc

        tree = {"layers": [jnp.zeros((1000, rows), jnp.float32) for _ in range(LAYERS)]}
        received = ParameterSet((k, np.ones(v.shape, np.float32))
                                for k, v in jc.get_parameters(tree).items())
        get, _ = timed(lambda: jc.get_parameters(tree), repeats)
        # block_until_ready: JAX dispatches asynchronously; the copy must be done.
        set_, _ = timed(lambda: jax.block_until_ready(jc.set_parameters(tree, received)),
                        repeats)
        report("jax", get, set_)
        arrays = list(received.values())
        get, _ = timed(lambda: [np.asarray(a) for a in tree["layers"]], repeats)
        set_, _ = timed(lambda: jax.block_until_ready(jax.device_put(arrays)), repeats)
        report("  jax bare asarray / device_put", get, set_)


def interleaved(ours: Callable[[], object], base: Callable[[], object], repeats: int
                ) -> tuple[float, float]:
    """Median seconds of ``ours`` and of ``base``, run alternately (after a warm-up each).

    A round takes milliseconds: alternating the two, many times, keeps a burst of load
    on a shared machine from landing on one side only.
    """
    ours()
    base()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((ours, times[0]), (base, times[1])):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return statistics.median(times[0]), statistics.median(times[1])


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return (X / 16.0).astype(np.float32), y


def overhead(repeats: int) -> None:
    X, y = digits()
    ds = ArrayDataset(X, y)
    info = {**ds.metadata(), "categories": {"target": list(range(10))}}
    args = {"epochs": 1, "batch_size": 32, "lr": 0.1}
    print(f"\n{'backend':8} {'plan round ms':>14} {'own loop ms':>12} {'ratio':>6}")

    def run(name: str, plan: object, own) -> None:
        params = plan.get_parameters().copy()  # type: ignore[attr-defined]

        def round_() -> None:
            plan.set_parameters(params)  # type: ignore[attr-defined]
            plan.fit(ds, seed=0)  # type: ignore[attr-defined]
            plan.get_parameters()  # type: ignore[attr-defined]

        ours, base = interleaved(round_, own, ROUND_FACTOR * repeats)
        print(f"{name:8} {ours * 1e3:14.1f} {base * 1e3:12.1f} {ours / base:6.2f}")

    for key, label, pair in (("torch", "torch", _torch_pair), ("tensorflow", "tf", _keras_pair),
                             ("jax", "jax", _jax_pair)):
        if HAVE[key]:
            run(label, *pair(X, y, args, info))


def _torch_pair(X: np.ndarray, y: np.ndarray, args: dict, info: dict) -> tuple:
    """The torch plan and the same training written in plain torch."""
    import torch
    import torch.nn.functional as F

    from fedcore_torch import TorchTrainingPlan

    torch.set_num_threads(1)

    class TorchDigits(TorchTrainingPlan):
        def init_model(self):
            return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                       torch.nn.Linear(32, 10))

        def training_step(self, data, target):
            return F.cross_entropy(self.model(data), target)

    plan = TorchDigits({}, args, info)
    plan.build(0)
    model = plan.init_model()
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)

    def own_torch() -> None:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        order = torch.randperm(len(Xt))
        for s in range(0, len(Xt), 32):
            idx = order[s:s + 32]
            opt.zero_grad()
            F.cross_entropy(model(Xt[idx]), yt[idx]).backward()
            opt.step()

    return plan, own_torch


def _keras_pair(X: np.ndarray, y: np.ndarray, args: dict, info: dict) -> tuple:
    """The Keras plan and the same training written with model.fit."""
    import tensorflow as tf

    from fedcore_tf import KerasTrainingPlan

    class KerasDigits(KerasTrainingPlan):
        def init_model(self):
            return tf.keras.Sequential([tf.keras.Input((64,)),
                                        tf.keras.layers.Dense(32, activation="relu"),
                                        tf.keras.layers.Dense(10)])

    plan = KerasDigits({}, args, info)
    plan.build(0)
    model = plan.init_model()
    model.compile(optimizer=tf.keras.optimizers.SGD(0.1),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def own_keras() -> None:
        model.fit(X, y, batch_size=32, epochs=1, shuffle=True, verbose=0)

    return plan, own_keras


def _jax_pair(X: np.ndarray, y: np.ndarray, args: dict, info: dict) -> tuple:
    """The JAX plan and the same training written in plain JAX and optax."""
    import jax
    import optax

    from fedcore_jax import JaxTrainingPlan, mlp

    class JaxDigits(JaxTrainingPlan):
        def init_model(self):
            return mlp([64, 32, 10], self.key)

    plan = JaxDigits({}, args, info)
    plan.build(0)
    apply_fn, params0 = mlp([64, 32, 10], jax.random.PRNGKey(0))
    tx = optax.sgd(0.1)
    yi = y.astype(np.int32)

    @jax.jit
    def step(params, state, xb, yb):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, xb),
                                                                   yb).mean()
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(0)

    def own_jax() -> None:
        params, state = params0, tx.init(params0)
        order = rng.permutation(len(X))
        for s in range(0, len(X), 32):
            idx = order[s:s + 32]
            params, state = step(params, state, X[idx], yi[idx])
        jax.block_until_ready(params)

    return plan, own_jax

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=100, help="million parameters")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    conversion(args.params * 1_000_000, args.repeats)
    overhead(args.repeats)


if __name__ == "__main__":
    main()
