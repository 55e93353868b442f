"""The node GUI shows each dataset's privacy budget (served for real, read over HTTP)."""

from __future__ import annotations

import html
import re
import threading

import numpy as np
import pytest

pytest.importorskip("flask")
pytest.importorskip("dp_accounting")
requests = pytest.importorskip("requests")

from fedcore.governance.ledger import PrivacyLedger  # noqa: E402
from fedcore.node import Node  # noqa: E402
from fedcore.privacy import epsilon  # noqa: E402
from fedcore_node.gui import make_gui_server  # noqa: E402

USER, PASSWORD = "carol", "a long enough password"


@pytest.fixture
def gui(tmp_path):
    node = Node(tmp_path / "home", node_id="hosp")
    rng = np.random.default_rng(0)
    node.datasets.add_arrays("cohort", ["cohort"], rng.normal(size=(50, 2)),
                             rng.integers(0, 2, 50))
    node.users.add(USER, PASSWORD, "read-only")
    server = make_gui_server(node, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield node, f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _login(url: str) -> requests.Session:
    s = requests.Session()
    token = re.search(r'name="csrf_token" value="([^"]+)"', s.get(url + "/login",
                                                                  timeout=10).text)
    assert token
    r = s.post(url + "/login", data={"csrf_token": token.group(1), "username": USER,
                                     "password": PASSWORD}, timeout=10)
    assert r.status_code == 200 and "Log out" in r.text
    return s


def test_the_dataset_pages_show_spent_and_limit(gui):
    node, url = gui
    (entry,) = node.datasets.list()
    PrivacyLedger(node.db).record(entry["id"], [(1.0, 1.0, 3)], delta=1e-5)
    node.set_policy(dp_max_epsilon=20)
    spent = epsilon([(1.0, 1.0, 3)], 1e-5)
    s = _login(url)
    listing = html.unescape(s.get(url + "/datasets", timeout=10).text)
    assert "Privacy budget (ε)" in listing and f"{spent:.3g} / 20" in listing
    page = html.unescape(s.get(f"{url}/datasets/{entry['id']}", timeout=10).text)
    assert 'id="privacy-budget"' in page
    assert f"{spent:.4g}" in page and f"{20 - spent:.4g}" in page and "δ = 1e-05" in page
