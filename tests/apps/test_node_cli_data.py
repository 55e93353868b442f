"""Biomedical datasets and DataLoadingPlans through the `fedcore-node` command."""

from __future__ import annotations

import json

import pytest

from fedcore.data import synthetic as syn
from fedcore.node import Node
from fedcore_node.cli import main

pytest.importorskip("nibabel")

SITE = dict(folders={"T1": "t1_mprage", "T2": "t2_flair"},
            columns={"subject": "participant_id", "sex": "gender"},
            codes={"sex": {"M": 1, "F": 2}})
PLAN = {"modalities": {"T1": "t1_mprage", "T2": "t2_flair"}, "columns": {"sex": "gender"},
        "values": {"sex": {"1": "M", "2": "F"}}}


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def site(tmp_path, capsys):
    home = tmp_path / "home"
    _run(capsys, "--home", home, "init", "--id", "hosp-b")
    cohort = syn.medical_folder(tmp_path / "mri", n_subjects=6, shape=(8, 8, 8), **SITE)
    return home, cohort


def _files(home):
    return {p.name: p.read_bytes() for p in home.iterdir() if p.is_file()
            and p.name.startswith(("db", "config"))}


def test_a_medical_folder_is_registered_and_mapped_from_the_cli(site, tmp_path, capsys):
    home, cohort = site
    code, out, err = _run(capsys, "--home", home, "dataset", "add", "--name", "brain",
                          "--tags", "mri", "--path", cohort.root, "--kind", "medical-folder",
                          "--option", f"demographics={cohort.demographics}",
                          "--option", "subject_column=participant_id")
    assert code == 0, err
    entry = Node(home).datasets.list()[0]
    assert entry["metadata"]["modalities"] == ["t1_mprage", "t2_flair"]  # local names
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(PLAN))
    code, out, err = _run(capsys, "--home", home, "dataset", "map", entry["id"], plan_file)
    assert code == 0 and "DataLoadingPlan attached" in out, err
    entry = Node(home).datasets.get(entry["id"])
    assert entry["metadata"]["modalities"] == ["T1", "T2"]  # what researchers now see
    assert "sex" in entry["metadata"]["columns"] and "gender" not in entry["metadata"]["columns"]
    demographics = Node(home).datasets.load(entry["id"]).demographics
    assert set(demographics["sex"]) <= {"M", "F"} and len(demographics) == 6  # not 1 / 2
    assert any(e["event"] == "loading-plan-set" for e in Node(home).audit_log())


def test_a_plan_naming_a_missing_column_is_refused_and_nothing_changes(site, tmp_path,
                                                                       capsys):
    home, cohort = site
    _run(capsys, "--home", home, "dataset", "add", "--name", "brain", "--tags", "mri",
         "--path", cohort.root, "--kind", "medical-folder",
         "--option", f"demographics={cohort.demographics}",
         "--option", "subject_column=participant_id")
    dataset_id = Node(home).datasets.list()[0]["id"]
    before = _files(home)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**PLAN, "columns": {"sex": "geslacht"}}))
    code, _, err = _run(capsys, "--home", home, "dataset", "map", dataset_id, bad)
    assert code == 1 and "geslacht" in err
    (tmp_path / "broken.json").write_text("{not json")
    code, _, err = _run(capsys, "--home", home, "dataset", "map", dataset_id,
                        tmp_path / "broken.json")
    assert code == 1 and "Cannot read the DataLoadingPlan" in err
    assert _files(home) == before


def test_a_broken_medical_folder_is_refused_before_anything_is_written(site, capsys):
    home, cohort = site
    before = _files(home)
    broken = next(cohort.root.glob("sub-*/t1_mprage/*.nii*"))
    broken.write_bytes(b"not a nifti file")
    code, _, err = _run(capsys, "--home", home, "dataset", "add", "--name", "brain",
                        "--tags", "mri", "--path", cohort.root, "--kind", "medical-folder",
                        "--option", f"demographics={cohort.demographics}",
                        "--option", "subject_column=participant_id")
    assert code == 1 and broken.parent.parent.name in err and str(cohort.root) not in err
    assert _files(home) == before


def test_an_image_folder_is_registered_from_the_cli(tmp_path, capsys):
    pytest.importorskip("PIL")
    home = tmp_path / "home"
    _run(capsys, "--home", home, "init")
    root = syn.image_folder(tmp_path / "xray", n_per_class=3, size=(6, 5))
    code, out, err = _run(capsys, "--home", home, "dataset", "add", "--name", "xray",
                          "--tags", "xray", "--path", root, "--kind", "image-folder")
    assert code == 0 and "6 samples" in out, err
