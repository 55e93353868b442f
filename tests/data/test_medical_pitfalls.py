"""Medical folders without the pitfalls users hit: dtypes, modalities per site, NaNs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedcore.data import DataLoadingPlan, MedicalFolderDataset, merge_metadata
from fedcore.data import synthetic as syn
from fedcore.errors import DatasetError
from fedcore.node import Node

pytest.importorskip("nibabel")


def test_an_sklearn_plan_trains_on_float32_volumes_it_took_itself(tmp_path):
    pytest.importorskip("sklearn")
    from sklearn.linear_model import SGDClassifier

    from fedcore_sklearn import SklearnTrainingPlan

    class VolumePlan(SklearnTrainingPlan):
        estimator = SGDClassifier

        def training_data(self, dataset):  # the float32 volumes, as a user writes it
            X, y = dataset.arrays(target="diagnosis")
            return X.reshape(len(X), -1), y

    cohort = syn.medical_folder(tmp_path / "mri", n_subjects=16, shape=(6, 6, 6), signal=3.0,
                                modalities=("T1",))
    ds = MedicalFolderDataset(cohort.root, demographics=cohort.demographics)
    assert ds.arrays()[0].dtype == np.float32
    plan = VolumePlan({"loss": "log_loss", "random_state": 0, "target": "diagnosis"},
                      {"epochs": 5}, data_info=ds.metadata())
    plan.build(seed=0)
    # Before, sklearn's SGD refused: "expected SequentialDataset64, got ArrayDataset32".
    plan.fit(ds, seed=0)
    y_true, y_pred = plan.predict(ds)
    assert (y_true == y_pred).mean() >= 0.9


def _two_sites(tmp_path):
    """Site A has T1 and T2, one subject without T2; site B has T1 and FLAIR."""
    a = syn.medical_folder(tmp_path / "a", n_subjects=8, shape=(4, 4, 4),
                           missing={"sub-002": ["T2"]})
    b = syn.medical_folder(tmp_path / "b", n_subjects=8, shape=(4, 4, 4), seed=1,
                           modalities=("T1", "FLAIR"), first_subject=20)
    return a, b


def test_a_loading_plan_keeps_the_modalities_the_federation_uses_without_reregistering(
        tmp_path):
    a, b = _two_sites(tmp_path)
    node = Node(tmp_path / "home", node_id="a")
    entry = node.datasets.add("brain", ["mri"], a.root, kind="medical-folder",
                              options=a.register_options())
    assert entry["metadata"]["n_samples"] == 7 and entry["metadata"]["modalities"] == [
        "T1", "T2"]
    site_b = MedicalFolderDataset(b.root, demographics=b.demographics,
                                  loading_plan=DataLoadingPlan(keep_modalities=["T1"]))
    assert MedicalFolderDataset(b.root, demographics=b.demographics).modalities == [
        "FLAIR", "T1"]  # the two sites offer different modalities

    # Site A drops T2 with a plan: the subject without T2 comes back, nothing re-registered.
    entry = node.datasets.set_loading_plan(entry["id"], {"keep_modalities": ["T1"]})
    assert entry["metadata"]["modalities"] == ["T1"] and entry["metadata"]["n_samples"] == 8
    assert entry["report"]["skipped_subjects"] == {}
    merged = merge_metadata([entry["metadata"], site_b.metadata()])
    assert merged["feature_shape"] == [1, 4, 4, 4] and merged["n_samples"] == 16
    X, _ = node.datasets.load(entry["id"]).arrays()
    assert X.shape == (8, 1, 4, 4, 4)

    # A plan keeping a modality the site lacks is refused, and the stored plan stays.
    with pytest.raises(DatasetError, match=r"keeps modality 'FLAIR'.*\['T1', 'T2'\]"):
        node.datasets.set_loading_plan(entry["id"], {"keep_modalities": ["T1", "FLAIR"]})
    assert node.datasets.get(entry["id"])["loading_plan"]["keep_modalities"] == ["T1"]
    # Harmonised names: keep what the plan renamed.
    renamed = DataLoadingPlan(modalities={"T1w": "T1"}, keep_modalities=["T1w"])
    assert MedicalFolderDataset(a.root, demographics=a.demographics,
                                loading_plan=renamed).modalities == ["T1w"]
    assert DataLoadingPlan.from_dict(renamed.to_dict()) == renamed
    assert "keep_modalities" not in DataLoadingPlan(columns={"x": "y"}).to_dict()


def test_registration_reports_missing_volumes_and_values(tmp_path, capsys):
    from fedcore_node.cli import main

    a, _ = _two_sites(tmp_path)
    frame = pd.read_csv(a.demographics)
    frame.loc[[0, 3], "age"] = np.nan
    frame.loc[5, "sex"] = None
    frame.to_csv(a.demographics, index=False)
    home = tmp_path / "home"
    assert main(["--home", str(home), "init", "--id", "a"]) == 0
    code = main(["--home", str(home), "dataset", "add", "--name", "brain", "--tags", "mri",
                 "--path", str(a.root), "--kind", "medical-folder",
                 "--option", f"demographics={a.demographics}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Skipped 1 subject(s): sub-002 (no T2 volume)" in out
    assert "Missing volumes: T2 in 1 subject folder(s)" in out
    # sub-002 is skipped; of the kept subjects two lack an age and one a sex.
    kept_nan = {c: int(frame[frame["subject"] != "sub-002"][c].isna().sum())
                for c in ("age", "sex")}
    assert f"Missing values (NaN or empty): age {kept_nan['age']}, sex 1" in out
    entry = Node(home).datasets.list()[0]
    assert entry["report"]["missing_values"] == {c: n for c, n in kept_nan.items() if n}
    assert entry["report"]["missing_volumes"] == {"T2": 1}
