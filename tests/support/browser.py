"""The web UI tests' processes and page helpers: ``msknode web`` in a subprocess, headless Chromium.

`web_server(data_dir, log_path, **env)` runs the real ``msknode web`` on a free loopback port
until it answers and yields its base URL; `chromium()` yields a Selenium driver of the
Debian chromium + chromedriver with a throw-away profile. Both stop what they started when the
``with`` block ends (and are registered with `support.servers`, so an interrupted run stops
them too). ``tests/conftest.py`` has the ``browser`` fixture.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from node.demo.loopback import child_env
from support.env import ROOT, VENV_BIN, free_port
from support.servers import track, untrack

ADMIN = ("alice", "alice-password-1")
READER = ("rob", "rob-password-12")
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1600,1000",
    "--force-device-scale-factor=1",
)


@contextmanager
def web_server(data_dir: Path, log_path: Path, *, timeout: float = 30.0, **env: object) -> Iterator[str]:
    """``msknode web`` on a free 127.0.0.1 port with ``MSKNODE_DATA_DIR=data_dir`` and ``env``
    (``MSKNODE_*`` settings); yields ``http://127.0.0.1:PORT`` once ``/health`` answers (no login)."""
    port = free_port()
    child = child_env(
        MSKNODE_DATA_DIR=data_dir,
        MSKNODE_WEB_PORT=port,
        MSKNODE_WEB_HOST="127.0.0.1",
        MSKNODE_LOG_LEVEL="WARNING",
        **env,
    )
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(VENV_BIN / "msknode"), "web"], env=child, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT
        )

        def stop() -> None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

        token = track(f"msknode web {url} pid {proc.pid}", stop)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError):
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise RuntimeError("msknode web did not start: " + Path(log_path).read_text()[-2000:])
                time.sleep(0.2)
            yield url
        finally:
            stop()
            untrack(token)


@contextmanager
def chromium(*, page_load_timeout: float = 30.0):
    """A headless Chromium driven through chromedriver (Selenium), with the browser console log."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="msknode-chromium-")
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={profile}",):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    token = None
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        token = track(f"chromedriver pid {driver.service.process.pid}", driver.quit)
        driver.set_page_load_timeout(page_load_timeout)
        try:
            yield driver
        finally:
            driver.quit()
    finally:
        untrack(token)
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver, seconds: float = 10):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds)


def login(driver, base: str, who: tuple[str, str]) -> None:
    """Signs in on the login form of the worklist and waits for the worklist."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    driver.delete_all_cookies()
    driver.get(base + "/worklist")
    wait(driver).until(EC.presence_of_element_located((By.ID, "login-form")))
    driver.find_element(By.ID, "username").send_keys(who[0])
    driver.find_element(By.ID, "password").send_keys(who[1])
    driver.find_element(By.ID, "login-submit").click()
    wait(driver).until(EC.presence_of_element_located((By.ID, "worklist")))


def api_get(base: str, who: tuple[str, str], path: str, *, timeout: float = 30.0):
    """The JSON answer of ``GET base+path`` with a bearer token of ``who`` (``POST /api/auth/token``,
    10 s); ``timeout`` is the GET's deadline."""
    req = urllib.request.Request(
        base + "/api/auth/token",
        method="POST",
        data=json.dumps({"username": who[0], "password": who[1]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        token = json.load(r)["access_token"]
    req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def shot(driver, path: Path) -> None:
    """A screenshot of the page, checked to be full width and not blank."""
    from PIL import Image

    driver.save_screenshot(str(path))
    with Image.open(path) as img:
        assert img.size[0] >= 1200 and img.getbbox() is not None


def console_errors(driver) -> list[str]:
    """Errors the page logged (script errors, CSP violations, failed loads) since the last call."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def image_loaded(driver, element_id: str) -> bool:
    return driver.execute_script(
        "var i = document.getElementById(arguments[0]); return !!(i && i.complete && i.naturalWidth > 0);", element_id
    )
