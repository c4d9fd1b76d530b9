"""The Grafana dashboard in deploy/grafana: every panel queries series a worker exports, with
expressions Prometheus's own parser accepts (promtool), through the provisioned datasource.

Grafana itself does not run here; the end-to-end test also runs every expression against a
real Prometheus scraping a worker (tests/acceptance/test_prometheus_alerts.py).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.promql import (
    DASHBOARD,
    PROMETHEUS_OWN,
    REPO_ROOT,
    dashboard_expressions,
    dashboard_panels,
    exported_names,
    metric_names,
    promtool,
)

GRAFANA = REPO_ROOT / "deploy" / "grafana"
panels = dashboard_panels
expressions = dashboard_expressions


def test_every_panel_queries_the_provisioned_prometheus() -> None:
    (source,) = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert len(panels()) >= 20
    ids = [p["id"] for p in json.loads(DASHBOARD.read_text())["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["targets"], f"{panel['title']} queries nothing"
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": source["uid"]}
    provider = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "coupon-worker.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


@pytest.mark.parametrize(("title", "expr"), expressions(), ids=[t for t, _ in expressions()])
def test_every_expression_reads_series_the_worker_exports(title: str, expr: str) -> None:
    used = metric_names(expr)
    assert used, f"{title}: {expr} reads no series"
    unknown = used - exported_names() - PROMETHEUS_OWN
    assert not unknown, f"{title} queries {sorted(unknown)}, which no worker exports"


def test_prometheus_parses_every_expression(tmp_path: Path) -> None:
    # Given the panels' expressions as recording rules: promtool parses each with
    # Prometheus's own parser, and names the one it refuses
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel_{i}", "expr": expr}
        for i, (_title, expr) in enumerate(expressions())]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(expressions())} rules found" in result.stdout


def test_the_parse_check_refuses_a_broken_expression(tmp_path: Path) -> None:
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [
        {"record": "x:y", "expr": "sum by (a (rate(x[5m]))"}]}]}), encoding="utf-8")
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode != 0
