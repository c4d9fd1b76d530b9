"""The alert routing shipped in deploy/alertmanager: valid for Alertmanager (amtool), every
rule's severity routed to its receiver, and delivered by a real Alertmanager (Debian's
package): a critical alert pages, a warning opens a ticket, an open circuit holds back the
stall alert, and an alert that resolves says so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from coupon_devtools.harness.processes import free_port, spawn
from tests.conftest import wait_until
from tests.promql import PROMETHEUS_DIR, REPO_ROOT

CONFIG = REPO_ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
RECEIVER_OF = {"critical": "oncall-page", "warning": "oncall-ticket"}


def _tool(name: str) -> str:
    found = shutil.which(name)
    # Fails rather than skips: CI installs it (.ci/run), and a skipped test proves nothing.
    assert found, f"needs Debian's prometheus-alertmanager: apt-get install -y {name}"
    return found


def _amtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool("amtool"), *args], capture_output=True, text=True,
                          timeout=60, check=False)


def _rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text(encoding="utf-8"))
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def test_amtool_accepts_the_configuration() -> None:
    checked = _amtool("check-config", str(CONFIG))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "2 receivers" in checked.stdout


def test_every_rule_reaches_the_receiver_its_severity_says() -> None:
    for rule in _rules():
        severity = rule["labels"]["severity"]
        routed = _amtool("config", "routes", "test", f"--config.file={CONFIG}",
                         f"alertname={rule['alert']}", f"severity={severity}")
        assert routed.returncode == 0, routed.stderr
        assert routed.stdout.strip() == RECEIVER_OF[severity], rule["alert"]


class _Deliveries:
    """An on-call gateway: every notification Alertmanager posts, by path."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def alerts(self, path: str, status: str) -> set[str]:
        with self.lock:
            return {alert["labels"]["alertname"] for where, body in self.received
                    if where == path for alert in body["alerts"] if alert["status"] == status}

    def every_alert(self) -> set[str]:
        with self.lock:
            return {alert["labels"]["alertname"] for _where, body in self.received
                    for alert in body["alerts"]}


@pytest.fixture
def gateway() -> Iterator[tuple[str, _Deliveries]]:
    deliveries = _Deliveries()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with deliveries.lock:
                deliveries.received.append((self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", deliveries
    server.shutdown()
    server.server_close()


def _for_a_test(gateway_url: str, target: Path) -> Path:
    """The shipped routing with the gateway's address, and its waits cut to a second."""
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    for receiver in config["receivers"]:
        for hook in receiver["webhook_configs"]:
            hook["url"] = gateway_url + hook["url"].split(":8080", 1)[1]
    for route in (config["route"], *config["route"]["routes"]):
        route.update(group_wait="1s", group_interval="1s")
    target.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return target


def _post(url: str, *alerts: dict[str, Any]) -> None:
    answer = requests.post(f"{url}/api/v2/alerts", json=list(alerts), timeout=5)
    assert answer.status_code == 200, answer.text


def _alert(name: str, severity: str, *, ends: datetime, **labels: str) -> dict[str, Any]:
    return {"labels": {"alertname": name, "severity": severity, **labels},
            "annotations": {"summary": name},
            "startsAt": (datetime.now(UTC) - timedelta(seconds=5)).isoformat(),
            "endsAt": ends.isoformat()}


@pytest.mark.prometheus
def test_a_real_alertmanager_pages_opens_tickets_inhibits_and_resolves(
        gateway: tuple[str, _Deliveries], tmp_path: Path) -> None:
    gateway_url, deliveries = gateway
    config = _for_a_test(gateway_url, tmp_path / "alertmanager.yml")
    port = free_port()
    process = spawn("alertmanager", [
        _tool("prometheus-alertmanager"), f"--config.file={config}",
        f"--storage.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=", "--log.level=warn"], dict(os.environ), tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            process.check_running()
            try:
                return requests.get(f"{url}/-/ready", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_until(ready, timeout_s=30, message="Alertmanager to be ready")
        # Given the circuit open (critical) and dead letters growing (a warning), as
        # Prometheus sends them
        later = datetime.now(UTC) + timedelta(minutes=5)
        _post(url, _alert("CouponCircuitOpen", "critical", ends=later, circuit="capillary"),
              _alert("CouponDeadLettersGrowing", "warning", ends=later))
        # Then the circuit pages and the dead letters open a ticket
        wait_until(lambda: deliveries.alerts("/alertmanager/page", "firing")
                   == {"CouponCircuitOpen"}, timeout_s=60, message="the circuit to page")
        wait_until(lambda: deliveries.alerts("/alertmanager/ticket", "firing")
                   == {"CouponDeadLettersGrowing"}, timeout_s=60,
                   message="the dead letters to open a ticket")
        # When the stall the open circuit causes fires after it (as it does: the stall
        # alert waits minutes), it is held back
        _post(url, _alert("CouponIssuanceStalled", "critical", ends=later))
        time.sleep(3)
        assert "CouponIssuanceStalled" not in deliveries.every_alert()

        # When the circuit closes
        _post(url, _alert("CouponCircuitOpen", "critical", ends=datetime.now(UTC),
                          circuit="capillary"))
        # Then on-call is told it resolved
        wait_until(lambda: "CouponCircuitOpen" in deliveries.alerts("/alertmanager/page",
                                                                    "resolved"),
                   timeout_s=60, message="the circuit's page to resolve")
    finally:
        process.stop(grace_s=10)
