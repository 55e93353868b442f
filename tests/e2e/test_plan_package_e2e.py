"""A plan in a two-file package trains on deployed ``fedcore-node`` processes whose import
path lacks the package: the helper ships in the bundle, each administrator reviews every file
with ``fedcore-node plan show`` and approves the hash; a changed helper is another plan, whose
``plan diff`` shows the helper's change."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("websockets")

from fedcore import Experiment  # noqa: E402
from tests._support.deployment import node_processes, write_csv  # noqa: E402
from tests._support.net import free_port  # noqa: E402
from tests._support.plan_package import make_package, packaged_plan  # noqa: E402
from tests._support.trust import enroll  # noqa: E402

NODES = ("site-a", "site-b")
TAG = "package-e2e"


def _cli(capsys, home: Path, *args: str) -> str:
    from fedcore_node.cli import main

    capsys.readouterr()
    assert main(["--home", str(home), *args]) == 0
    return capsys.readouterr().out


def test_a_two_file_package_plan_trains_on_deployed_nodes(tmp_path, capsys):
    project = tmp_path / "project"  # the researcher's folder: on this process's path only
    project.mkdir()
    pkg = make_package(project, scale=0.5)
    homes = {n: tmp_path / n for n in NODES}
    for i, (node_id, home) in enumerate(homes.items()):
        _cli(capsys, home, "init", "--id", node_id)
        _cli(capsys, home, "dataset", "add", "--name", "cohort", "--tags", TAG, "--path",
             str(write_csv(tmp_path / f"{node_id}.csv", i)))
    enrolled = enroll(homes)
    url = f"ws://127.0.0.1:{free_port()}?retry_max=0.5"
    sys.path.insert(0, str(project))
    try:
        plan = packaged_plan(pkg)
        with node_processes(homes, url):
            exp = Experiment(plan, tags=[TAG], federation=url, nodes=list(NODES), seed=3,
                             model_args={"target": "label"}, training_args={"epochs": 2},
                             progress=False, connect_timeout=20, enrolled=enrolled)
            try:
                assert set(exp.submit_plan("packaged")["status"]) == {"pending"}
                for home in homes.values():  # the administrator reviews every file
                    shown = _cli(capsys, home, "plan", "show", exp.plan_hash[:12])
                    for name in (f"{pkg}/__init__.py", f"{pkg}/features.py",
                                 f"{pkg}/plan.py", "plan.py"):
                        assert f"--- {name} ---" in shown
                    assert "np.tanh(np.asarray(X) * 0.5)" in shown
                    _cli(capsys, home, "plan", "approve", exp.plan_hash[:12])
                rows = exp.run(2)
                assert rows["status"].tolist() == ["ok"] * 4, rows
                assert (rows["local_accuracy"] > 0.7).all(), rows
                first = exp.plan_hash

                # The researcher edits the helper only: another hash, refused until reviewed.
                features = project / pkg / "features.py"
                features.write_text(features.read_text().replace("* 0.5", "* 0.25"))
                exp.plan = packaged_plan(pkg)
                assert exp.plan_hash != first
                assert set(exp.submit_plan("smaller scale")["status"]) == {"pending"}
                diff = _cli(capsys, homes["site-a"], "plan", "diff", exp.plan_hash[:12])
                assert f"+++ {exp.plan_hash[:12]}/{pkg}/features.py" in diff
                assert "-    return np.tanh(np.asarray(X) * 0.5)" in diff
                assert "+    return np.tanh(np.asarray(X) * 0.25)" in diff
            finally:
                exp.close()
    finally:
        sys.path.remove(str(project))
