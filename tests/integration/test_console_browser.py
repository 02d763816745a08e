"""The web console in a real browser (Debian's Chromium, headless, driven by Selenium through
chromedriver) against a real server with its embedded broker and a real device agent.
One browser for the module; the screenshots of docs/console/ are taken here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from device_agent.exit_codes import ExitCode
from enroll_server.enrollment.operators import add_operator
from enroll_server.home.config import load_config as load_server_config
from enroll_server.registry import DeviceState, OperatorRole
from fleetpki.identity import DeviceId
from provisioning.batch import provision_batch
from tests.live_server import LiveServer, start_live_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parents[2]
# The screenshots in docs/console/ (the README shows one) come from these tests; they are
# rewritten only when asked: FLEETPKI_CONSOLE_SCREENSHOTS=1 pytest THIS_FILE
SHOTS = REPO / "docs" / "console"
FLEET = 3000  # devices in the registry besides the test's own


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_live_server(tmp_path_factory.mktemp("browser") / "home", broker=True)
    try:
        provision_batch(
            live.registry,
            live.layout,
            load_server_config(live.layout.config),
            count=FLEET,
            prefix="sensor-",
            token_ttl=None,
            now=datetime.now(UTC),
            actor="test",
            note="line 3, plant north",
        )
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads: Path) -> Iterator[WebDriver]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in CI containers
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,860",
        # The test CA is not in the browser's store; trust is the console's TLS listener's.
        "--ignore-certificate-errors",
    ):
        options.add_argument(arg)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception:
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def token_for(server: LiveServer, name: str, role: OperatorRole) -> str:
    return add_operator(server.registry, name, role, datetime.now(UTC), actor="test")


def log_in(driver: WebDriver, server: LiveServer, token: str) -> None:
    driver.delete_all_cookies()
    driver.get(server.admin_url + "/console/login")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login").click()
    wait_for("the overview", lambda: driver.find_element(By.ID, "operator"))


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("FLEETPKI_CONSOLE_SCREENSHOTS") == "1":
        return SHOTS
    return tmp_path_factory.mktemp("screenshots")


def shot(driver: WebDriver, folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(folder / f"{name}.png"))


def sessions(server: LiveServer) -> dict[str, int]:
    async def read() -> dict[str, int]:
        assert server.handle.broker is not None
        return server.handle.broker.sessions()

    return server.call(read())


def test_log_in_and_find_a_device_among_thousands(browser: WebDriver, server: LiveServer) -> None:
    browser.get(server.admin_url + "/console/")
    assert browser.current_url.endswith("/console/login")
    log_in(browser, server, token_for(server, "alice", OperatorRole.ADMIN))
    assert browser.find_element(By.ID, "count-provisioned").text == str(FLEET)
    browser.get(server.admin_url + "/console/devices")
    search = browser.find_element(By.ID, "search")
    search.send_keys("sensor-00271")
    browser.find_element(By.ID, "find").click()
    wait_for("the result", lambda: "10 devices" in browser.find_element(By.ID, "total").text)
    rows = browser.find_elements(By.CSS_SELECTOR, "#devices td a[href*='/devices/']")
    assert [r.text for r in rows] == [f"sensor-00271{i}" for i in range(10)]
    rows[8].click()
    wait_for(
        "the device page", lambda: browser.find_element(By.ID, "device-id").text == "sensor-002718"
    )
    assert browser.find_element(By.ID, "device-state").text == "provisioned"


def _extract(tar_path: Path, into: Path) -> None:
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")


def _agent_toml(bundle: Path, server: LiveServer) -> Path:
    """The bundle's agent.toml as written; only the ports are the test server's (it listens
    on ephemeral ones, the config names the defaults)."""
    text = (bundle / "agent.toml").read_text()
    text = re.sub(r"(server = \"https://[^:\"]+):\d+", rf"\g<1>:{server.handle.est_port}", text)
    text = re.sub(r"(?m)^port = \d+", f"port = {server.mqtt_port}", text)
    (bundle / "agent.toml").write_text(text)
    return bundle / "agent.toml"


def test_batch_bundles_enroll_an_agent_whose_revocation_drops_it_live(
    browser: WebDriver, server: LiveServer, downloads: Path, shots: Path, tmp_path: Path
) -> None:
    # Create a batch and download its bundles (once).
    browser.get(server.admin_url + "/console/batches")
    count = browser.find_element(By.ID, "count")
    count.clear()
    count.send_keys("4")
    prefix = browser.find_element(By.ID, "prefix")
    prefix.clear()
    prefix.send_keys("pi-")
    browser.find_element(By.ID, "note").send_keys("bench rack B")
    browser.find_element(By.ID, "create").click()
    wait_for("the batch", lambda: browser.find_element(By.ID, "to-download"), 30)
    browser.find_element(By.ID, "to-download").click()
    browser.find_element(By.ID, "download").click()
    tar_path = wait_for(
        "the download",
        lambda: next((p for p in downloads.glob("*-bundles.tar")), None),
        30,
    )
    wait_for("the download to finish", lambda: not list(downloads.glob("*.crdownload")))
    _extract(tar_path, tmp_path / "bundles")
    bundle = tmp_path / "bundles" / "pi-000001"
    assert (bundle / "token").stat().st_mode & 0o077 == 0
    # A real agent enrolls with it and connects to the embedded broker.
    config = _agent_toml(bundle, server)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    agent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from device_agent.cli import main; raise SystemExit(main())",
            "run",
            "--config",
            str(config),
        ],
        cwd=bundle,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for("the agent's MQTT session", lambda: "pi-000001" in sessions(server), 30)
        # The overview in one tab, the device in another.
        browser.get(server.admin_url + "/console/")
        overview = browser.current_window_handle
        wait_for(
            "the live stream", lambda: browser.find_element(By.ID, "live-status").text == "live"
        )
        revoked_before = int(browser.find_element(By.ID, "count-revoked").text)
        assert browser.find_element(By.ID, "count-connected").text == "1"
        shot(browser, shots, "overview")
        browser.switch_to.new_window("tab")
        browser.get(server.admin_url + "/console/devices/pi-000001")
        assert browser.find_element(By.ID, "connected").text == "yes"
        assert browser.find_element(By.ID, "device-state").text == "active"
        shot(browser, shots, "device")
        reason = browser.find_element(By.ID, "reason")
        reason.clear()
        reason.send_keys("key-compromise")
        clicked = time.monotonic()
        browser.find_element(By.ID, "revoke").click()
        wait_for(
            "the revoked state",
            lambda: browser.find_element(By.ID, "device-state").text == "revoked",
        )
        wait_for("the session to drop", lambda: "pi-000001" not in sessions(server), 5)
        dropped_in = time.monotonic() - clicked
        browser.refresh()  # the page shows the broker's sessions as they were when rendered
        assert browser.find_element(By.ID, "connected").text == "no"
        assert agent.wait(30) == ExitCode.REFUSED  # the agent stops: revoked
        # The overview, never reloaded, counts it.
        browser.switch_to.window(overview)
        wait_for(
            "the overview to count the revocation",
            lambda: browser.find_element(By.ID, "count-revoked").text == str(revoked_before + 1),
            10,
        )
        wait_for(
            "the live event", lambda: "pi-000001" in browser.find_element(By.ID, "live-list").text
        )
        assert dropped_in < 5, dropped_in
    finally:
        if agent.poll() is None:
            agent.kill()
        agent.wait(10)
    entry = server.registry.audit_log(device_id=DeviceId("pi-000001"), limit=1)[0]
    assert (entry.actor, entry.action, entry.detail["reason"]) == (
        "operator:alice",
        "device.revoke",
        "keyCompromise",
    )
    browser.get(server.admin_url + "/console/batches")
    shot(browser, shots, "batches")
    browser.get(server.admin_url + "/console/devices?q=sensor-0001")
    shot(browser, shots, "devices")
    browser.get(server.admin_url + "/console/audit")
    shot(browser, shots, "audit")


def _post_form(driver: WebDriver, action: str, fields: dict[str, str]) -> None:
    """A form the page never offered, built and sent by script (as a forger would)."""
    driver.execute_script(
        """const f = document.createElement('form'); f.method = 'post'; f.action = arguments[0];
        for (const [k, v] of Object.entries(arguments[1])) {
          const i = document.createElement('input'); i.type = 'hidden'; i.name = k; i.value = v;
          f.appendChild(i); }
        document.body.appendChild(f); f.submit();""",
        action,
        fields,
    )


def test_a_viewer_sees_no_action_and_cannot_forge_one(
    browser: WebDriver, server: LiveServer
) -> None:
    log_in(browser, server, token_for(server, "victor", OperatorRole.VIEWER))
    browser.get(server.admin_url + "/console/devices/sensor-000010")
    assert browser.find_elements(By.ID, "actions") == []
    assert [b.text for b in browser.find_elements(By.TAG_NAME, "button")] == ["Log out"]
    browser.get(server.admin_url + "/console/batches")
    assert browser.find_elements(By.ID, "create-batch") == []
    csrf = browser.find_element(By.NAME, "csrf").get_attribute("value")  # the logout form's
    _post_form(
        browser, "/console/devices/sensor-000010/revoke", {"csrf": csrf, "reason": "key-compromise"}
    )
    wait_for("the refusal", lambda: "read only" in browser.find_element(By.ID, "why").text)
    found = server.registry.get_device(DeviceId("sensor-000010"))
    assert found is not None and found.state is DeviceState.PROVISIONED


def test_a_post_without_csrf_token_is_refused(browser: WebDriver, server: LiveServer) -> None:
    log_in(browser, server, token_for(server, "carol", OperatorRole.ADMIN))
    browser.get(server.admin_url + "/console/devices/sensor-000011")
    _post_form(browser, "/console/devices/sensor-000011/suspend", {})
    wait_for("the refusal", lambda: "CSRF" in browser.find_element(By.ID, "why").text)
    found = server.registry.get_device(DeviceId("sensor-000011"))
    assert found is not None and found.state is DeviceState.PROVISIONED


def test_markup_in_a_revocation_reason_renders_as_text(
    browser: WebDriver, server: LiveServer
) -> None:
    log_in(browser, server, token_for(server, "xavier", OperatorRole.ADMIN))
    browser.get(server.admin_url + "/console/devices/sensor-000012")
    payload = (
        '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'
    )
    reason = browser.find_element(By.ID, "reason")
    reason.clear()
    reason.send_keys(payload)
    browser.find_element(By.ID, "revoke").click()
    error = wait_for("the error", lambda: browser.find_element(By.ID, "error"))
    # Shown as the characters typed (the error quotes the value it refused).
    assert '<img src=x onerror="document.title=' in error.text
    assert '<script>document.title="pwned"</script>' in error.text
    assert browser.title != "pwned"
    assert browser.find_elements(By.CSS_SELECTOR, "#error img, #error script") == []
    found = server.registry.get_device(DeviceId("sensor-000012"))
    assert found is not None and found.state is DeviceState.PROVISIONED
