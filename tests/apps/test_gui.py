"""The node web GUI, driven by a real headless Chromium."""

from __future__ import annotations

import html
import inspect
import re
import time

import pytest

pytest.importorskip("flask")
pytest.importorskip("sklearn")
requests = pytest.importorskip("requests")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from sklearn.linear_model import SGDClassifier  # noqa: E402

from fedcore import Experiment, simulate  # noqa: E402
from fedcore.errors import RoundError  # noqa: E402
from fedcore.node import Node  # noqa: E402
from fedcore.wire.identity import Identity, fingerprint  # noqa: E402
from fedcore_sklearn import SklearnTrainingPlan  # noqa: E402
from tests._support.browser import Gui, chromium  # noqa: E402

ADMIN, ADMIN_PW = "alice", "correct horse battery"
READER, READER_PW = "bob", "staple of the hospital"


class GuiPlan(SklearnTrainingPlan):
    estimator = SGDClassifier


# --- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    yield from chromium()


@pytest.fixture
def federation(tmp_path, breast_cancer):
    Xtr, _, ytr, _ = breast_cancer
    with simulate.from_arrays(Xtr[:120], ytr[:120], n_nodes=1, tags=["breast"],
                              root=tmp_path / "fed") as fed:
        node = fed.nodes[0]
        _require_approval(node)
        node.users.add(ADMIN, ADMIN_PW, "admin")
        node.users.add(READER, READER_PW, "read-only")
        gui = Gui(node)
        try:
            yield fed, node, gui
        finally:
            gui.close()


def _require_approval(node: Node) -> None:
    node.set_policy(approval_required=True)  # simulated nodes start without review


def _experiment(fed) -> Experiment:
    return Experiment(GuiPlan, tags=["breast"], federation=fed.url,
                      model_args={"loss": "log_loss"}, training_args={"epochs": 1},
                      progress=False)


def _submit(exp: Experiment) -> None:
    """The researcher sends the plan; the node keeps it as pending, and trains nothing yet."""
    (status,) = exp.submit_plan("Logistic regression on the breast cohort.")["status"]
    assert status == "pending"


# --- browser helpers ------------------------------------------------------------------------

def _wait_text(driver, css: str, text: str) -> None:
    """Wait until the page (after a click's navigation) shows ``text`` in ``css``."""
    # A page being replaced can detach the element between look-up and read: look again.
    WebDriverWait(driver, 15, ignored_exceptions=(StaleElementReferenceException,)).until(
        expected_conditions.text_to_be_present_in_element((By.CSS_SELECTOR, css), text))


def _login(driver, gui: Gui, user: str, password: str, *, expect: str = "Log out") -> None:
    driver.delete_all_cookies()
    driver.get(gui.url + "/login")
    driver.find_element(By.ID, "username").send_keys(user)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "login").click()
    _wait_text(driver, "body", expect)


def _open_pending_plan(driver, gui: Gui, sha256: str) -> None:
    driver.get(gui.url + "/plans/")
    row = driver.find_element(By.CSS_SELECTOR, "tr.plan-row")  # pending plans come first
    assert "pending" in row.get_attribute("class")
    shown = row.find_element(By.CSS_SELECTOR, "code.hash").text
    assert shown == sha256
    driver.save_screenshot("/tmp/fedcore-gui-plans.png")
    row.find_element(By.TAG_NAME, "a").click()
    assert driver.find_element(By.ID, "plan-hash").text == sha256
    assert "class GuiPlan" in driver.find_element(By.CSS_SELECTOR, ".source").text


# --- the acceptance tests -------------------------------------------------------------------

def test_an_admin_approves_a_plan_in_the_browser_and_the_next_round_runs(federation, browser):
    fed, node, gui = federation
    exp = _experiment(fed)
    _submit(exp)
    with pytest.raises(RoundError, match="awaiting review"):
        exp.run_once()
    _login(browser, gui, ADMIN, ADMIN_PW)
    assert browser.find_element(By.TAG_NAME, "h1").text == "Status"
    assert "awaiting review" in browser.find_element(By.TAG_NAME, "body").text  # the refusal
    _open_pending_plan(browser, gui, exp.plan_hash)
    browser.find_element(By.ID, "note").send_keys("Reviewed: logistic regression only.")
    browser.find_element(By.ID, "approve").click()
    _wait_text(browser, "#plan-status", "approved")

    rows = exp.run_once()
    assert list(rows["status"]) == ["ok"] and rows["n_samples"].iloc[0] > 0

    browser.get(gui.url + "/audit")
    (row,) = browser.find_elements(By.CSS_SELECTOR, "#audit tr.event-plan-approved")
    assert exp.plan_hash in row.text and f"by {ADMIN}" in row.text and "Reviewed" in row.text
    browser.find_element(By.ID, "verify").click()
    _wait_text(browser, ".flash", "Audit log intact")
    exp.close()


def test_a_rejected_plan_fails_the_researchers_round_with_the_note(federation, browser):
    fed, node, gui = federation
    exp = _experiment(fed)
    _submit(exp)
    _login(browser, gui, ADMIN, ADMIN_PW)
    _open_pending_plan(browser, gui, exp.plan_hash)
    note = "Exports row-level predictions; not allowed under our ethics approval."
    browser.find_element(By.ID, "note").send_keys(note)
    browser.find_element(By.ID, "reject").click()
    _wait_text(browser, "#plan-status", "rejected")
    assert browser.find_element(By.ID, "plan-note").text == note

    with pytest.raises(RoundError) as info:
        exp.run_once()
    assert note in str(info.value)
    exp.close()


def test_a_wrong_password_does_not_log_in(federation, browser):
    _, node, gui = federation
    _login(browser, gui, ADMIN, "not the password", expect="Wrong user name or password")
    assert "Log out" not in browser.find_element(By.TAG_NAME, "body").text
    browser.get(gui.url + "/plans/")
    assert browser.current_url.startswith(gui.url + "/login")
    assert any(r["event"] == "login" and r["user"] == ADMIN and r["ok"] is False
               for r in node.audit_log())


# --- security without a browser -------------------------------------------------------------

def _csrf(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the form"
    return match.group(1)


def _session(gui: Gui, user: str, password: str) -> requests.Session:
    s = requests.Session()
    token = _csrf(s.get(gui.url + "/login", timeout=10).text)
    r = s.post(gui.url + "/login", data={"csrf_token": token, "username": user,
                                         "password": password}, timeout=10)
    assert r.status_code == 200 and "Log out" in r.text
    return s


def test_a_form_posted_without_the_csrf_token_is_refused(federation):
    fed, node, gui = federation
    s = requests.Session()
    r = s.post(gui.url + "/login", data={"username": ADMIN, "password": ADMIN_PW}, timeout=10)
    assert r.status_code == 400 and "CSRF" in r.text
    s = _session(gui, ADMIN, ADMIN_PW)
    exp = _experiment(fed)
    _submit(exp)
    r = s.post(f"{gui.url}/plans/{exp.plan_hash}/approve", data={"note": "ok"}, timeout=10)
    assert r.status_code == 400
    r = s.post(f"{gui.url}/plans/{exp.plan_hash}/approve",
               data={"note": "ok", "csrf_token": "forged"}, timeout=10)
    assert r.status_code == 400
    assert node.plans.status(exp.plan_hash) == "pending"
    exp.close()


def test_a_read_only_user_sees_plans_but_cannot_approve(federation):
    fed, node, gui = federation
    exp = _experiment(fed)
    _submit(exp)
    s = _session(gui, READER, READER_PW)
    page = s.get(f"{gui.url}/plans/{exp.plan_hash}", timeout=10)
    assert page.status_code == 200 and exp.plan_hash in page.text
    assert 'id="approve"' not in page.text
    r = s.post(f"{gui.url}/plans/{exp.plan_hash}/approve",
               data={"note": "sneaky", "csrf_token": _csrf(page.text)}, timeout=10)
    assert r.status_code == 403
    assert node.plans.status(exp.plan_hash) == "pending"
    exp.close()


def test_the_status_page_names_trusted_researchers_by_128_bit_fingerprints(federation,
                                                                           tmp_path):
    _, node, gui = federation
    key = Identity(tmp_path / "alice.key")
    node.trust("alice", key.public_key)
    page = _session(gui, READER, READER_PW).get(gui.url + "/", timeout=10)
    assert page.status_code == 200 and "alice" in page.text
    assert fingerprint(key.public_bytes) in page.text
    assert len(fingerprint(key.public_bytes).replace(":", "")) == len("SHA256") + 32


def test_an_admin_edits_datasets_and_policy_through_the_forms(federation, tmp_path):
    _, node, gui = federation
    s = _session(gui, ADMIN, ADMIN_PW)
    token = _csrf(s.get(gui.url + "/datasets", timeout=10).text)
    csv = tmp_path / "extra.csv"
    csv.write_text("age,label\n" + "".join(f"{20 + i},{i % 2}\n" for i in range(12)))
    r = s.post(gui.url + "/datasets", data={"csrf_token": token, "name": "extra",
                                            "tags": "extra,2026", "path": str(csv)}, timeout=10)
    assert r.status_code == 200 and "Registered 'extra'" in html.unescape(r.text)
    assert "12 samples" in r.text
    (entry,) = [e for e in node.datasets.list() if e["name"] == "extra"]
    page = s.get(f"{gui.url}/datasets/{entry['id']}", timeout=10)
    assert "<code>age</code>" in page.text and "int64" in page.text
    r = s.post(f"{gui.url}/datasets/{entry['id']}/remove", data={"csrf_token": token},
               timeout=10)
    assert r.status_code == 200 and all(e["name"] != "extra" for e in node.datasets.list())

    # The policy form: one field per setting, empty fields keep their defaults.
    r = s.post(gui.url + "/policy", data={"csrf_token": token, "max_epochs": "three"},
               timeout=10)
    assert r.status_code == 400 and "max_epochs must be a whole number" in html.unescape(
        r.text)
    assert node.policy["max_epochs"] is None  # nothing saved
    r = s.post(gui.url + "/policy", data={"csrf_token": token, "approval_required": "true",
                                          "max_epochs": "3"}, timeout=10)
    assert r.status_code == 200 and "Policy saved" in r.text
    assert node.policy["max_epochs"] == 3
    (change,) = [e for e in node.audit_log() if e["event"] == "policy-changed"
                 and e.get("by") == ADMIN]
    assert "max_epochs" in change["changes"]


def test_an_admin_sets_the_policy_in_a_form_with_errors_at_their_fields(federation, browser):
    _, node, gui = federation
    _login(browser, gui, ADMIN, ADMIN_PW)
    browser.get(gui.url + "/policy")
    # Every setting has its own field, its meaning and its default; no TOML to write.
    assert not browser.find_elements(By.ID, "policy")  # the raw TOML text area is gone
    row = browser.find_element(By.ID, "row-min_count")
    assert "statistics: the fewest records" in row.text and "5" in row.text
    field = browser.find_element(By.ID, "field-max_epochs")
    field.clear()
    field.send_keys("three")
    access = browser.find_element(By.ID, "field-dataset_access")
    access.send_keys("alice diabetes")  # the colon is missing
    _select(browser, "field-on_excess", "refuse")
    browser.find_element(By.ID, "save-policy").click()
    _wait_text(browser, "#error-max_epochs", "must be a whole number")
    assert "expected 'RESEARCHER: DATASET" in browser.find_element(
        By.ID, "error-dataset_access").text
    assert not browser.find_elements(By.ID, "error-on_excess")  # that one was right
    assert node.policy["max_epochs"] is None and node.policy["on_excess"] == "clamp"
    # What was typed is kept: correct the two fields and save.
    assert browser.find_element(By.ID, "field-max_epochs").get_attribute("value") == "three"
    field = browser.find_element(By.ID, "field-max_epochs")
    field.clear()
    field.send_keys("4")
    access = browser.find_element(By.ID, "field-dataset_access")
    access.clear()
    access.send_keys("alice: diabetes, cohort-b\n*: public")
    browser.find_element(By.ID, "save-policy").click()
    _wait_text(browser, ".flash", "Policy saved")
    assert node.policy["max_epochs"] == 4 and node.policy["on_excess"] == "refuse"
    assert node.policy["dataset_access"] == {"alice": ["diabetes", "cohort-b"],
                                             "*": ["public"]}
    # The saved page shows the values as the fields hold them, and emptying a field
    # restores the default.
    field = browser.find_element(By.ID, "field-max_epochs")
    assert field.get_attribute("value") == "4"
    field.clear()
    browser.find_element(By.ID, "save-policy").click()
    _wait_text(browser, ".flash", "Policy saved")
    assert node.policy["max_epochs"] is None and node.policy["on_excess"] == "refuse"
    changes = [e["changes"] for e in node.audit_log() if e["event"] == "policy-changed"
               and e.get("by") == ADMIN]
    assert changes[-1] == {"max_epochs": [4, None]}


def _select(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, element_id)).select_by_value(value)


def test_a_read_only_user_changes_nothing(federation):
    _, node, gui = federation
    s = _session(gui, READER, READER_PW)
    page = s.get(gui.url + "/policy", timeout=10)
    assert page.status_code == 200 and 'id="save-policy"' not in page.text
    token = _csrf(page.text)  # the logout form's
    for path, data in [("/policy", {"policy": "max_epochs = 1\n"}),
                       ("/datasets", {"name": "x", "tags": "x", "path": "/etc/hostname"}),
                       ("/users", {"username": "eve", "password": "0123456789",
                                   "role": "admin"})]:
        r = s.post(gui.url + path, data={"csrf_token": token, **data}, timeout=10)
        assert r.status_code == 403, path
    assert node.policy["max_epochs"] is None
    assert [u["username"] for u in node.users.list()] == [ADMIN, READER]


def test_cookies_are_locked_down_and_sessions_expire(tmp_path):
    node = Node(tmp_path / "home", node_id="n1")
    node.users.add(ADMIN, ADMIN_PW, "admin")
    gui = Gui(node, session_minutes=1 / 60)  # one second
    try:
        s = _session(gui, ADMIN, ADMIN_PW)
        cookie = next(iter(s.cookies))
        assert cookie.has_nonstandard_attr("HttpOnly")
        assert cookie.get_nonstandard_attr("SameSite") == "Strict"
        r = s.get(gui.url + "/", timeout=10)
        assert r.status_code == 200 and "Status" in r.text
        assert "default-src 'none'" in r.headers["Content-Security-Policy"]
        time.sleep(1.5)
        r = s.get(gui.url + "/", timeout=10)
        assert r.url.startswith(gui.url + "/login")
    finally:
        gui.close()


def test_without_users_the_gui_says_how_to_create_the_first_admin(tmp_path):
    node = Node(tmp_path / "home", node_id="n1")
    gui = Gui(node)
    try:
        r = requests.get(gui.url + "/", timeout=10)
        assert r.status_code == 503 and "user add" in r.text and "default password" in r.text
    finally:
        gui.close()


def test_the_gui_binds_to_loopback_by_default():
    from fedcore_node.gui import serve

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"


def test_the_plan_page_shows_every_file_of_a_package_plan(federation, tmp_path):
    import sys

    from tests._support.plan_package import make_package, packaged_plan

    fed, _, gui = federation
    pkg = make_package(tmp_path / "project", scale=0.75)
    sys.path.insert(0, str(tmp_path / "project"))
    try:
        exp = Experiment(packaged_plan(pkg), tags=["breast"], federation=fed.url,
                         model_args={"loss": "log_loss"}, progress=False)
        _submit(exp)
    finally:
        sys.path.remove(str(tmp_path / "project"))
    page = _session(gui, READER, READER_PW).get(f"{gui.url}/plans/{exp.plan_hash}",
                                                timeout=10)
    text = html.unescape(re.sub(r"<[^>]+>", "", page.text))
    assert page.status_code == 200
    for name in (f"{pkg}/__init__.py", f"{pkg}/features.py", f"{pkg}/plan.py", "plan.py"):
        assert name in text
    assert "np.tanh(np.asarray(X) * 0.75)" in text
    exp.close()
