"""The dashboard page in a real headless Chromium (Debian's, driven by Selenium) while a real swarm trains.

`omi-coordinator serve` and two `omi-node join` volunteers run as subprocesses on 127.0.0.1; one volunteer
calls itself an HTML payload. The page must follow the run without a reload, render that name as text,
list the checkpoint the coordinator publishes, and recover after the coordinator is killed and restarted.
Screenshot: test-artifacts/dashboard.png.
"""

import hashlib
import json
import time
import urllib.request
from pathlib import Path

import pytest
from processes import ROOT, NodeProcess, ServeProcess, fast_run, kill_group

pytestmark = [pytest.mark.slow]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,2200"]
XSS_NAME = "<img src=x onerror=\"window.__xss=1\">"
ARTIFACTS = ROOT / "test-artifacts"
# the test run: the fast digits run with a checkpoint every round, so one is published while the swarm trains
RUN = fast_run(checkpoints=dict(every_rounds=1))


@pytest.fixture
def browser(tmp_path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("headless Chromium is missing: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(browser, script: str, timeout: float, what: str, interval: float = 0.5):
    """Poll a JavaScript expression in the page until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = browser.execute_script(f"return {script}")
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} ({script})")


def api(server: ServeProcess, path: str):
    with urllib.request.urlopen(server.http + path, timeout=10) as response:
        return json.loads(response.read())


def figure(browser, element_id: str) -> int:
    return int(browser.find_element("id", element_id).text.replace(",", "") or 0)


@pytest.mark.timeout(300)
def test_page_follows_a_live_swarm_and_survives_a_restart(tmp_path, browser):
    run_file = tmp_path / "run.toml"
    run_file.write_text(RUN)
    server = ServeProcess(tmp_path / "coordinator", tmp_path / "coordinator.log", run_file=run_file)
    # enough rounds that the swarm is still training when a slow browser has taken its first figures
    [NodeProcess(server.address, tmp_path / "alice", "--max-rounds", 4, name="alice"),
     NodeProcess(server.address, tmp_path / "mallory", "--max-rounds", 4, name=XSS_NAME)]

    browser.get(f"{server.http}/runs/digits")
    browser.execute_script("window.__loaded = 'once'")  # gone if the page ever reloads
    assert browser.find_element("id", "run-name").text  # the page rendered the headline
    wait_for(browser, "document.querySelectorAll('#contributors tbody tr').length === 2", 90, "both volunteers")
    round0, samples0 = figure(browser, "round"), figure(browser, "total-samples")

    # the round and the sample count rise without a reload; the loss chart gets points
    wait_for(browser, f"+document.getElementById('total-samples').textContent.replace(/,/g, '') > {samples0}",
             150, "the sample count to rise")
    wait_for(browser, f"+document.getElementById('round').textContent > {round0}", 120, "the round to rise")
    wait_for(browser, "omiDashboard.charts.loss && omiDashboard.charts.loss.data[1].some(v => v != null)",
             60, "a point on the loss chart")
    assert browser.execute_script("return window.__loaded") == "once"
    # no validator runs here: the page says that nothing is verified, rather than suggesting recomputation
    note = browser.find_element("id", "verified-note").text
    assert "No audit has run" in note and "provisional" in note, note
    assert figure(browser, "verified-samples") == 0

    # the volunteer named like an HTML payload is shown as that text and ran no script
    names = [e.text for e in browser.find_elements("css selector", "#contributors tbody td.volunteer .name")]
    assert sorted(names) == sorted(["alice", XSS_NAME])
    assert browser.execute_script("return window.__xss") is None
    assert browser.find_elements("css selector", "#contributors img") == []

    # the checkpoint the coordinator published: listed with its sha256, its link downloads that manifest
    wait_for(browser, "document.querySelectorAll('#checkpoints tbody tr').length > 0", 120, "a checkpoint row")
    listed = api(server, "/api/runs/digits/checkpoints")
    latest = listed[-1]
    # the API may already list a checkpoint newer than the page's last poll: wait for the page to catch up
    wait_for(browser, f"document.querySelector(\"#checkpoints tbody tr[data-round='{latest['round']}']\")", 30,
             f"the row of checkpoint {latest['round']}")
    row = browser.find_element("css selector", f"#checkpoints tbody tr[data-round='{latest['round']}']")
    assert latest["manifest_sha256"] in row.text
    link = row.find_element("link text", "manifest.json").get_attribute("href")
    assert link == f"{server.http}{latest['manifest_url']}"
    with urllib.request.urlopen(link, timeout=10) as response:
        assert hashlib.sha256(response.read()).hexdigest() == latest["manifest_sha256"]
    if latest["preview_url"]:
        wait_for(browser, "[...document.querySelectorAll('#previews img')].some(i => i.naturalWidth > 0)",
                 20, "the preview grid image")

    # the contributors table sorts by a clicked column
    header = browser.find_element("css selector", "#contributors th[data-key='display_name']")
    header.click()
    assert header.get_attribute("aria-sort") == "ascending"
    assert [e.text for e in browser.find_elements("css selector", "#contributors td.volunteer .name")] == sorted(
        names, key=str.lower)

    ARTIFACTS.mkdir(exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)
    assert browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))

    # the coordinator dies (volunteers keep retrying): the page says so, keeps trying, and is live once it is back
    kill_group(server.proc)
    wait_for(browser, "document.getElementById('connection').classList.contains('offline')", 30, "the offline notice")
    assert "unreachable" in browser.find_element("id", "connection").text
    server = ServeProcess(server.state_dir, tmp_path / "coordinator-2.log", run_file=run_file,
                          grpc_port=server.grpc_port, http_port=server.http_port, witness=False)
    wait_for(browser, "!document.getElementById('connection').classList.contains('offline')", 90, "the page to recover")
    total = api(server, "/api/runs/digits/status")["total_samples"]
    wait_for(browser, f"+document.getElementById('total-samples').textContent.replace(/,/g, '') === {total}", 20,
             "the figures after the restart")
    assert browser.execute_script("return window.__loaded") == "once"
    kill_group(server.proc)
