"""MedicalFolderDataset, DataLoadingPlan and their registration on real nodes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fedcore import Experiment, simulate
from fedcore.data import DataLoadingPlan, MedicalFolderDataset, TabularDataset, merge_metadata
from fedcore.data import synthetic as syn
from fedcore.errors import ConfigurationError, DatasetError
from fedcore.node import Node

SHAPE = (16, 16, 16)

# Three hospitals that name the same things their own way. Each entry: how the synthetic
# site writes its files, and the DataLoadingPlan its administrator writes to undo that.
SITES = {
    "node-01": ({}, None),  # already uses the federation's names
    "node-02": (
        {"folders": {"T1": "t1_mprage", "T2": "t2_flair"},
         "columns": {"subject": "participant_id", "sex": "gender", "age": "age_months",
                     "diagnosis": "dx"},
         "codes": {"sex": {"M": 1, "F": 2}, "diagnosis": {0: "CN", 1: "AD"}},
         "scales": {"age": 12}},
        DataLoadingPlan(modalities={"T1": "t1_mprage", "T2": "t2_flair"},
                        columns={"sex": "gender", "age": "age_months", "diagnosis": "dx"},
                        values={"sex": {1: "M", 2: "F"}, "diagnosis": {"CN": 0, "AD": 1}},
                        units={"age": {"scale": 1 / 12}}),
    ),
    "node-03": (
        {"folders": {"T1": "T1w", "T2": "T2w"},
         "columns": {"subject": "ID", "sex": "Sex", "age": "Age", "diagnosis": "Group"},
         "codes": {"sex": {"M": "male", "F": "female"},
                   "diagnosis": {0: "control", 1: "patient"}},
         "missing": {"sub-305": ["T2"]}},
        {"modalities": {"T1": "T1w", "T2": "T2w"},  # a plan may be given as plain JSON data
         "columns": {"sex": "Sex", "age": "Age", "diagnosis": "Group"},
         "values": {"sex": {"male": "M", "female": "F"},
                    "diagnosis": {"control": 0, "patient": 1}}},
    ),
}


def _site(root, node_id, n_subjects=24):
    naming, plan = SITES[node_id]
    i = int(node_id[-2:])
    cohort = syn.medical_folder(root / node_id / "mri", n_subjects=n_subjects, shape=SHAPE,
                                seed=i, first_subject=100 * i + 1, **naming)
    return cohort, plan


def _register(node, cohort, plan, tags=("brain-mri",)):
    return node.datasets.add("brain", list(tags), cohort.root, kind="medical-folder",
                             options=cohort.register_options(), loading_plan=plan)


# --- the dataset ------------------------------------------------------------------------


def test_medical_folder_joins_volumes_to_demographics(tmp_path):
    cohort = syn.medical_folder(tmp_path / "mri", n_subjects=8, shape=(8, 8, 8),
                                spacing=(1.5, 1.5, 2.0), missing={"sub-003": ["T2"]})
    ds = MedicalFolderDataset(cohort.root, demographics=cohort.demographics)

    # The stated rule: a subject lacking a modality is skipped, and the reason kept.
    assert len(ds) == 7 and "sub-003" not in ds.subjects
    assert ds.skipped == {"sub-003": "no T2 volume"}
    assert ds.modalities == ["T1", "T2"]
    assert list(ds.demographics.index) == ds.subjects
    assert list(ds.demographics.columns) == ["age", "diagnosis", "sex"]

    meta = ds.metadata()
    assert meta["n_samples"] == 7 and meta["n_skipped"] == 1
    assert meta["shapes"] == {"T1": [8, 8, 8], "T2": [8, 8, 8]}
    assert meta["voxel_spacing"]["T1"] == [1.5, 1.5, 2.0]
    assert meta["feature_shape"] == [2, 8, 8, 8]
    assert meta["categories"]["sex"] == ["F", "M"]
    assert meta["categories"]["diagnosis"] == [0, 1]
    assert str(tmp_path) not in json.dumps(meta) and "mri" not in json.dumps(meta)

    X, y = ds.arrays(target="diagnosis")
    assert X.shape == (7, 2, 8, 8, 8) and X.dtype == np.float32
    assert y.tolist() == [cohort.labels[s] for s in ds.subjects]
    # The planted signal is where the generator put it, in T1 only.
    region = (slice(None), 0, *syn.signal_region((8, 8, 8)))
    assert X[region][y == 1].mean() - X[region][y == 0].mean() > 1.0
    volumes = list(ds.iter_volumes("T1"))
    assert len(volumes) == 7 and np.array_equal(volumes[2], X[2, 0])

    X, y = ds.arrays(features=["T1"], target="T2")  # a modality as the target
    assert X.shape == (7, 1, 8, 8, 8) and y.shape == (7, 8, 8, 8)
    assert np.array_equal(y[4], next(v for i, v in enumerate(ds.iter_volumes("T2")) if i == 4))

    # A training split reads its own subjects only, lazily one at a time through items().
    train, test = ds.split(0.25, seed=0)
    Xtr, ytr = train.arrays(target="age")
    assert Xtr.shape[0] == len(train) == 5
    assert ytr.tolist() == ds.demographics["age"].iloc[train.indices].tolist()
    (x, cov), label = test.items(features=["T1"], target="diagnosis", covariates=["age"])[1]
    j = int(test.indices[1])
    assert x.shape == (1, 8, 8, 8) and np.array_equal(x[0], X[j, 0])
    assert cov.dtype == np.float32 and cov.tolist() == [ds.demographics["age"].iloc[j]]
    assert label == cohort.labels[ds.subjects[j]] and label.dtype == np.int64


def test_scaled_integer_volumes_are_converted_and_truncated_ones_named(tmp_path):
    import nibabel as nib

    cohort = syn.medical_folder(tmp_path / "mri", n_subjects=3, shape=(6, 5, 4),
                                modalities=("CT",), compress=False)
    # A scanner export: int16 voxels with an intensity scaling in the header.
    path = next((cohort.root / "sub-002" / "CT").iterdir())
    raw = np.arange(120, dtype=np.int16).reshape(6, 5, 4)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(0.5, -10.0)
    img.header.set_data_dtype(np.int16)
    nib.save(img, path)
    ds = MedicalFolderDataset(cohort.root, demographics=cohort.demographics)
    X, _ = ds.arrays()
    assert X.dtype == np.float32
    np.testing.assert_array_equal(X[1, 0], raw * 0.5 - 10.0)

    path = next((cohort.root / "sub-003" / "CT").iterdir())
    path.write_bytes(path.read_bytes()[:-40])  # the header survives, the voxels do not
    with pytest.raises(DatasetError, match=rf"sub-003/CT/{path.name} cannot be read.*trunc"):
        list(ds.iter_volumes("CT"))


def test_a_plan_asking_for_something_absent_is_told_what_exists(tmp_path):
    cohort = syn.medical_folder(tmp_path / "mri", n_subjects=4, shape=(4, 4, 4))
    ds = MedicalFolderDataset(cohort.root, demographics=cohort.demographics)
    with pytest.raises(ConfigurationError, match=r"\['FLAIR'\] are not modalities.*'T1', 'T2'"):
        ds.arrays(features=["FLAIR"])
    with pytest.raises(ConfigurationError, match="'bmi' is neither a modality nor"):
        ds.arrays(target="bmi")
    with pytest.raises(ConfigurationError, match="Covariate 'sex' is not numeric"):
        ds.items(target="diagnosis", covariates=["sex"])


# --- DataLoadingPlan --------------------------------------------------------------------


def test_loading_plan_is_plain_json_and_refuses_mistakes():
    plan = SITES["node-02"][1]
    stored = json.loads(json.dumps(plan.to_dict()))
    assert DataLoadingPlan.from_dict(stored) == plan
    assert stored["values"]["sex"] == {"1": "M", "2": "F"}  # local codes are text keys
    with pytest.raises(ConfigurationError, match=r"Unknown DataLoadingPlan keys \['colums'\]"):
        DataLoadingPlan.from_dict({"colums": {"sex": "gender"}})
    with pytest.raises(ConfigurationError, match="non-zero scale"):
        DataLoadingPlan(units={"age": {"scale": 0}})
    with pytest.raises(ConfigurationError, match="same local name 'gender'"):
        DataLoadingPlan(columns={"sex": "gender", "sex2": "gender"})


def test_tabular_dataset_is_harmonised_by_its_plan(tmp_path):
    path = syn.site_csv(tmp_path / "cohort.csv", n=30, columns={"weight": "poids_lb",
                                                                 "sex": "sexe"},
                        codes={"sex": {"M": "H", "F": "F"}}, scales={"weight": 2.20462})
    reference = syn.site_csv(tmp_path / "ref.csv", n=30)
    node = Node(tmp_path / "home", node_id="h")
    entry = node.datasets.add("cohort", ["tab"], path)
    assert entry["metadata"]["columns"] == ["age", "sexe", "poids_lb", "label"]

    plan = {"columns": {"weight": "poids_lb", "sex": "sexe"},
            "values": {"sex": {"H": "M", "F": "F"}},
            "units": {"weight": {"scale": 1 / 2.20462}}}
    entry = node.datasets.set_loading_plan(entry["id"], plan)
    assert entry["metadata"]["columns"] == ["age", "sex", "weight", "label"]
    assert entry["metadata"]["categories"]["sex"] == ["F", "M"]
    frame = node.datasets.load(entry["id"]).frame
    expected = pd.read_csv(reference)
    assert frame["sex"].tolist() == expected["sex"].tolist()
    np.testing.assert_allclose(frame["weight"], expected["weight"], atol=1e-3)
    # Stored in the node's database and applied again after a restart.
    reopened = Node(tmp_path / "home")
    assert reopened.datasets.get_loading_plan(entry["id"]) == DataLoadingPlan.from_dict(plan)
    assert reopened.datasets.load(entry["id"]).frame.columns.tolist() == frame.columns.tolist()
    assert isinstance(reopened.datasets.load(entry["id"]), TabularDataset)
    # Removing the plan brings the local names back.
    entry = node.datasets.set_loading_plan(entry["id"], None)
    assert entry["metadata"]["columns"] == ["age", "sexe", "poids_lb", "label"]


def test_registration_applies_the_plan_and_shows_only_harmonised_names(tmp_path):
    cohort, plan = _site(tmp_path, "node-02", n_subjects=6)
    node = Node(tmp_path / "home", node_id="node-02")
    entry = node.datasets.add("brain", ["mri"], cohort.root, kind="medical-folder",
                              options=cohort.register_options())
    local = entry["metadata"]
    assert local["modalities"] == ["t1_mprage", "t2_flair"]
    assert local["columns"] == ["age_months", "dx", "gender"]

    entry = node.datasets.set_loading_plan(entry["id"], plan)
    stored = {**node.datasets.get(entry["id"]), "available": True}
    # Six subjects: a value held by fewer than min_count of them is not listed by default.
    small = node.datasets.public(stored)["metadata"]
    assert small["categories_withheld"] == ["diagnosis", "sex"]
    assert small["categories"]["sex"] == [] and small["categories"]["diagnosis"] == []
    public = node.datasets.public(stored, min_count=0)
    meta = public["metadata"]
    assert meta["modalities"] == ["T1", "T2"] and meta["columns"] == ["age", "diagnosis", "sex"]
    assert meta["categories"]["sex"] == ["F", "M"] and meta["categories"]["diagnosis"] == [0, 1]
    shared = json.dumps(public)
    for local_name in ("t1_mprage", "gender", "age_months", "participant_id", str(tmp_path)):
        assert local_name not in shared
    ds = node.datasets.load(entry["id"])
    assert 40 <= ds.demographics["age"].min() and ds.demographics["age"].max() <= 86  # years
    assert node.datasets.get_loading_plan(entry["id"]) == plan
    assert "loading_plan" in json.loads((tmp_path / "home" / "db.json").read_text())[
        "datasets"]["1"]


def test_bad_inputs_are_named_and_nothing_is_registered(tmp_path):
    node = Node(tmp_path / "home", node_id="h")
    cohort, plan = _site(tmp_path, "node-02", n_subjects=4)
    add = dict(kind="medical-folder", options=cohort.register_options())

    def refused(match, **kwargs):
        with pytest.raises(DatasetError, match=match):
            node.datasets.add("brain", ["mri"], cohort.root, **{**add, **kwargs})
        assert node.datasets.list() == []

    # A DataLoadingPlan naming a folder, a column or a value the site does not have.
    refused(r"modality 'T1' to the folder 'T1_MPRAGE'.*\['t1_mprage', 't2_flair'\]",
            loading_plan={**plan.to_dict(), "modalities": {"T1": "T1_MPRAGE"}})
    refused("maps column 'sex' to 'sex_code', which mri_demographics.csv does not have",
            loading_plan={**plan.to_dict(), "columns": {"sex": "sex_code"}})
    refused(r"Column 'sex' of mri_demographics.csv holds values \['2'\] that the "
            "DataLoadingPlan's 'values' entry for 'sex' does not map",
            loading_plan={**plan.to_dict(), "values": {"sex": {1: "M"}}})
    refused("no subject column 'subject_id'",
            options={**cohort.register_options(), "subject_column": "subject_id"})

    # A subject without a demographics row.
    frame = pd.read_csv(cohort.demographics)
    frame[frame["participant_id"] != "sub-203"].to_csv(cohort.demographics, index=False)
    refused("Subject 'sub-203' has image folders but no row in mri_demographics.csv")
    frame.to_csv(cohort.demographics, index=False)

    # A volume that does not load; two volumes where one is expected.
    volume = next((cohort.root / "sub-202" / "t1_mprage").iterdir())
    good = volume.read_bytes()
    volume.write_bytes(b"this is no NIfTI file")
    refused(rf"The volume sub-202/t1_mprage/{volume.name} cannot be opened as NIfTI")
    volume.write_bytes(good)
    extra = volume.with_name("again.nii.gz")
    extra.write_bytes(good)
    refused(r"sub-202/t1_mprage holds 2 NIfTI files")
    extra.unlink()

    with pytest.raises(ConfigurationError, match=r"Unknown options \['subjects'\]"):
        node.datasets.add("brain", ["mri"], cohort.root, kind="medical-folder",
                          options={"subjects": "x"})
    with pytest.raises(ConfigurationError, match="A folder is a dicom or image-folder or medical"):
        node.datasets.add("brain", ["mri"], cohort.root)
    assert node.datasets.list() == []
    entry = node.datasets.add("brain", ["mri"], cohort.root, **add, loading_plan=plan)
    assert entry["metadata"]["n_samples"] == 4 and len(node.datasets.list()) == 1
    # A plan that no longer fits is refused, and the stored one stays.
    with pytest.raises(DatasetError, match="maps column 'age' to 'age_years'"):
        node.datasets.set_loading_plan(entry["id"], {**plan.to_dict(),
                                                     "columns": {"age": "age_years"}})
    assert node.datasets.get_loading_plan(entry["id"]) == plan


# --- a federation -----------------------------------------------------------------------

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from fedcore_torch import TorchTrainingPlan  # noqa: E402


class ScanNet(nn.Module):
    """A small 3D CNN over the scans, with the age as a covariate."""

    def __init__(self, n_modalities, n_covariates, n_classes):
        super().__init__()
        self.conv = nn.Conv3d(n_modalities, 4, kernel_size=3, padding=1)
        self.head = nn.Linear(4 * 8 + n_covariates, n_classes)

    def forward(self, volumes, covariates):
        h = F.adaptive_avg_pool3d(F.relu(self.conv(volumes)), 2).flatten(1)
        return self.head(torch.cat([h, (covariates - 60.0) / 15.0], dim=1))


class ScanPlan(TorchTrainingPlan):
    """Reads harmonised names only: modality T1, target diagnosis, covariate age."""

    def init_model(self):
        classes = self.data_info["categories"][self.model_args["target"]]
        return ScanNet(len(self.model_args["features"]), len(self.model_args["covariates"]),
                       len(classes))

    def training_data(self, dataset):
        return dataset.items(features=self.model_args["features"],
                             target=self.model_args["target"],
                             covariates=self.model_args["covariates"])

    def training_step(self, data, target):
        return F.cross_entropy(self.model(*data), target)

    def testing_step(self, data, target):
        return target, self.model(*data).argmax(dim=1)


MODEL_ARGS = {"features": ["T1"], "target": "diagnosis", "covariates": ["age"]}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_three_differently_named_sites_train_one_plan_unchanged(tmp_path):
    fed = simulate.SimulatedFederation(root=tmp_path / "nodes")
    with fed:
        local_meta = []
        for node_id in SITES:
            cohort, plan = _site(tmp_path / "sites", node_id)
            node = fed.add_node(node_id)
            entry = _register(node, cohort, None, tags=["scratch"])
            local_meta.append(entry["metadata"])
            node.datasets.remove(entry["id"])
            _register(node, cohort, plan)
        # Without the DataLoadingPlans the sites could not be trained together.
        with pytest.raises(ConfigurationError, match="disagree on columns"):
            merge_metadata(local_meta)
        assert fed.nodes[2].datasets.list()[0]["report"] == {
            "skipped_subjects": {"sub-305": "no T2 volume"}, "missing_volumes": {"T2": 1},
            "missing_values": {}}

        exp = Experiment(ScanPlan, tags=["brain-mri"], federation=fed.url, progress=False,
                         model_args=MODEL_ARGS, round_limit=8, test_ratio=0.25,
                         training_args={"epochs": 2, "batch_size": 6, "lr": 0.5})
        exp.run()
        model = exp.trained_plan().model

    h = exp.history
    assert set(h["status"]) == {"ok"} and set(h["node"]) == set(SITES)
    assert h[h["round"] == 1]["n_samples"].sum() == 18 + 18 + 17  # 24, 24, 23 kept; 25% test

    # Held-out subjects from a fresh site, read under the federation's names.
    held_out = syn.medical_folder(tmp_path / "held-out", n_subjects=40, shape=SHAPE, seed=99)
    ds = MedicalFolderDataset(held_out.root, demographics=held_out.demographics)
    X, y = ds.arrays(features=["T1"], target="diagnosis")
    model.eval()
    with torch.no_grad():
        pred = model(torch.as_tensor(X), torch.as_tensor(ds.covariates(["age"]))).argmax(1)
    accuracy = float((pred.numpy() == y).mean())
    # Chance is 0.5 (balanced classes); the planted signal must lift it by 0.35 at least.
    assert accuracy >= 0.85, accuracy


class ArrayScanPlan(TorchTrainingPlan):
    """The default training_data: the stacked (X, y) arrays every backend can take."""

    def init_model(self):
        return nn.Sequential(nn.Flatten(), nn.Linear(8 ** 3, 2))

    def training_step(self, data, target):
        return F.cross_entropy(self.model(data), target)


def test_a_plan_without_items_gets_the_stacked_arrays(tmp_path):
    cohort = syn.medical_folder(tmp_path / "mri", n_subjects=12, shape=(8, 8, 8), signal=3.0)
    ds = MedicalFolderDataset(cohort.root, demographics=cohort.demographics)
    plan = ArrayScanPlan({"features": ["T1"], "target": "diagnosis"},
                         {"epochs": 20, "lr": 0.05, "batch_size": 4})
    plan.build(seed=0)
    plan.fit(ds, seed=0)
    y_true, y_pred = plan.predict(ds)
    assert y_true.tolist() == [cohort.labels[s] for s in ds.subjects]
    assert (y_true == y_pred).mean() == 1.0  # training accuracy on a strong signal


def test_a_broken_volume_fails_only_its_node_which_keeps_serving(tmp_path):
    fed = simulate.SimulatedFederation(root=tmp_path / "nodes")
    with fed:
        for node_id in SITES:
            cohort, plan = _site(tmp_path / "sites", node_id, n_subjects=8)
            node = fed.add_node(node_id)
            node.set_policy(min_count=0)  # 8 subjects: list their diagnoses all the same
            _register(node, cohort, plan)
            if node_id == "node-02":
                damaged = node
                broken = next((cohort.root / "sub-204" / "t1_mprage").iterdir())
                broken.write_bytes(broken.read_bytes()[:200])  # truncated after registration
        exp = Experiment(ScanPlan, tags=["brain-mri"], federation=fed.url, progress=False,
                         model_args=MODEL_ARGS, training_args={"epochs": 1, "batch_size": 4})
        exp.run(2)
    h = exp.history.set_index(["round", "node"])
    for rnd in (1, 2):
        bad = h.loc[(rnd, "node-02")]
        assert bad["status"] == "failed"
        assert f"sub-204/t1_mprage/{broken.name} cannot be" in bad["error"]
        assert str(tmp_path) not in bad["error"]  # the path stays on the node
        assert h.loc[(rnd, "node-01"), "status"] == h.loc[(rnd, "node-03"), "status"] == "ok"
    audit = [e for e in damaged.audit_log() if e["event"] == "train-failed"]
    assert len(audit) == 2 and broken.name in audit[0]["reason"]
