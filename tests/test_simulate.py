from __future__ import annotations

import gc
import os

import numpy as np
import pandas as pd
import pytest

from fedcore import simulate
from fedcore.data import ArrayDataset, TabularDataset
from fedcore.errors import ConfigurationError


def test_iid_partition_covers_every_sample_once_in_equal_shares():
    y = np.repeat(np.arange(4), 50)
    parts = simulate.partition(y, 5, seed=3)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(200))
    assert [len(p) for p in parts] == [40] * 5
    assert all(np.array_equal(a, b) for a, b in zip(parts, simulate.partition(y, 5, seed=3),
                                                    strict=True))


def test_dirichlet_partition_skews_labels_more_as_alpha_shrinks():
    y = np.repeat(np.arange(10), 100)

    def skew(alpha):
        parts = simulate.partition(y, 5, scheme="dirichlet", alpha=alpha, seed=0)
        assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
        # mean share of each node's most common label
        return np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts])

    assert skew(0.1) > 0.4 > 0.15 > skew(1000.0)


def test_partition_errors_are_explained():
    with pytest.raises(ConfigurationError, match="scheme must be"):
        simulate.partition(np.zeros(10), 2, scheme="random")
    with pytest.raises(ConfigurationError, match="Cannot give 20 nodes"):
        simulate.partition(np.zeros(10), 20)


def test_each_virtual_hospital_is_a_real_node_with_its_own_files(tmp_path):
    X, y = np.arange(40.0).reshape(20, 2), np.arange(20) % 2
    with simulate.from_arrays(X, y, n_nodes=2, tags=["t"], root=tmp_path) as fed:
        assert fed.url.startswith("inproc://")
        homes = sorted(p.name for p in tmp_path.iterdir())
        assert homes == ["node-01", "node-02"]
        for node in fed.nodes:
            (entry,) = node.datasets.list()
            assert (node.home / "db.json").exists() and entry["kind"] == "npz"
        ds = fed.nodes[0].datasets.load(fed.nodes[0].datasets.list()[0]["id"])
        assert isinstance(ds, ArrayDataset) and len(ds) == 10
    assert tmp_path.exists()  # a root the caller gave is kept


def test_simulated_nodes_start_serving_once_every_home_holds_its_data(tmp_path):
    # from_arrays and from_dataframe build every node and its dataset, then start them all:
    # each node records its dataset, then that it started, and answers the search.
    import fedcore

    X, y = np.arange(60.0).reshape(30, 2), np.arange(30) % 2
    frame = pd.DataFrame({"a": X[:, 0], "b": X[:, 1], "label": y})
    for make in (lambda root: simulate.from_arrays(X, y, n_nodes=3, tags=["t"], root=root),
                 lambda root: simulate.from_dataframe(frame, target="label", n_nodes=3,
                                                      tags=["t"], root=root)):
        root = tmp_path / str(id(make))
        with make(root) as fed:
            session = fedcore.Federation(fed.url)
            try:
                assert sorted(session.search(["t"])["node"]) == ["node-01", "node-02",
                                                                 "node-03"]
            finally:
                session.close()
            for node in fed.nodes:
                events = [e["event"] for e in node.audit_log()]
                assert events[:3] == ["dataset-added", "started", "search"], events


def test_a_simulation_whose_data_a_node_refuses_leaves_no_node_serving(tmp_path):
    from fedcore._runtime import loop
    from fedcore.errors import DatasetError

    def serving() -> int:
        return sum(1 for t in __import__("asyncio").all_tasks(loop())
                   if "serve" in repr(t.get_coro()))

    before = serving()
    X = np.array([[object()]] * 4, dtype=object)  # a node refuses arrays of objects
    with pytest.raises(DatasetError, match="Python objects"):
        simulate.from_arrays(X, np.zeros(4), n_nodes=2, tags=["t"], root=tmp_path)
    assert serving() == before
    held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [p for p in held if p.startswith(str(tmp_path))]  # no audit log left open


def test_a_simulation_freezes_its_setup_for_the_collector_until_it_closes(tmp_path):
    X, y = np.arange(40.0).reshape(20, 2), np.arange(20) % 2
    assert gc.get_freeze_count() == 0
    with simulate.from_arrays(X, y, n_nodes=2, tags=["t"], root=tmp_path / "a") as fed:
        assert gc.get_freeze_count() > 0  # full collections in rounds skip the setup
        # A second federation open meanwhile leaves the first one's freeze alone.
        with simulate.from_arrays(X, y, n_nodes=2, tags=["t"], root=tmp_path / "b"):
            pass
        assert gc.get_freeze_count() > 0
        fed.freeze_setup()  # again: no effect
    assert gc.get_freeze_count() == 0  # close gives the objects back to the collector


def test_a_simulation_collects_young_objects_less_often_until_it_closes(tmp_path):
    X, y = np.arange(40.0).reshape(20, 2), np.arange(20) % 2
    before = gc.get_threshold()
    assert before[0] < simulate.YOUNG_THRESHOLD  # Python's default, 700
    with simulate.from_arrays(X, y, n_nodes=2, tags=["t"], root=tmp_path / "a"):
        assert gc.get_threshold() == (simulate.YOUNG_THRESHOLD, *before[1:])
    assert gc.get_threshold() == before  # restored at close
    try:  # a threshold the process changed meanwhile is the process's: close keeps it
        with simulate.from_arrays(X, y, n_nodes=2, tags=["t"], root=tmp_path / "b"):
            gc.set_threshold(50_000, *before[1:])
        assert gc.get_threshold() == (50_000, *before[1:])
        # ...and one already higher is left as it is.
        with simulate.from_arrays(X, y, n_nodes=2, tags=["t"], root=tmp_path / "c"):
            assert gc.get_threshold() == (50_000, *before[1:])
        assert gc.get_threshold() == (50_000, *before[1:])
    finally:
        gc.set_threshold(*before)


def test_a_larger_federation_collects_young_objects_less_often(tmp_path, monkeypatch):
    # The threshold grows with the federation (YOUNG_PER_NODE per node, here made large so
    # that three nodes show it), and close restores Python's own.
    X, y = np.arange(60.0).reshape(30, 2), np.arange(30) % 2
    before = gc.get_threshold()
    monkeypatch.setattr(simulate, "YOUNG_PER_NODE", 7_000)
    try:
        with simulate.from_arrays(X, y, n_nodes=3, tags=["t"], root=tmp_path / "a"):
            assert gc.get_threshold() == (21_000, *before[1:])
        assert gc.get_threshold() == before
        with simulate.from_arrays(X, y, n_nodes=1, tags=["t"], root=tmp_path / "b"):
            assert gc.get_threshold() == (simulate.YOUNG_THRESHOLD, *before[1:])  # the floor
        assert gc.get_threshold() == before
    finally:
        gc.set_threshold(*before)


def test_a_simulation_leaves_the_process_own_freeze_alone(tmp_path):
    X, y = np.arange(40.0).reshape(20, 2), np.arange(20) % 2
    mine: list[object] = []
    mine.append(mine)
    gc.freeze()  # e.g. a server that freezes its heap before forking workers
    try:
        with simulate.from_arrays(X, y, n_nodes=2, tags=["t"], root=tmp_path):
            pass
        assert not any(obj is mine for obj in gc.get_objects())  # still frozen
    finally:
        gc.unfreeze()


def test_dataset_split_is_reproducible_and_disjoint():
    ds = ArrayDataset(np.arange(100).reshape(50, 2), np.arange(50))
    train, test = ds.split(0.2, seed=1)
    train2, test2 = ds.split(0.2, seed=1)
    assert len(test) == 10 and len(train) == 40
    assert np.array_equal(test.indices, test2.indices)
    assert not set(train.indices) & set(test.indices)
    X, y = test.arrays()
    assert np.array_equal(X[:, 0] // 2, y)
    assert test.metadata()["n_samples"] == 10


def test_dataset_split_keeps_its_samples_whether_or_not_a_side_is_empty():
    """The split of a release: the seeded permutation's tail trains, its head tests."""
    for n, ratio in [(1, 0.0), (1, 0.5), (1, 0.6), (2, 0.0), (2, 0.2), (7, 0.0), (7, 0.3),
                     (50, 0.99), (50, 0.0)]:
        ds = ArrayDataset(np.arange(2 * n).reshape(n, 2), np.arange(n))
        train, test = ds.split(ratio, seed=3)
        order = np.random.default_rng(3).permutation(n)
        n_test = len(test)
        assert n_test == (min(max(round(n * ratio), 1), n - 1) if ratio and n > 1
                          else round(n * ratio))
        assert train.indices.tolist() == sorted(order[n_test:].tolist())
        assert test.indices.tolist() == sorted(order[:n_test].tolist())
        assert train.indices.dtype == test.indices.dtype == np.int64
        assert np.array_equal(train.arrays()[1], np.sort(order[n_test:]))


def test_tabular_dataset_selects_columns_and_explains_mistakes(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b,label\n1,2.5,x\n3,4.5,y\n")
    ds = TabularDataset(path)
    X, y = ds.arrays(target="label")
    assert X.tolist() == [[1, 2.5], [3, 4.5]] and y.tolist() == ["x", "y"]
    X, _ = ds.arrays(features=["b"], target="label")
    assert X.shape == (2, 1)
    with pytest.raises(ConfigurationError, match=r"Columns \['c'\] are not in the dataset"):
        ds.arrays(features=["c"])
    assert ds.metadata()["categories"]["label"] == ["x", "y"]


def test_a_simulation_warms_its_backends_before_the_first_round(tmp_path):
    """torch imports torch._dynamo with a process's first optimizer (~1 s): a simulation of a
    process that imported the torch backend does it while it sets up, not in round 1."""
    pytest.importorskip("torch")
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, fedcore_torch\n"
        "from fedcore import simulate\n"
        "X, y = np.arange(40.0).reshape(20, 2), np.arange(20) % 2\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        f"with simulate.from_arrays(X, y, n_nodes=2, tags=['t'], root={str(tmp_path)!r}):\n"
        "    print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True)
    assert out.stdout.strip() == "True"


def _count_fsync(monkeypatch):
    calls: list[int] = []
    real = os.fsync

    def counting(fd):
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_a_temporary_simulation_does_not_fsync_and_a_root_of_yours_does(tmp_path, monkeypatch):
    X, y = np.arange(40.0).reshape(20, 2), np.arange(20) % 2
    fsyncs = _count_fsync(monkeypatch)
    with simulate.from_arrays(X, y, n_nodes=2, tags=["t"]) as fed:
        assert fed.durable is False and not any(n.durable for n in fed.nodes)
        fed.nodes[0].set_policy(max_epochs=3)  # a change after the setup, too
        assert fed.nodes[0].verify_audit()  # every file written whole, records in place
    assert fsyncs == []
    with simulate.from_arrays(X, y, n_nodes=2, tags=["t"], root=tmp_path / "kept") as fed:
        assert fed.durable is True
        fed.nodes[0].set_policy(max_epochs=3)
    # Per node: config.toml, db.json and the audit log of its dataset; then the policy.
    assert len(fsyncs) >= 2 * 3 + 3
    fsyncs.clear()
    with simulate.from_arrays(X, y, n_nodes=2, tags=["t"], root=tmp_path / "mine",
                              durable=False) as fed:
        assert fed.durable is False
    assert fsyncs == []
    frame = pd.DataFrame({"a": np.arange(20.0), "t": np.arange(20) % 2})
    with simulate.from_dataframe(frame, target="t", n_nodes=2, tags=["t"]):
        pass
    assert fsyncs == []
    with simulate.from_dataframe(frame, target="t", n_nodes=2, tags=["t"],
                                 root=tmp_path / "csv"):
        pass
    assert len(fsyncs) >= 2 * 3
