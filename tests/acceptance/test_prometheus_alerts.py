"""A real Prometheus (Debian's package) scrapes a running worker against the sandbox, evaluates
the shipped alert rules, and pages on a rotated key: the circuit alert fires, then resolves
once the key is right again.

Prometheus's own alerts page is photographed in Chromium (Playwright, the system's browser):
into the test's directory, or docs/screenshots/ with ``COUPONS_UPDATE_SCREENSHOTS=1``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from sqlalchemy import Engine

from coupon_devtools.harness.processes import Spawned, free_port, spawn
from coupon_devtools.sandbox import SandboxAdmin
from tests.acceptance.helpers import example_event, publish, wait_for_state
from tests.conftest import REPO_ROOT, SANDBOX_PASSWORD, SANDBOX_USER, WorkerProcess, wait_until
from tests.promql import PROMETHEUS_DIR, dashboard_expressions
from worker.config import Settings

pytestmark = [pytest.mark.slow, pytest.mark.prometheus]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = "prometheus-alert-firing.png"


#: The alert under test pages after a second; the others after a few, so that one slow scrape
#: on a busy machine (the scrape timeout is a second too) cannot page for a worker that is there.
UNDER_TEST = "CouponCircuitOpen"
OTHERS_FOR = "5s"


def rules_for_a_test(target: Path) -> Path:
    """alerts.yml with every ``for:`` cut to seconds: the same expressions, paging at once
    instead of after minutes."""
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text(encoding="utf-8"))
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "1s" if rule["alert"] == UNDER_TEST else OTHERS_FOR
    target.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    return target


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], str]]:
    """Start Prometheus scraping a worker's metrics port every second; yields its URL."""
    binary = shutil.which("prometheus")
    # Fails rather than skips: CI installs it (.ci/run), and a skipped test proves nothing.
    assert binary, "needs Debian's prometheus: apt-get install -y prometheus"
    started: list[Spawned] = []

    def start(metrics_port: int) -> str:
        home = tmp_path / "prometheus"
        home.mkdir()
        rules = rules_for_a_test(home / "alerts.yml")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                       "scrape_timeout": "1s"},
            # Relative, and Prometheus started in its directory: its pages name the rules
            # file as shipped, not a temporary path.
            "rule_files": [rules.name],
            "scrape_configs": [{"job_name": "coupon-worker", "static_configs": [
                {"targets": [f"127.0.0.1:{metrics_port}"]}]}],
        }
        (home / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
        port = free_port()
        process = spawn("prometheus", [
            binary, "--config.file=prometheus.yml", "--storage.tsdb.path=data",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            dict(os.environ), tmp_path, cwd=home)
        started.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _ready(url, process), timeout_s=60, message="Prometheus to be ready")
        return url

    yield start
    for process in started:
        process.stop(grace_s=10)


def _ready(url: str, process: Spawned) -> bool:
    process.check_running()
    try:
        return requests.get(f"{url}/-/ready", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def query(url: str, expr: str) -> list[dict[str, Any]]:
    answer = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def firing(url: str) -> dict[str, dict[str, Any]]:
    """The alerts firing now, by name."""
    alerts = requests.get(f"{url}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    return {a["labels"]["alertname"]: a for a in alerts if a["state"] == "firing"}


def test_a_rotated_key_pages_through_a_real_prometheus_and_resolves_once_fixed(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess], prometheus: Callable[[int], str],
    tmp_path: Path,
) -> None:
    # Given a worker whose metrics a real Prometheus scrapes every second, with the rules
    metrics_port = free_port()
    settings = settings_factory(metrics_port=metrics_port, circuit_open_s=1.0)
    start_worker(settings, concurrency=1)
    url = prometheus(metrics_port)
    wait_until(lambda: query(url, 'up{job="coupon-worker"} == 1'), timeout_s=30,
               message="Prometheus to scrape the worker")
    # (before its first scrape, the fleet looked absent: that page resolves with the scrape)
    wait_until(lambda: firing(url) == {}, timeout_s=30, message="a healthy fleet to page nobody")

    # When Capillary's side rotates the key the worker still sends, and events arrive
    sandbox.set_password(SANDBOX_USER, "rotated-on-capillarys-side")
    publish(settings, example_event("paged-1"), example_event("paged-2", customer="777"))

    # Then the circuit alert fires, with its severity, the customer impact and its runbook
    alert = wait_until(lambda: firing(url).get("CouponCircuitOpen"), timeout_s=60,
                       message="CouponCircuitOpen to fire")
    assert alert["labels"]["severity"] == "critical"
    assert alert["labels"]["circuit"] == "capillary"
    assert alert["annotations"]["summary"].startswith("Customers get no coupons")
    assert alert["annotations"]["runbook_url"] == "docs/runbook.md#couponcircuitopen"
    # and nothing else pages: the stall is the circuit's, said once
    assert set(firing(url)) == {"CouponCircuitOpen"}
    # and Prometheus sees the worker's consumers paused
    wait_until(lambda: query(url, "max(coupon_consumers_paused) == 1"), timeout_s=30,
               message="the paused consumers in Prometheus")
    _photograph_alerts_page(url, tmp_path)
    # and every query of the dashboard runs on this Prometheus, over the worker's real series
    for title, expr in dashboard_expressions():
        assert query(url, expr) is not None, title

    # When the key is right again
    sandbox.set_password(SANDBOX_USER, SANDBOX_PASSWORD)
    # Then the next probe closes the circuit, the events are issued and the alert resolves
    wait_for_state(clean_ledger, "paged-1", "completed", timeout_s=90)
    wait_for_state(clean_ledger, "paged-2", "completed", timeout_s=30)
    wait_until(lambda: "CouponCircuitOpen" not in firing(url), timeout_s=30,
               message="CouponCircuitOpen to resolve")
    closed = query(url, 'coupon_circuit_state{state="closed"}')
    assert [sample["value"][1] for sample in closed] == ["1"]


def _photograph_alerts_page(url: str, tmp_path: Path) -> None:
    """Prometheus's own alerts page with the alert firing, opened on its details and
    annotations (Debian's package serves the classic UI, under /classic)."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "needs the system's chromium: apt-get install -y chromium"
    shots = (REPO_ROOT / "docs" / "screenshots"
             if os.environ.get("COUPONS_UPDATE_SCREENSHOTS") == "1" else tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{url}/classic/alerts")
            page.get_by_text("Show annotations").click()
            page.get_by_text("CouponCircuitOpen").first.click()
            page.get_by_text("FIRING").first.wait_for(timeout=10_000)
            page.get_by_text("docs/runbook.md#couponcircuitopen").first.wait_for(timeout=10_000)
            page.screenshot(path=str(shots / SCREENSHOT), full_page=True)
        finally:
            browser.close()
