from __future__ import annotations

import asyncio
import re

import numpy as np
import pandas as pd
import pytest

from fedcore import FederatedStatistics, _runtime, simulate
from fedcore.errors import ConfigurationError, GovernanceError
from fedcore.researcher.statistics import POOLED
from fedcore.transport import open_transport
from fedcore.wire import codec
from fedcore.wire.messages import Envelope, ErrorReply, Ping, Pong, StatsReply, StatsRequest
from tests._support.statistics import federation as _federation

SIZES = (500, 800, 1200, 300)


def _site(i, n, seed=0):
    """One hospital's table: an offset glucose column (hard on naive variance), NaNs, text."""
    rng = np.random.default_rng(seed + i)
    glucose = 1e6 + rng.normal(i, 1.0 + i, n)
    glucose[rng.random(n) < 0.05] = np.nan
    return pd.DataFrame({"age": rng.integers(18, 95, n), "glucose": glucose,
                         "sex": rng.choice(["F", "M"], n), "label": rng.integers(0, 2, n)})


@pytest.fixture
def sites():
    return [_site(i, n) for i, n in enumerate(SIZES)]


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


# min and max are off by default (each is one record's value): these nodes share them.
EXTREMES = "allow_min_max = true"
NO_SUPPRESSION = f"min_count = 0\n{EXTREMES}"


def test_pooled_statistics_equal_those_of_the_concatenated_data(tmp_path, sites):
    no_suppression = {f"node-{i:02d}": NO_SUPPRESSION for i in range(1, 5)}
    whole = pd.concat(sites, ignore_index=True)
    with _federation(tmp_path, sites, no_suppression) as fed, \
            FederatedStatistics(fed.url, ["cohort"]) as stats:
        table = stats.describe(["age", "glucose"])
        hist = stats.histogram("glucose", bins=12)
        edges = [20, 30.5, 50.2, 50.8, 80, 200]  # uneven, values below, an empty bin
        uneven = stats.histogram("age", bins=edges)
    for column in ("age", "glucose"):
        values = whole[column].dropna().to_numpy(dtype=float)
        pooled = table.loc[(column, POOLED)]
        assert pooled["count"] == len(values) and pooled["status"] == "ok"
        assert pooled["missing"] == whole[column].isna().sum()
        assert _rel(pooled["mean"], values.mean()) < 1e-9
        assert _rel(pooled["var"], values.var(ddof=1)) < 1e-9
        assert _rel(pooled["std"], values.std(ddof=1)) < 1e-9
        assert _rel(pooled["sum"], values.sum()) < 1e-9
        assert (pooled["min"], pooled["max"]) == (values.min(), values.max())
        for i, site in enumerate(sites):  # every node's own row is its own data's
            own = site[column].dropna().to_numpy(dtype=float)
            row = table.loc[(column, f"node-{i + 1:02d}")]
            assert row["count"] == len(own)
            assert _rel(row["mean"], own.mean()) < 1e-9
            assert _rel(row["var"], own.var(ddof=1)) < 1e-9
    glucose = whole["glucose"].dropna().to_numpy()
    expected, expected_edges = np.histogram(glucose, bins=12)
    np.testing.assert_array_equal(hist.edges, expected_edges)
    np.testing.assert_array_equal(hist.pooled, expected)
    for i, site in enumerate(sites):
        own = np.histogram(site["glucose"].dropna(), bins=expected_edges)[0]
        np.testing.assert_array_equal(hist.counts.loc[f"node-{i + 1:02d}"].to_numpy(int), own)
    np.testing.assert_array_equal(uneven.pooled, np.histogram(whole["age"], bins=edges)[0])
    assert uneven.totals.loc[POOLED, "below"] == (whole["age"] < 20).sum() > 0
    assert uneven.totals.loc[POOLED, "above"] == 0 == uneven.counts.iloc[:, 2].sum()
    assert uneven.totals.loc[POOLED, "count"] == len(whole)
    assert list(uneven.counts.columns.left) == edges[:-1]
    assert uneven.suppressed.empty and (uneven.notes == "").all()


def test_quantiles_come_from_the_pooled_histogram_within_one_bin(tmp_path, sites):
    whole = pd.concat(sites, ignore_index=True)["glucose"].dropna().to_numpy()
    no_suppression = {f"node-{i:02d}": NO_SUPPRESSION for i in range(1, 5)}
    qs = [0.0, 0.05, 0.5, 0.9, 1.0]
    with _federation(tmp_path, sites, no_suppression) as fed, \
            FederatedStatistics(fed.url, "cohort") as stats:
        table = stats.quantiles("glucose", qs, bins=200)
    width = (whole.max() - whole.min()) / 200
    assert list(table.columns) == ["0%", "5%", "50%", "90%", "100%", "note"]
    estimate = table.loc[POOLED, ["0%", "5%", "50%", "90%", "100%"]].to_numpy(float)
    assert np.all(np.abs(estimate - np.quantile(whole, qs)) <= width)
    assert estimate[0] == whole.min() and estimate[-1] == whole.max()
    own = sites[3]["glucose"].dropna().to_numpy()
    assert abs(table.loc["node-04", "50%"] - np.median(own)) <= width


def test_small_cells_are_withheld_reported_and_left_out_of_pooled_results(tmp_path, sites):
    sites[1].loc[:2, "age"] = 200  # three very old patients at node-02: a small cell
    tiny = sites[3].iloc[:3]  # node-04 has three patients: everything it has is small
    edges = [0, 50, 100, 150, 250]
    with _federation(tmp_path, [*sites[:3], tiny]) as fed, \
            FederatedStatistics(fed.url, "cohort") as stats:
        table = stats.describe("age")
        hist = stats.histogram("age", bins=edges)
        audit = fed.nodes[1].audit_log()
    # node-04 withholds the whole column; the pooled row says it excludes it.
    row = table.loc[("age", "node-04")]
    assert row["status"] == "suppressed" and pd.isna(row["count"]) and np.isnan(row["mean"])
    assert "fewer than 5 values" in row["note"]
    pooled = table.loc[("age", POOLED)]
    assert pooled["count"] == sum(len(s) for s in sites[:3])
    assert "excludes node-04 (suppressed)" in pooled["note"]
    kept = pd.concat(sites[:3])["age"]
    assert _rel(pooled["mean"], kept.mean()) < 1e-9
    # node-02's cell [150, 250) holds 3 (< 5): withheld, with one more cell so that the
    # withheld total (count minus what is published) does not reveal it. Neither is named:
    # both read as 0, and only their number is told.
    counts = hist.counts.loc["node-02"]
    assert counts.iloc[3] == 0 and not counts.isna().any()
    own = np.histogram(sites[1]["age"], bins=edges)[0]
    assert (counts.to_numpy(int) != own).sum() == 2  # two cells zeroed, unnamed
    row = hist.suppressed[hist.suppressed["node"] == "node-02"].iloc[0]
    assert row["cells"] == 2 and "not named" in row["reason"]
    node2_age = sites[1]["age"].to_numpy()
    assert len(node2_age) - counts.sum() >= 5  # what cannot be told apart
    assert hist.counts.loc["node-04"].isna().all()
    published = hist.counts.drop(POOLED).fillna(0).sum().to_numpy(int)
    np.testing.assert_array_equal(hist.pooled, published)
    assert "node-02" in hist.notes[POOLED] and "node-04 (suppressed)" in hist.notes[POOLED]
    hidden = hist.totals.loc["node-02", "withheld"]
    assert hidden == len(node2_age) - counts.sum() == row["values"]
    assert hist.totals.loc[POOLED, "withheld"] == hidden
    assert hist.notes["node-02"] == (f"2 small cell(s) withheld ({hidden} values, not "
                                     "located: they read as 0)")
    answered = [e for e in audit if e["event"] == "statistics"]
    assert any("age:bin[3]" in e["withheld"] for e in answered)
    assert all(e["min_count"] == 5 for e in answered)


def test_node_policy_refuses_or_withholds_extremes(tmp_path, sites):
    configs = {"node-01": EXTREMES, "node-02": "statistics = false",
               "node-03": "allow_min_max = false", "node-04": "min_samples = 100000"}
    with _federation(tmp_path, sites, configs) as fed, \
            FederatedStatistics(fed.url, "cohort") as stats:
        table = stats.describe("age")
        with pytest.raises(ConfigurationError, match=r"nodes \['node-03'\] withhold its min "
                                                     r"and max\. Pass range="):
            stats.histogram("age", bins=5)
        hist = stats.histogram("age", bins=5, range=(0, 100))  # an explicit range works
        refusals = [e for e in fed.nodes[1].audit_log() if e["event"] == "statistics-refused"]
    refused = table.loc[("age", "node-02")]
    assert refused["status"] == "refused" and "statistics = false" in refused["note"]
    assert "governance" in refused["note"]
    no_extremes = table.loc[("age", "node-03")]
    assert no_extremes["status"] == "ok" and np.isnan(no_extremes["max"])
    assert no_extremes["note"] == "min/max withheld by node policy"
    too_small = table.loc[("age", "node-04")]  # the governance chain's minimum samples
    assert too_small["status"] == "refused" and "100000" in too_small["note"]
    pooled = table.loc[("age", POOLED)]
    assert pooled["count"] == SIZES[0] + SIZES[2]
    assert np.isnan(pooled["min"]) and "excludes node-02 (refused)" in pooled["note"]
    assert "min/max withheld" in pooled["note"]
    assert hist.counts.loc["node-02"].isna().all() and "statistics = false" in hist.notes[
        "node-02"]
    assert len(refusals) == 4 and refusals[0]["queries"][0]["variable"] == "age"


def test_a_node_whose_data_vanished_is_left_out_of_pooled_results(tmp_path, sites, caplog):
    extremes = {f"node-{i:02d}": EXTREMES for i in range(1, 4)}
    with _federation(tmp_path, sites[:3], extremes) as fed, \
            FederatedStatistics(fed.url, "cohort") as stats:
        assert list(stats.search()["node"]) == ["node-01", "node-02", "node-03"]
        (tmp_path / "node-03.csv").unlink()
        table = stats.describe("age")
    row = table.loc[("age", "node-03")]
    assert row["status"] == "failed" and "unavailable" in row["note"]
    assert "(dataset error)" in row["note"]
    pooled = table.loc[("age", POOLED)]
    assert pooled["count"] == SIZES[0] + SIZES[1]
    assert pooled["note"] == "excludes node-03 (failed)"
    assert "node-03 gave no statistics" in caplog.text


def test_every_node_refusing_raises_a_governance_error(tmp_path, sites):
    configs = {"node-01": "statistics = false", "node-02": 'min_count = "five"'}
    with _federation(tmp_path, sites[:2], configs) as fed, \
            FederatedStatistics(fed.url, "cohort") as stats:
        with pytest.raises(GovernanceError, match="Every node refused") as info:
            stats.describe("age")
    # a malformed policy fails closed, and says which key to fix
    assert "min_count must be" in str(info.value) and "'five'" in str(info.value)


@pytest.mark.parametrize("call, message", [
    (lambda s: s.describe("weight"), r"Column 'weight' is not in the dataset\. Numeric "
                                     r"columns: \['age', 'glucose', 'label'\] \(node-01"),
    (lambda s: s.describe(["age", "sex"]), r"Column 'sex' holds .* values, not numbers"),
    (lambda s: s.histogram("age", bins=[5, 3, 9]), r"bins must be finite and strictly "
                                                   r"increasing\. Received: \[5, 3, 9\]"),
    (lambda s: s.histogram("age", bins=0), r"bins must be between 1 and"),
    (lambda s: s.histogram("age", bins="ten"), r"bins must be a number of bins or a list"),
    (lambda s: s.histogram("age", bins=[1.0, float("nan")]), r"bins must be finite"),
    (lambda s: s.histogram("age", bins=4, range=(9, 1)), r"range must be finite with low < "
                                                         r"high\. Received: range=\(9, 1\)"),
    (lambda s: s.histogram("age", bins=[0, 1], range=(0, 1)), r"range applies when bins is"),
    (lambda s: s.quantiles("age", [0.5, 2]), r"q must be quantiles between 0 and 1"),
    (lambda s: s.describe([]), r"Expected variable names"),
])
def test_bad_requests_are_explained_and_nodes_keep_serving(tmp_path, sites, call, message):
    with _federation(tmp_path, sites[:2]) as fed, \
            FederatedStatistics(fed.url, "cohort") as stats:
        with pytest.raises(ConfigurationError, match=message):
            call(stats)
        assert stats.describe("age").loc[("age", POOLED), "count"] == SIZES[0] + SIZES[1]


def test_statistics_work_inside_a_running_event_loop(tmp_path, sites):
    async def notebook_cell(url):
        stats = FederatedStatistics(url, "cohort")
        table = await stats.adescribe("age")
        hist = await stats.ahistogram("age", bins=3)
        median = await stats.aquantiles("age", 0.5)
        again = stats.describe("age")  # the synchronous API, as typed in a Jupyter cell
        await stats.aclose()
        return table, hist, median, again

    with _federation(tmp_path, sites[:2], dict.fromkeys(["node-01", "node-02"], EXTREMES)
                     ) as fed:
        table, hist, median, again = asyncio.run(notebook_cell(fed.url))
    assert table.equals(again) and table.loc[("age", POOLED), "count"] == sum(SIZES[:2])
    assert hist.pooled.sum() == sum(SIZES[:2]) and list(median.columns) == ["50%", "note"]


def test_a_malformed_request_is_refused_by_the_node_itself(tmp_path, sites):
    """What a researcher-side check would stop still gets a clear ErrorReply from the node."""
    with _federation(tmp_path, sites[:1]) as fed:
        dataset = fed.nodes[0].datasets.list()[0]["id"]
        bad = [
            [{"variable": "age", "edges": np.array([3.0, 1.0])}],
            [{"variable": "age", "shift": float("inf")}],
            [{"variable": "", "min_max": True}],
            [{"variable": "age", "min_max": "yes"}],
            [],
        ]
        bodies = [StatsRequest(dataset_id=dataset, queries=q) for q in bad]
        bodies += [StatsRequest(dataset_id="ds-nope", queries=[{"variable": "age"}]),
                   StatsRequest(dataset_id=dataset, queries=[{"variable": "age"}]), Ping()]
        replies = _talk(fed.url, "node-01", bodies)
        events = [e["event"] for e in fed.nodes[0].audit_log()]
    messages = [r.message if isinstance(r, ErrorReply) else None for r in replies]
    assert [r.kind for r in replies[:5]] == ["configuration"] * 5
    assert "Query 0 ('age'): 'edges' must be finite and strictly increasing" in messages[0]
    assert "'shift' must be a finite number" in messages[1]
    assert "'variable' must be a non-empty string" in messages[2]
    assert "'min_max' must be true or false" in messages[3]
    assert "1 to 256 queries" in messages[4]
    assert replies[5].kind == "dataset" and "ds-nope" in messages[5]
    ok = replies[6]
    assert isinstance(ok, StatsReply) and ok.results[0]["additive"]["count"] == (
        sites[0]["age"].notna().sum())
    assert isinstance(replies[7], Pong)
    assert events.count("statistics-invalid") == 5 and events.count("statistics-failed") == 1


def _talk(url, node, bodies):
    async def go():
        t = open_transport(url, role="researcher", identity="raw-researcher")
        await t.start()
        out = []
        try:
            for body in bodies:
                await t.send(node, codec.encode(Envelope(body, sender="raw-researcher",
                                                         recipient=node)))
                _, frame = await asyncio.wait_for(t.receive(), 10)
                out.append(codec.decode(frame).body)
        finally:
            await t.close()
        return out

    return _runtime.run(go())


def _imaging_federation(tmp_path, subjects, configs=None):
    """Hospitals with a synthetic medical folder each; returns it and every T1/T2 volume."""
    from fedcore.data import MedicalFolderDataset, synthetic

    fed = simulate.SimulatedFederation(root=tmp_path / "fed")
    volumes = {"T1": [], "T2": []}
    for i, n in enumerate(subjects):
        node_id = f"node-{i + 1:02d}"
        (fed.root / node_id).mkdir(parents=True)
        extra = (configs or {}).get(node_id, "")
        (fed.root / node_id / "config.toml").write_text(f'node_id = "{node_id}"\n{extra}\n')
        site = synthetic.medical_folder(tmp_path / f"site{i}", n_subjects=n, shape=(6, 7, 8),
                                        seed=i, first_subject=100 * i + 1)
        fed.add_node(node_id).datasets.add(f"mri-{i}", ["mri"], site.root,
                                           kind="medical-folder",
                                           options=site.register_options())
        local = MedicalFolderDataset(site.root, **site.register_options())
        for modality, found in volumes.items():
            found.extend(local.iter_volumes(modality))
    return fed, {m: np.concatenate([v.ravel() for v in vs]) for m, vs in volumes.items()}


def test_image_intensities_per_modality_pool_exactly(tmp_path):
    pytest.importorskip("nibabel")
    no_suppression = {f"node-{i:02d}": NO_SUPPRESSION for i in range(1, 4)}
    fed, voxels = _imaging_federation(tmp_path, [4, 6, 5], no_suppression)
    with fed, FederatedStatistics(fed.url, "mri") as stats:
        table = stats.describe(["T1", "T2", "age"])  # modalities and demographics
        hist = stats.histogram("T1", bins=25)
        with pytest.raises(ConfigurationError, match=r"'FLAIR' is neither a modality nor a "
                                                     r"column.*Modalities: \['T1', 'T2'\]"):
            stats.describe("FLAIR")
    for modality, values in voxels.items():
        values = values.astype(np.float64)
        pooled = table.loc[(modality, POOLED)]
        assert pooled["count"] == values.size == 15 * 6 * 7 * 8
        assert _rel(pooled["mean"], values.mean()) < 1e-6
        assert _rel(pooled["var"], values.var(ddof=1)) < 1e-6
        assert (pooled["min"], pooled["max"]) == (values.min(), values.max())
    assert table.loc[("T1", "node-02"), "count"] == 6 * 6 * 7 * 8
    assert table.loc[("age", POOLED), "count"] == 15
    expected, edges = np.histogram(voxels["T1"].astype(np.float64), bins=25)
    np.testing.assert_allclose(hist.edges, edges, rtol=1e-12)
    np.testing.assert_array_equal(hist.pooled, expected)


def test_a_site_with_few_subjects_withholds_their_images(tmp_path):
    pytest.importorskip("nibabel")
    fed, voxels = _imaging_federation(tmp_path, [8, 3])  # default policy: min_count = 5
    with fed, FederatedStatistics(fed.url, "mri") as stats:
        table = stats.describe("T1")
    small = table.loc[("T1", "node-02")]
    assert small["status"] == "suppressed" and small["note"] == "withheld: fewer than 5 images"
    assert table.loc[("T1", POOLED), "count"] == 8 * 6 * 7 * 8
    assert "excludes node-02 (suppressed)" in table.loc[("T1", POOLED), "note"]


def test_image_folder_intensities(tmp_path):
    pytest.importorskip("PIL")
    from fedcore.data import ImageFolderDataset, synthetic

    fed = simulate.SimulatedFederation(root=tmp_path / "fed")
    pixels = []
    for i in range(2):
        root = synthetic.image_folder(tmp_path / f"site{i}", n_per_class=5, seed=i)
        fed.add_node().datasets.add(f"img-{i}", ["skin"], root, kind="image-folder")
        pixels += [im.ravel() for im in ImageFolderDataset(root).iter_images()]
    values = np.concatenate(pixels).astype(np.float64)
    with fed, FederatedStatistics(fed.url, "skin") as stats:
        table = stats.describe("intensity")
        with pytest.raises(ConfigurationError, match="one variable, 'intensity'"):
            stats.describe("red")
    pooled = table.loc[("intensity", POOLED)]
    assert pooled["count"] == values.size
    assert _rel(pooled["mean"], values.mean()) < 1e-6
    assert _rel(pooled["var"], values.var(ddof=1)) < 1e-6


def test_an_experiment_gives_statistics_over_its_own_datasets(tmp_path, sites):
    from fedcore import Experiment
    from fedcore_sklearn import SklearnTrainingPlan

    class Plan(SklearnTrainingPlan):
        def init_model(self):
            from sklearn.linear_model import SGDClassifier

            return SGDClassifier()

    with _federation(tmp_path, sites) as fed:
        exp = Experiment(Plan, tags=["cohort"], federation=fed.url, nodes=["node-01", "node-03"],
                         progress=False)
        with exp.statistics() as stats:
            table = stats.describe("age")
    nodes = set(table.loc["age"].index) - {POOLED}
    assert nodes == {"node-01", "node-03"}
    assert table.loc[("age", POOLED), "count"] == SIZES[0] + SIZES[2]


def test_quantiles_are_given_only_where_withheld_cells_cannot_move_them(tmp_path, sites):
    sites[0].loc[:2, "age"] = 150  # three old patients at node-01: a withheld cell
    configs = {"node-01": EXTREMES, "node-02": EXTREMES}
    edges = [0, 50, 100, 200]
    with _federation(tmp_path, sites[:2], configs) as fed, \
            FederatedStatistics(fed.url, "cohort") as stats:
        table = stats.quantiles("age", [0.5, 0.99], bins=edges)
    # node-01 withholds its three (and, so that they cannot be told, the [0, 50) cell).
    # Wherever those values are, the median stays in [50, 100): its bin's centre is given.
    # The 99th percentile could be anywhere from 50 up: not given, and the note says why.
    whole = pd.concat(sites[:2])["age"].to_numpy()
    for node, values in ((POOLED, whole), ("node-01", sites[0]["age"].to_numpy())):
        assert table.loc[node, "50%"] == 75.0
        assert 50 <= np.median(values) < 100
        assert np.isnan(table.loc[node, "99%"])
        assert "99% not given" in table.loc[node, "note"]
        assert "leave it anywhere in [50, inf]" in table.loc[node, "note"]
        assert "50% not given" not in table.loc[node, "note"]
    own = sites[1]["age"].to_numpy()
    assert abs(table.loc["node-02", "50%"] - np.median(own)) <= 50


def test_a_histogram_too_fine_for_a_node_is_refused_there_only(tmp_path, sites):
    small = sites[3].iloc[:40]  # 40 values at node-02: at most 8 bins at min_count 5
    with _federation(tmp_path, [sites[0], small]) as fed, \
            FederatedStatistics(fed.url, "cohort") as stats:
        hist = stats.histogram("age", bins=20, range=(0, 100))
    assert "at most 8 bins here" in hist.notes["node-02"]
    assert hist.counts.loc["node-02"].isna().all()
    assert hist.totals.loc[POOLED, "count"] == SIZES[0]


def test_a_one_bin_histogram_counts_every_value_in_range(tmp_path, sites):
    """One bin is a count in a range (it used to fail while framing the rows)."""
    whole = pd.concat(sites[:2], ignore_index=True)["age"]
    with _federation(tmp_path, sites[:2]) as fed, \
            FederatedStatistics(fed.url, "cohort") as stats:
        hist = stats.histogram("age", bins=1, range=(0, 60))
    assert hist.counts.shape == (3, 1)
    # as in numpy, the last bin (here the only one) includes its right edge
    assert hist.pooled.tolist() == [int((whole <= 60).sum())]
    assert hist.totals.loc[POOLED, "above"] == int((whole > 60).sum())
    assert hist.counts.loc["node-01"].tolist() == [int((sites[0]["age"] <= 60).sum())]


def test_differentially_private_statistics_are_noised_and_charged(tmp_path, sites):
    configs = {f"node-0{i}": "dp_max_epsilon = 8.0" for i in (1, 2)}
    whole = pd.concat(sites[:2])["age"]
    with _federation(tmp_path, sites[:2], configs) as fed:
        with FederatedStatistics(fed.url, "cohort") as exact:
            with pytest.raises(GovernanceError, match="only with differential privacy"):
                exact.describe("age")
        with FederatedStatistics(fed.url, "cohort", privacy=True) as stats:
            table = stats.describe("age", bounds=(0, 120))
            hist = stats.histogram("age", bins=[0, 40, 80, 120])
        spent = [n.ledger.spent(n.datasets.list()[0]["id"])[0] for n in fed.nodes]
    pooled = table.loc[("age", POOLED)]
    assert abs(pooled["count"] - len(whole)) < 100  # noise sd 10 per node
    assert abs(pooled["mean"] - whole.mean()) < 5 and np.isnan(pooled["max"])
    assert "differentially private" in pooled["note"]
    assert abs(hist.pooled.sum() - len(whole)) < 150
    assert all(0 < s <= 8.0 for s in spent)  # two passes and a histogram, charged


def _interval(note, label):
    """The interval a quantile's note says it lies in."""
    match = re.search(rf"{re.escape(label)} not given: \d+ values in withheld cells leave it "
                      r"anywhere in \[([-0-9.e+inf]+), ([-0-9.e+inf]+)\]", note)
    assert match, note
    return float(match[1]), float(match[2])


def test_diabetes_quantiles_are_exact_to_the_bin_or_refused_with_where_they_lie(tmp_path):
    # The case: sklearn's 442-row diabetes table over three hospitals with the
    # default policy (min_count 5, no extremes). Quantiles used to come out biased (a median
    # of 84.4 against 140.5) where small cells were withheld, or all NaN with more bins.
    datasets = pytest.importorskip("sklearn.datasets")
    frame = datasets.load_diabetes(as_frame=True).frame
    frame["progression"] = frame["target"]  # a second variable for a second histogram
    parts = np.array_split(np.random.default_rng(0).permutation(len(frame)), 3)
    whole = frame["target"].to_numpy()
    qs = [0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95]
    with _federation(tmp_path, [frame.iloc[p] for p in parts]) as fed, \
            FederatedStatistics(fed.url, "cohort") as stats:
        default = stats.quantiles("target", qs, range=(25, 350))  # 147 rows a node: 7 bins
        fine = stats.quantiles("progression", qs, bins=25, range=(25, 350))
        with pytest.raises(GovernanceError, match="too fine for this node"):
            stats.quantiles("bmi", 0.5, bins=60, range=(-0.1, 0.2))
    given = 0
    for table, bins in ((default, 7), (fine, 25)):
        width = 325 / bins
        for q in qs:
            label, truth = f"{100 * q:g}%", float(np.quantile(whole, q))
            value = table.loc[POOLED, label]
            if np.isnan(value):  # refused, saying where it lies: and it does lie there
                low, high = _interval(table.loc[POOLED, "note"], label)
                assert low <= truth <= high and high - low > width
            else:
                given += 1
                assert abs(value - truth) <= width, (label, value, truth, width)
    assert not np.isnan(default.loc[POOLED, "50%"])
    assert abs(default.loc[POOLED, "50%"] - 140.5) <= 325 / 7 / 2
    assert given >= len(qs)
