"""The alert rules shipped in deploy/prometheus: valid for Prometheus, unit-tested with promtool,
each with a severity, a summary of the customer impact and a runbook section, and reading only
series a worker exports."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
import yaml

from tests.promql import (
    PROMETHEUS_DIR,
    PROMETHEUS_OWN,
    REPO_ROOT,
    exported_names,
    metric_names,
    promtool,
)

ALERTS = PROMETHEUS_DIR / "alerts.yml"
RUNBOOK = REPO_ROOT / "docs" / "runbook.md"
#: What the issue asks on-call to be told about, each by its alert.
REQUIRED_ALERTS = {
    "CouponCircuitOpen", "CouponIssuanceStalled", "CouponDeadLettersGrowing",
    "CouponUnknownOutcomesUnsettled", "CouponCapillaryQuotaNearLimit",
    "CouponCapillaryRateLimited", "CouponNoWorkerAlive", "CouponLedgerUnreachable",
}


def rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120,
                          check=False, cwd=PROMETHEUS_DIR)


def test_promtool_accepts_the_rules_and_the_configuration() -> None:
    checked = _promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout
    config = _promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def test_the_rules_unit_tests_pass() -> None:
    # `promtool test rules`: each case feeds series and says which alerts fire, when, and
    # with which labels and annotations (the rendered summary included)
    result = _promtool("test", "rules", "tests.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_quiet() -> None:
    cases = yaml.safe_load((PROMETHEUS_DIR / "tests.yml").read_text(encoding="utf-8"))["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in cases:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in rules()}
    assert names == REQUIRED_ALERTS
    assert firing == names, f"never seen firing: {names - firing}"
    assert quiet == names, f"never seen quiet: {names - quiet}"


@pytest.mark.parametrize("rule", rules(), ids=lambda rule: str(rule["alert"]))
def test_each_alert_says_how_bad_what_it_costs_customers_and_where_to_read(
        rule: dict[str, Any]) -> None:
    assert rule["labels"]["severity"] in {"critical", "warning"}
    annotations = rule["annotations"]
    assert re.match(r"(Customers|Some customers|Coupons)\b", annotations["summary"]), (
        "the summary starts with what customers see")
    assert annotations["description"]
    # The runbook link names a section of docs/runbook.md that exists
    path, _, anchor = annotations["runbook_url"].partition("#")
    assert path == "docs/runbook.md"
    headings = {_anchor(line.lstrip("#").strip())
                for line in RUNBOOK.read_text(encoding="utf-8").splitlines()
                if line.startswith("## ")}
    assert anchor == _anchor(rule["alert"]) and anchor in headings, (anchor, headings)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, spaces to dashes, punctuation dropped."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.lower()).replace(" ", "-")


@pytest.mark.parametrize("rule", rules(), ids=lambda rule: str(rule["alert"]))
def test_each_alert_reads_series_the_worker_exports(rule: dict[str, Any]) -> None:
    used = metric_names(rule["expr"])
    assert used
    unknown = used - exported_names() - PROMETHEUS_OWN
    assert not unknown, f"{rule['alert']} reads {sorted(unknown)}, which no worker exports"


def test_the_name_finder_sees_through_promql() -> None:
    # The check above is only as good as this: functions, keywords, labels, ranges left out
    expr = ('sum by (operation) (rate(capillary_call_seconds_count{status="429"}[5m])) * 60 '
            '/ on () group_left () max(capillary_rate_limit_calls_per_minute) > 0.9 '
            'and on () absent(up{job="coupon-worker"} == 1) unless x offset 5m')
    assert metric_names(expr) == {"capillary_call_seconds_count",
                                  "capillary_rate_limit_calls_per_minute", "up", "x"}
