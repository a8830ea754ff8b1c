"""A person's view of Flower: headless Chromium logs in with basic auth, sees our worker online and a finished
``agent_workers.predict``, and leaves a screenshot in docs/screenshots/flower.png.

Runs on the Redis broker only (the API tests cover both); needs chromium and chromedriver (Debian packages).
"""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_workers.models import make_spec
from tests.conftest import IN_CI, Pool, need, unique
from tests.e2e.conftest import ROOT, Flower, worker_node

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOT = ROOT / "docs" / "screenshots" / "flower.png"
WORKERS_SCREENSHOT = ROOT / "docs" / "screenshots" / "flower-workers.png"
PAGE_TIMEOUT = 60


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium driven by chromedriver, with a fresh profile."""
    need(
        Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(),
        "chromium and chromedriver (apt-get install chromium chromium-driver)",
    )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        if IN_CI:
            raise
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,900",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(
        service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")), options=options
    )
    try:
        yield driver
    finally:
        driver.quit()  # chromedriver stops the browser it started


def log_in(driver: Any, flower: Flower) -> None:
    """Send Flower's basic-auth credentials with every request (DevTools), as a browser does after the prompt."""
    token = base64.b64encode(":".join(flower.auth).encode()).decode()
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})


def rows(driver: Any, table_id: str) -> list[str]:
    """The text of each body row of a table, cells joined by " | " (textContent: no layout line breaks)."""
    script = (
        "return Array.from(document.querySelectorAll(arguments[0]))"
        ".map(r => Array.from(r.cells).map(c => c.textContent.trim()).join(' | '));"
    )
    return list(driver.execute_script(script, f"#{table_id} tbody tr"))


def wait_page(driver: Any, condition: Any, what: str, table_id: str) -> None:
    """Poll ``condition`` on the page until it holds; on timeout fail with what the table showed."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, PAGE_TIMEOUT, poll_frequency=0.5).until(condition)
    except TimeoutException:
        raise AssertionError(
            f"timed out waiting for {what}; {driver.current_url} shows {rows(driver, table_id)!r}"
            f"\n{driver.find_element('tag name', 'body').text[:2000]}"
        ) from None


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_flower_shows_the_worker_online_and_a_finished_predict(pool: Pool, flower: Flower, browser: Any) -> None:
    model = unique("house")
    pool.store.create(model, make_spec("linear", in_features=3), seed=1)
    task_id = pool.client.send_predict(model, [0.5, -1.0, 2.0]).id
    pool.client.wait(task_id, 30)
    node = worker_node(pool)

    log_in(browser, flower)
    browser.get(flower.url + "/")

    def worker_row_online(driver: Any) -> bool:
        # The rows' text as rendered now: the table refreshes itself, so element handles go stale.
        return any(node in row and "online" in row.lower() for row in rows(driver, "workers-table"))

    wait_page(browser, worker_row_online, f"worker {node} shown online", "workers-table")

    search = browser.find_element("css selector", "#workers-table_filter input")
    search.send_keys(node)  # other workers may share the broker: show ours
    WORKERS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(WORKERS_SCREENSHOT))

    # Flower pages its task table (15 rows) and the shared worker has served other tests' requests: search for ours.
    browser.get(f"{flower.url}/tasks")
    wait_page(
        browser,
        lambda d: d.find_elements("css selector", "#tasks-table_filter input"),
        "the task search box",
        "tasks-table",
    )
    browser.find_element("css selector", "#tasks-table_filter input").send_keys(task_id)

    def predict_row_succeeded(driver: Any) -> bool:
        return any(
            task_id in row and "agent_workers.predict" in row and "SUCCESS" in row
            for row in rows(driver, "tasks-table")
        )

    wait_page(
        browser, predict_row_succeeded, f"task {task_id} listed as a finished agent_workers.predict", "tasks-table"
    )
    assert browser.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000
