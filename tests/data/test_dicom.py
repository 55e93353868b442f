"""DICOM series per patient: volumes in spatial order, rescaled, harmonised, never identifying."""

from __future__ import annotations

import json
import logging
import re
import warnings

import numpy as np
import pandas as pd
import pytest

from fedcore import Experiment, FederatedStatistics, Federation, simulate
from fedcore.data import DataLoadingPlan, DicomDataset, merge_metadata
from fedcore.data import synthetic as syn
from fedcore.errors import ConfigurationError, DatasetError

pydicom = pytest.importorskip("pydicom")

SHAPE = (8, 16, 16)


def _write_series(folder, volume, *, slopes, intercept=-100.0, positions=None,
                  description="CT chest", modality="CT", orientation=(1, 0, 0, 0, 1, 0),
                  patient="DOE^SECRET"):
    """One series by hand: slice z holds ``volume[z]``, written in a shuffled file order."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    iop = np.asarray(orientation, float)
    normal = np.cross(iop[:3], iop[3:])
    for z in np.random.default_rng(1).permutation(len(volume)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = (CTImageStorage,
                                                                         generate_uid())
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.Modality, ds.SeriesDescription = patient, modality, description
        ds.SeriesInstanceUID, ds.InstanceNumber = series_uid, 1 + int(z)
        ds.ImageOrientationPatient = list(iop)
        ds.ImagePositionPatient = list(normal * (positions[z] if positions else 3.0 * z))
        ds.PixelSpacing = [0.7, 0.8]
        ds.Rows, ds.Columns = volume.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slopes[z], intercept
        ds.PixelData = np.rint((volume[z] - intercept) / slopes[z]).astype(np.int16).tobytes()
        ds.save_as(folder / f"{np.random.default_rng(int(z)).integers(1e6)}.dcm",
                   enforce_file_format=True)


def _demographics(path, subjects):
    pd.DataFrame({"subject": subjects, "age": [50 + i for i in range(len(subjects))]}).to_csv(
        path, index=False)
    return path


def test_slices_are_ordered_by_position_along_the_normal_and_rescaled(tmp_path):
    root = tmp_path / "ct"
    # Slice z of patient p holds 10 z + 2 p everywhere (a multiple of every slope): the
    # order and the rescale show.
    volumes = {p: np.stack([np.full((6, 5), 10.0 * z + 2 * int(p[1])) for z in range(7)])
               for p in ("p1", "p2")}
    slopes = [0.5, 1.0, 0.25, 2.0, 0.5, 1.0, 0.125]
    # Patient p1: an oblique stack whose normal points down: positions run backwards.
    oblique = (1, 0, 0, 0, -0.6, 0.8)
    _write_series(root / "p1" / "study" / "s1", volumes["p1"], slopes=slopes,
                  orientation=oblique, positions=[-4.0 * z for z in range(7)])
    _write_series(root / "p2" / "x", volumes["p2"], slopes=slopes)
    (root / "p2" / "x" / "README.txt").write_text("not DICOM: skipped")
    ds = DicomDataset(root, demographics=_demographics(tmp_path / "d.csv", ["p1", "p2"]))
    assert ds.modalities == ["CT chest"] and ds.subjects == ["p1", "p2"]
    meta = ds.metadata()
    assert meta["kind"] == "dicom" and meta["shapes"] == {"CT chest": [7, 6, 5]}
    assert meta["voxel_spacing"]["CT chest"] == {"min": [3.0, 0.7, 0.8],
                                                 "max": [4.0, 0.7, 0.8]}
    X, _ = ds.arrays()
    assert X.dtype == np.float32 and X.shape == (2, 1, 7, 6, 5)
    np.testing.assert_array_equal(X[1, 0], volumes["p2"])
    # p1's positions along its normal fall as z grows: the order is by position, not z.
    np.testing.assert_array_equal(X[0, 0], volumes["p1"][::-1])


def test_series_are_selected_by_description_and_dicom_modality(tmp_path):
    root = tmp_path / "site"
    vol = np.zeros((3, 4, 4))
    for p in ("a", "b"):
        _write_series(root / p / "1", vol, slopes=[1] * 3, description="CT chest")
        _write_series(root / p / "2", vol + 5, slopes=[1] * 3, description="PET", modality="PT")
    demo = _demographics(tmp_path / "d.csv", ["a", "b"])
    assert DicomDataset(root, demographics=demo).modalities == ["CT chest", "PET"]
    assert DicomDataset(root, demographics=demo, dicom_modality="ct").modalities == [
        "CT chest"]
    assert DicomDataset(root, demographics=demo, modalities=["PET"]).modalities == ["PET"]
    mapped = DicomDataset(root, demographics=demo, modalities=["CT chest"],
                          loading_plan=DataLoadingPlan(modalities={"CT": "CT chest"}))
    assert mapped.metadata()["modalities"] == ["CT"]
    with pytest.raises(DatasetError, match=r"No subject has a modality named 'MR'.*CT chest"):
        DicomDataset(root, demographics=demo, modalities=["MR"]).metadata()
    # A second series of the same description in one patient: which one is meant?
    _write_series(root / "b" / "3", vol, slopes=[1] * 3, description="CT chest")
    with pytest.raises(DatasetError, match="b holds 2 series described 'CT chest'"):
        DicomDataset(root, demographics=demo).metadata()
    (root / "b" / "3" / "bad.dcm").write_bytes(b"junk" * 40)
    with pytest.raises(DatasetError, match=r"The file b/3/bad.dcm is not DICOM"):
        DicomDataset(root, demographics=demo).metadata()


def test_a_dicom_folder_is_registered_from_the_node_cli(tmp_path, capsys):
    from fedcore.node import Node
    from fedcore_node.cli import main

    home = tmp_path / "home"
    assert main(["--home", str(home), "init", "--id", "hosp"]) == 0
    cohort = syn.dicom_folder(tmp_path / "dicom", n_subjects=4, shape=(3, 4, 4),
                              descriptions={"T1": "t1 mprage"})
    code = main(["--home", str(home), "dataset", "add", "--name", "ct", "--tags", "mri",
                 "--path", str(cohort.root), "--kind", "dicom",
                 "--option", f"demographics={cohort.demographics}",
                 "--option", "modalities=t1 mprage"])
    out, err = capsys.readouterr()
    assert code == 0, err
    entry = Node(home).datasets.list()[0]
    assert entry["kind"] == "dicom" and entry["metadata"]["modalities"] == ["t1 mprage"]
    assert entry["metadata"]["n_samples"] == 4
    assert not any(value in json.dumps(entry) for value in cohort.identifying)
    with pytest.raises(SystemExit):
        main(["dataset", "add", "--help"])
    assert "medical-folder, image-folder, dicom" in capsys.readouterr().out


# --- a federation -----------------------------------------------------------------------

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from fedcore_torch import TorchTrainingPlan  # noqa: E402

# Three hospitals whose scanners describe the same series their own way; each
# administrator's DataLoadingPlan maps them (and the demographics) to the federation's names.
SITES = {
    "node-01": ({}, None),
    "node-02": ({"descriptions": {"T1": "t1_mprage_sag", "T2": "t2_flair_ax"},
                 "columns": {"subject": "pid", "diagnosis": "dx"},
                 "codes": {"diagnosis": {0: "CN", 1: "AD"}}},
                DataLoadingPlan(modalities={"T1": "t1_mprage_sag", "T2": "t2_flair_ax"},
                                columns={"diagnosis": "dx"},
                                values={"diagnosis": {"CN": 0, "AD": 1}})),
    "node-03": ({"descriptions": {"T1": "MPRAGE T1w 1mm", "T2": "T2w"}},
                {"modalities": {"T1": "MPRAGE T1w 1mm"}}),  # T2 left as it is: unused
}


class DicomNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 4, kernel_size=3, padding=1)
        self.head = nn.Linear(4 * 8, 2)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool3d(F.relu(self.conv(x)), 2).flatten(1))


class DicomPlan(TorchTrainingPlan):
    """Harmonised names only: the T1 series, the diagnosis."""

    def init_model(self):
        return DicomNet()

    def training_data(self, dataset):
        return dataset.items(features=["T1"], target="diagnosis")

    def training_step(self, data, target):
        return F.cross_entropy(self.model(data), target)

    def testing_step(self, data, target):
        return target, self.model(data).argmax(dim=1)


TRAINING_ARGS = {"epochs": 3, "batch_size": 5, "lr": 0.1}
ROUNDS = 7


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cohorts(root):
    return {node_id: syn.dicom_folder(root / node_id / "dicom", n_subjects=20, shape=SHAPE,
                                      seed=i + 1, first_subject=100 * (i + 1), signal=3.0,
                                      site=f"Site{node_id}", **naming)
            for i, (node_id, (naming, _)) in enumerate(SITES.items())}


def _accuracy(model, dataset):
    X, y = dataset.arrays(features=["T1"], target="diagnosis")
    model.eval()
    with torch.no_grad():
        pred = model(torch.as_tensor(X)).argmax(1).numpy()
    return float((pred == y).mean())


def test_three_dicom_sites_train_one_plan_and_never_show_identifying_tags(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    warnings.simplefilter("always")
    cohorts = _cohorts(tmp_path / "sites")
    planted = [v for c in cohorts.values() for v in c.identifying]
    assert len(planted) > 100 and any("PID" in v for v in planted)
    raw = next(cohorts["node-01"].root.rglob("*.dcm")).read_bytes().decode("latin-1")
    assert sum(v in raw for v in cohorts["node-01"].identifying) >= 6  # in every file
    seen: list[str] = []  # everything a researcher (or the node's logs) could read

    # Held-out patients from a fresh site, under the federation's names.
    held_out = syn.dicom_folder(tmp_path / "held-out", n_subjects=40, shape=SHAPE, seed=99,
                                signal=3.0)
    test_set = DicomDataset(held_out.root, demographics=held_out.demographics)
    # The centralized baseline: the same plan and epochs over the three sites' data pooled.
    pooled = [DicomDataset(c.root, demographics=c.demographics,
                           subject_column=c.subject_column,
                           loading_plan=DataLoadingPlan.from_dict(SITES[n][1] or {}))
              for n, c in cohorts.items()]
    central = DicomPlan({}, {**TRAINING_ARGS, "epochs": TRAINING_ARGS["epochs"] * ROUNDS})
    central.build(seed=0)
    central.fit(_Concat(pooled), seed=0)
    baseline = _accuracy(central.model, test_set)

    fed = simulate.SimulatedFederation(root=tmp_path / "nodes")
    with fed, warnings.catch_warnings(record=True) as caught:
        metas = []
        for node_id, cohort in cohorts.items():
            node = fed.add_node(node_id)
            local = DicomDataset(cohort.root, demographics=cohort.demographics,
                                 subject_column=cohort.subject_column)
            metas.append(local.metadata())
            node.datasets.add("brain", ["brain-dicom"], cohort.root, kind="dicom",
                              options=cohort.register_options(),
                              loading_plan=SITES[node_id][1])
        # Without the DataLoadingPlans the sites' series do not line up.
        assert {tuple(m["modalities"]) for m in metas} == {
            ("T1", "T2"), ("t1_mprage_sag", "t2_flair_ax"), ("MPRAGE T1w 1mm", "T2w")}
        with pytest.raises(ConfigurationError, match="disagree on columns"):
            merge_metadata(metas)

        with Federation(fed.url) as session:
            found = session.search(["brain-dicom"])
        seen.append(found.to_json())
        assert all("T1" in m["modalities"] for m in found["metadata"])

        exp = Experiment(DicomPlan, tags=["brain-dicom"], federation=fed.url, progress=False,
                         round_limit=ROUNDS, test_ratio=0.25, training_args=TRAINING_ARGS)
        exp.run()
        federated = exp.trained_plan().model
        seen.append(exp.history.to_json())

        with FederatedStatistics(fed.url, ["brain-dicom"]) as stats:
            seen.append(stats.describe(["age", "T1"]).to_json())
            seen.append(repr(stats.histogram("T1", bins=[-4, -1, 0, 1, 4]).counts))
            # A file damaged after registration: the error names it, relative to the root.
            broken = sorted((cohorts["node-03"].root / "sub-301").rglob("*.dcm"))[0]
            broken.write_bytes(broken.read_bytes()[:300])
            table = stats.describe("T1")
            seen.append(table.to_json())
        error = table.loc[("T1", "node-03"), "note"]
        assert "sub-301/" in error and str(tmp_path) not in error
        # ... and a round reading it fails on that node alone, saying which file.
        again = Experiment(DicomPlan, tags=["brain-dicom"], federation=fed.url,
                           progress=False, round_limit=1, training_args=TRAINING_ARGS)
        again.run()
        failed = again.history.set_index("node").loc["node-03"]
        assert failed["status"] == "failed" and "sub-301/" in failed["error"]
        seen.append(again.history.to_json())
        for node in fed.nodes:
            seen.append(json.dumps(node.audit_log(), default=str))
            seen.extend(p.read_text(errors="replace") for p in node.home.rglob("*")
                        if p.is_file() and p.stat().st_size < 5_000_000)
        seen.append(caplog.text)
        seen.extend(str(w.message) for w in caught)

    assert exp.history["status"].eq("ok").all()
    everything = "\n".join(seen)
    assert "sub-301" in everything  # the search looked where things are written
    # Dates are digits: looked for as whole numbers, so that a float's digits cannot match.
    leaked = [v for v in planted if re.search(
        rf"(?<!\d){re.escape(v)}(?!\d)" if v.isdigit() else re.escape(v), everything)]
    assert not leaked, leaked[:5]
    assert any(v.isdigit() for v in planted)  # the dates were planted too

    # Chance is 0.5 (balanced diagnoses); the planted signal lifts both well above it.
    score = _accuracy(federated, test_set)
    assert baseline >= 0.8, baseline
    assert score >= 0.8 and score >= baseline - 0.1, (score, baseline)


class _Concat(DicomDataset):
    """Several harmonised DICOM datasets read as one (the centralized baseline)."""

    def __init__(self, parts):  # noqa: D107 - a test helper
        self.parts = parts

    def __len__(self):
        return sum(len(p) for p in self.parts)

    def items(self, features=None, target=None, **options):
        chunks = [p.items(features, target, **options) for p in self.parts]
        return _ConcatItems(chunks)


class _ConcatItems:
    def __init__(self, chunks):
        self.chunks = chunks
        self.index = [(c, i) for c in chunks for i in range(len(c))]

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        chunk, j = self.index[i]
        return chunk[j]
