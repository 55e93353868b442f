"""ImageFolderDataset: class folders of PNG/JPEG images, registered on real nodes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fedcore import Experiment, simulate
from fedcore.data import ImageFolderDataset
from fedcore.data import synthetic as syn
from fedcore.errors import ConfigurationError, DatasetError
from fedcore.node import Node

pytest.importorskip("PIL")


def test_image_folder_reads_classes_and_pixels(tmp_path):
    root = syn.image_folder(tmp_path / "xray", n_per_class=5, size=(12, 10))
    ds = ImageFolderDataset(root)
    meta = ds.metadata()
    assert meta["n_samples"] == 10 and meta["feature_shape"] == [12, 10]
    assert meta["categories"]["target"] == ["lesion", "normal"] == ds.classes
    assert meta["class_counts"] == {"lesion": 5, "normal": 5}
    assert str(tmp_path) not in json.dumps(meta)

    X, y = ds.arrays()
    assert X.shape == (10, 12, 10) and X.dtype == np.uint8
    assert y.tolist() == ["lesion"] * 5 + ["normal"] * 5  # names: the same on every node
    region = (slice(None), *syn.signal_region((12, 10)))
    assert X[region][y == "lesion"].mean() - X[region][y == "normal"].mean() > 50
    images = list(ds.iter_images())
    assert len(images) == 10 and np.array_equal(images[7], X[7])
    train, test = ds.split(0.3, seed=1)
    x, label = test.items()[0]
    assert np.array_equal(x, X[test.indices[0]]) and label == y[test.indices[0]]
    _, index = test.items(classes=["normal", "lesion", "unseen"])[0]
    assert index == ["normal", "lesion", "unseen"].index(y[test.indices[0]])
    with pytest.raises(DatasetError, match=r"Classes \['lesion'\] of this image folder"):
        ds.items(classes=["normal"])
    assert np.array_equal(train.arrays()[0], X[train.indices])
    with pytest.raises(ConfigurationError, match="no named features"):
        ds.arrays(features=["pixels"])


def test_colour_jpegs_and_resizing(tmp_path):
    root = syn.image_folder(tmp_path / "derm", n_per_class=3, size=(8, 8), mode="RGB",
                            fmt="jpg")
    X, _ = ImageFolderDataset(root).arrays()
    assert X.shape == (6, 8, 8, 3)
    syn.image_folder(tmp_path / "derm", classes=["normal"], n_per_class=1, size=(9, 9),
                     mode="L", seed=5)  # one odd image: another size and mode
    with pytest.raises(DatasetError, match=r"differ in size \(.*is 8x8, .*is 9x9\)"):
        ImageFolderDataset(root).metadata()
    ds = ImageFolderDataset(root, size=(6, 7), mode="L")
    assert ds.arrays()[0].shape == (7, 6, 7) and ds.metadata()["feature_shape"] == [6, 7]


def test_registration_validates_first_and_maps_class_names(tmp_path):
    node = Node(tmp_path / "home", node_id="h")
    root = syn.image_folder(tmp_path / "site", n_per_class=3,
                            folders={"lesion": "Melanoma", "normal": "Benign"})
    bad = root / "Benign" / "normal_001.png"
    good = bad.read_bytes()
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match="The image Benign/normal_001.png cannot be opened"):
        node.datasets.add("skin", ["derm"], root, kind="image-folder")
    assert node.datasets.list() == []
    bad.write_bytes(good)

    plan = {"values": {"target": {"Melanoma": "lesion", "Benign": "normal"}}}
    with pytest.raises(DatasetError, match=r"holds values \['Benign'\] that the"):
        node.datasets.add("skin", ["derm"], root, kind="image-folder",
                          loading_plan={"values": {"target": {"Melanoma": "lesion"}}})
    with pytest.raises(ConfigurationError, match="may only map class names"):
        node.datasets.add("skin", ["derm"], root, kind="image-folder",
                          loading_plan={"columns": {"a": "b"}})
    entry = node.datasets.add("skin", ["derm"], root, kind="image-folder", loading_plan=plan)
    assert entry["metadata"]["categories"]["target"] == ["lesion", "normal"]
    assert entry["metadata"]["class_counts"] == {"lesion": 3, "normal": 3}
    _, y = node.datasets.load(entry["id"]).arrays()
    assert y.tolist() == ["normal"] * 3 + ["lesion"] * 3  # Benign/ (read first) is "normal"


def test_missing_pillow_names_the_extra_to_install(tmp_path):
    root = syn.image_folder(tmp_path / "imgs", n_per_class=1)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["PIL"] = None  # as if Pillow were not installed
        from fedcore.data import ImageFolderDataset
        from fedcore.errors import ConfigurationError
        try:
            ImageFolderDataset({str(root)!r}).metadata()
        except ConfigurationError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert 'pip install -c constraints.txt ".[images]"' in out.stdout, out.stderr


torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from fedcore_torch import TorchTrainingPlan  # noqa: E402


class LesionPlan(TorchTrainingPlan):
    def init_model(self):
        h, w = self.data_info["feature_shape"]
        return nn.Sequential(nn.Flatten(), nn.Linear(h * w, 2))

    def training_data(self, dataset):
        # through a DataLoader, one image read at a time; labels as indices into the
        # federation's classes, identical on every node
        return dataset.items(classes=self.classes())

    def training_step(self, data, target):
        return F.cross_entropy(self.model((data.float() - 100) / 40), target)

    def testing_step(self, data, target):
        return target, self.model((data.float() - 100) / 40).argmax(1)


def test_two_sites_with_different_class_folders_train_together(tmp_path):
    torch.set_num_threads(1)
    sites = {"node-01": ({}, None),
             "node-02": ({"lesion": "Melanoma", "normal": "Benign"},
                         {"values": {"target": {"Melanoma": "lesion", "Benign": "normal"}}})}
    with simulate.SimulatedFederation(root=tmp_path / "nodes") as fed:
        for i, (node_id, (folders, plan)) in enumerate(sites.items()):
            root = syn.image_folder(tmp_path / node_id, n_per_class=10, seed=i, folders=folders)
            fed.add_node(node_id).datasets.add("skin", ["derm"], root, kind="image-folder",
                                               loading_plan=plan)
        exp = Experiment(LesionPlan, tags=["derm"], federation=fed.url, progress=False,
                         round_limit=3, training_args={"epochs": 2, "batch_size": 5, "lr": 0.1})
        exp.run()
    h = exp.history
    assert set(h["status"]) == {"ok"}
    last = h[h["round"] == 3]
    assert (last["local_accuracy"] >= 0.75).all(), last  # chance: 0.5


class ArrayLesionPlan(LesionPlan):
    def training_data(self, dataset):
        return TorchTrainingPlan.training_data(self, dataset)  # arrays; names -> indices


def test_a_site_missing_a_class_still_labels_like_the_others(tmp_path):
    torch.set_num_threads(1)
    with simulate.SimulatedFederation(root=tmp_path / "nodes") as fed:
        full = syn.image_folder(tmp_path / "full", n_per_class=10, seed=0)
        only_normal = syn.image_folder(tmp_path / "partial", n_per_class=10, seed=1)
        shutil.rmtree(only_normal / "lesion")  # this site has seen no lesion
        fed.add_node("node-01").datasets.add("skin", ["derm"], full, kind="image-folder")
        fed.add_node("node-02").datasets.add("skin", ["derm"], only_normal,
                                             kind="image-folder")
        for plan in (LesionPlan, ArrayLesionPlan):
            exp = Experiment(plan, tags=["derm"], federation=fed.url, progress=False,
                             training_args={"epochs": 2, "batch_size": 5, "lr": 0.1})
            exp.run(3)
            last = exp.history[exp.history["round"] == 3].set_index("node")
            # "normal" is class 1 on every node, so the global model learns one meaning for
            # each class and recognises both sites' test images
            assert (last["global_accuracy"] >= 0.75).all(), last[["global_accuracy"]]
