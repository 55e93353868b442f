"""GUI logins that hold: concurrent guessing, the memory of password hashing, ``next``.

The floods go to a real ``fedcore-node gui`` process (its peak memory is read from
/proc), sent by 40 threads at once, each with its own session and CSRF token; what the
administrator then sees is checked in a real headless Chromium. The number of passwords
checked is counted from the audit log, where every password check leaves a ``login`` record.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

pytest.importorskip("flask")
requests = pytest.importorskip("requests")
pytest.importorskip("selenium.webdriver")

from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from fedcore.node import Node  # noqa: E402
from fedcore_node.gui import create_app  # noqa: E402
from fedcore_node.gui.auth import safe_next  # noqa: E402
from tests._support.browser import Gui, chromium  # noqa: E402
from tests._support.net import free_port  # noqa: E402

ADMIN, ADMIN_PW = "alice", "correct horse battery"
GUESSES = 40
LIMIT = 5  # the documented per-user limit
PEAK_MIB = 500


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


@dataclass
class GuiProcess:
    home: Path
    url: str
    proc: subprocess.Popen[bytes]

    def peak_mib(self) -> float:
        """The process's peak resident memory so far (VmHWM), in MiB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        assert match, status
        return int(match.group(1)) / 1024

    def logins(self, user: str | None = None) -> list[dict]:
        """The ``login`` audit records (one per password checked)."""
        records = [json.loads(line) for line in
                   (self.home / "audit.jsonl").read_text().splitlines() if line.strip()]
        return [r for r in records if r["event"] == "login"
                and (user is None or r["user"] == user)]


@pytest.fixture
def gui_process(tmp_path) -> Iterator[GuiProcess]:
    """``fedcore-node gui`` for a node with one administrator, in a process of its own."""
    home = tmp_path / "home"
    node = Node(home, node_id="n1")
    node.users.add(ADMIN, ADMIN_PW, "admin")
    node._close_audit()
    port = free_port()
    with open(tmp_path / "gui.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedcore_node", "--home", str(home), "gui", "--port",
             str(port)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, (tmp_path / "gui.log").read_text()
            assert time.monotonic() < deadline, "the GUI did not start"
            time.sleep(0.05)
        yield GuiProcess(home, f"http://127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _token(session: requests.Session, url: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"',
                      session.get(url + "/login", timeout=30).text)
    assert match, "no CSRF token in the login form"
    return match.group(1)


def _flood(url: str, users: list[str]) -> list[requests.Response]:
    """One wrong-password login per user name in ``users``, all sent at the same moment."""
    sessions = [requests.Session() for _ in users]
    tokens = [_token(s, url) for s in sessions]
    start = threading.Barrier(len(users))
    answers: list[requests.Response | None] = [None] * len(users)

    def guess(i: int) -> None:
        start.wait()
        answers[i] = sessions[i].post(url + "/login", timeout=120, data={
            "csrf_token": tokens[i], "username": users[i], "password": f"guess number {i}"})

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(len(users))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert all(a is not None for a in answers), "a guess got no answer"
    return [a for a in answers if a is not None]


def _browser_login(driver, url: str, user: str, password: str, next_: str | None = None
                   ) -> None:
    driver.delete_all_cookies()
    target = url + "/login" + ("" if next_ is None else "?next=" + quote(next_, safe=""))
    driver.get(target)
    driver.find_element(By.ID, "username").send_keys(user)
    driver.find_element(By.ID, "password").send_keys(password)
    button = driver.find_element(By.ID, "login")
    button.click()
    # Wait for the answer page to replace the form: reading the page before that reads
    # the login page, or an element the navigation detaches under the reader.
    # While Chromium tears the old document down, asking about the button can also fail
    # with a transient inspector error: ask again until the button is gone.
    WebDriverWait(driver, 15, ignored_exceptions=(WebDriverException,)).until(
        expected_conditions.staleness_of(button))


def test_40_concurrent_guesses_for_one_user_check_at_most_5_passwords(gui_process, browser):
    answers = _flood(gui_process.url, [ADMIN] * GUESSES)
    codes = sorted(a.status_code for a in answers)
    assert set(codes) <= {401, 429}, codes
    assert codes.count(401) <= LIMIT
    refused = [a for a in answers if a.status_code == 429]
    assert len(refused) >= GUESSES - LIMIT
    assert all(int(a.headers["Retry-After"]) >= 1 for a in refused)
    checked = gui_process.logins(ADMIN)
    assert 1 <= len(checked) <= LIMIT and not any(r["ok"] for r in checked)
    assert gui_process.peak_mib() < PEAK_MIB

    # Guessing on, one at a time: the name locks after the 5th wrong password in all.
    for _ in range(2 * LIMIT):
        if _flood(gui_process.url, [ADMIN])[0].status_code == 429:
            break
    assert len(gui_process.logins(ADMIN)) == LIMIT
    # The administrator, even with the right password, is told to wait.
    _browser_login(browser, gui_process.url, ADMIN, ADMIN_PW)
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "Too many login attempts" in body and "Log out" not in body
    assert len(gui_process.logins(ADMIN)) == LIMIT  # and no password was checked


def test_40_concurrent_guesses_for_different_users_keep_the_gui_small(gui_process):
    baseline = gui_process.peak_mib()
    answers = _flood(gui_process.url, [f"user{i}" for i in range(GUESSES)])
    assert {a.status_code for a in answers} <= {401, 429}
    busy = [a for a in answers if a.status_code == 429]
    assert busy and all(a.headers.get("Retry-After") for a in busy)
    # 40 argon2 hashes at once would need 2.5 GiB; at most a couple run at any moment, and
    # one address gets at most 20 attempts a minute.
    assert len(gui_process.logins()) <= 20
    peak = gui_process.peak_mib()
    assert peak < PEAK_MIB, f"peak {peak:.0f} MiB (before the flood: {baseline:.0f} MiB)"


EVIL = ["/\t/evil.example", "/\n/evil.example", "//evil.example", "/\\evil.example",
        "\\/evil.example", "https://evil.example/", "/%2F/evil.example",
        "/./\\evil.example", " //evil.example", "javascript:alert(1)"]


def test_the_redirect_trick_lands_on_a_gui_page(tmp_path, browser):
    node = Node(tmp_path / "home", node_id="n1")
    node.users.add(ADMIN, ADMIN_PW, "admin")
    gui = Gui(node)
    try:
        for target in EVIL:
            _browser_login(browser, gui.url, ADMIN, ADMIN_PW, target)
            assert browser.find_element(By.TAG_NAME, "h1").text == "Status", target
            assert browser.current_url == gui.url + "/", (target, browser.current_url)
        _browser_login(browser, gui.url, ADMIN, ADMIN_PW, "/plans/?status=pending")
        assert browser.current_url == gui.url + "/plans/?status=pending"  # a real next
    finally:
        gui.close()


@pytest.mark.parametrize("target", EVIL + ["/\\\\evil", "/..//evil", "///evil", "", None])
def test_next_refuses_every_path_a_browser_reads_as_another_site(tmp_path, target):
    app = create_app(Node(tmp_path / "home", node_id="n1"))
    with app.test_request_context():
        assert safe_next(target) == "/"


@pytest.mark.parametrize("target", ["/plans/", "/plans/abc?x=1", "/audit?event=login",
                                    "/datasets/ds-1"])
def test_next_keeps_paths_of_this_site(tmp_path, target):
    app = create_app(Node(tmp_path / "home", node_id="n1"))
    with app.test_request_context():
        assert safe_next(target) == target
