"""The node GUI served from a test, and a real headless Chromium to drive it.

Shared by the GUI tests (tests/apps/test_gui*.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from fedcore.node import Node

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


class Gui:
    """The GUI of ``node`` served from this process on a free loopback port."""

    def __init__(self, node: Node, **options: Any):
        from fedcore_node.gui import make_gui_server

        self.node = node
        self.server = make_gui_server(node, "127.0.0.1", 0, **options)
        self.url = f"http://127.0.0.1:{self.server.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


def _chromium_installed() -> bool:
    return os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)


def _install_chromium() -> str:
    """Install the Debian packages as scripts/test.sh does; returns why not, or ''."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "not root or no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=540)
        if done.returncode:
            return f"{' '.join(cmd)} failed: {done.stderr[-500:]}"
    return ""


def chromium() -> Iterator[Any]:
    """A headless Chromium (selenium WebDriver); use as a module-scoped fixture's body."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    if not _chromium_installed():
        why = _install_chromium()
        if not _chromium_installed():
            pytest.skip(f"Chromium could not be installed ({why}); the GUI browser tests need "
                        "the Debian packages chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000",
                "--disable-dev-shm-usage"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    except WebDriverException as exc:
        pytest.fail(f"Chromium is installed but would not start: {exc.msg}")
    driver.implicitly_wait(5)
    yield driver
    driver.quit()
