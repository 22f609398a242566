"""The ops dashboard in headless Chromium (Debian chromium + chromium-driver,
driven by selenium): on a running 3-node ring it shows the node's peers
and selected routes and its charts keep updating without a reload. A
screenshot is saved in the test's tmp directory."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .nodes import wait_for
from .test_api_nodes import ApiNode, running_mesh

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1300",
]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[list[ApiNode]]:
    with running_mesh(tmp_path_factory.mktemp("dash"), 3, request) as nodes:
        yield nodes


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(10)
    try:
        yield driver
    finally:
        driver.quit()


def table_rows(driver: Any, table_id: str) -> list[list[str]]:
    return list(
        driver.execute_script(
            "return Array.from(document.querySelectorAll('#' + arguments[0] + ' tbody tr:not(.empty)'))"
            ".map(tr => Array.from(tr.cells).map(td => td.textContent));",
            table_id,
        )
    )


def chart(driver: Any, chart_id: str) -> dict[str, Any]:
    return dict(
        driver.execute_script(
            "const f = document.getElementById(arguments[0]);"
            "return {points: +f.dataset.points, lastT: f.dataset.lastT,"
            " lines: Array.from(f.querySelectorAll('polyline')).map(p => p.getAttribute('points'))};",
            chart_id,
        )
    )


def test_dashboard_shows_the_mesh_and_updates_live(mesh: list[ApiNode], browser: Any, tmp_path: Path) -> None:
    a, b, c = mesh
    browser.get(f"http://127.0.0.1:{a.api_port}/dashboard")
    updates = lambda: int(browser.execute_script("return +document.body.dataset.updates"))  # noqa: E731
    wait_for("the first render", lambda: updates() >= 1, 20)

    # peers with their state and link cost
    def peers_shown() -> list[list[str]] | None:
        rows = table_rows(browser, "peers")
        return rows if len(rows) == 2 and all(r[2] == "alive" and r[3].isdigit() for r in rows) else None

    rows = wait_for("both peers alive with a link cost", peers_shown, 20)
    assert any(r[0] == f"tcp://127.0.0.1:{b.tcp_port}" and r[1] == "static" for r in rows)
    assert {r[1] for r in rows} == {"static", "inbound"}

    # the selected routes, with the API's next hops
    routes = {r[0]: r for r in table_rows(browser, "routes")}
    assert set(routes) == {b.subnet, c.subnet}
    api_routes = a.selected()
    for subnet, row in routes.items():
        assert row[1] == api_routes[subnet]["nextHop"]

    # services with health, uptime and restarts
    services = {r[0]: r for r in table_rows(browser, "services")}
    assert {"router", "tund", "apid", "peerd-tcp"} <= set(services)
    assert all(services[s][1] == "up" for s in ("router", "apid", "peerd-tcp"))

    # the charts move on without a reload: new samples arrive every second
    first = chart(browser, "chart-control")
    n0 = updates()
    for _ in range(3):  # some traffic for the charts
        a.lookup(b.address)
    wait_for("three more renders", lambda: updates() >= n0 + 3, 15)
    second = wait_for(
        "a newer chart sample",
        lambda: x if (x := chart(browser, "chart-control"))["lastT"] != first["lastT"] else None,
        15,
    )
    assert second["points"] >= 2 and second["lines"][0] != first["lines"][0]
    for chart_id in ("chart-bytes", "chart-data", "chart-drops"):
        assert chart(browser, chart_id)["points"] >= 2
    assert browser.execute_script("return document.getElementById('status').className") == "status ok"

    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    print(f"\ndashboard screenshot: {shot}")
    # no request of the page left the node: every resource came from the API address
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(f"http://127.0.0.1:{a.api_port}/") for u in urls)


def test_dashboard_survives_an_apid_restart(mesh: list[ApiNode], browser: Any) -> None:
    import os
    import signal

    a = mesh[0]
    browser.get(f"http://127.0.0.1:{a.api_port}/dashboard")
    wait_for("a render", lambda: browser.execute_script("return +document.body.dataset.updates") >= 1, 20)
    os.kill(a.program_pid("apid"), signal.SIGKILL)
    wait_for(
        "the page to notice",
        lambda: "unreachable" in browser.execute_script("return document.getElementById('status').textContent"),
        10,
    )
    t0 = time.monotonic()
    wait_for(
        "the page to recover on its own",
        lambda: browser.execute_script("return document.getElementById('status').className") == "status ok",
        30,
    )
    rows = table_rows(browser, "services")
    apid = next(r for r in rows if r[0] == "apid")
    assert apid[4] == "1"  # one restart counted
    print(f"\ndashboard live again {time.monotonic() - t0:.1f} s after apid came back")
