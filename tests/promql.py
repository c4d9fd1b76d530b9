"""What the alert rules and the dashboard may query: the series a worker really exports, and
the metric names a PromQL expression reads (checked with Prometheus's own parser elsewhere)."""

from __future__ import annotations

import json
import re
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from worker.adapters.postgres.ratelimit import BucketSpec
from worker.adapters.postgres.vitals import BucketVitals, CircuitVitals, LedgerVitals
from worker.metrics import Metrics, exposition_registry
from worker.scrape import Configured, consumers_collector, ledger_collector, queues_collector

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "coupon-worker.json"
#: Series Prometheus makes itself, for every target.
PROMETHEUS_OWN = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})


def promtool() -> str:
    """Debian's promtool (the prometheus package), or skip saying how to get it."""
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed: apt-get install prometheus (.ci/run does)")
    return found


def dashboard_panels() -> list[dict[str, Any]]:
    """The dashboard's panels (rows left out)."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, expression) for every query of the dashboard."""
    return [(panel["title"], target["expr"]) for panel in dashboard_panels()
            for target in panel["targets"]]


@cache
def exported_names() -> frozenset[str]:
    """Every series name a worker's /metrics serves, from the real registry and the real
    scrape-time collectors (fed a reading in which each of them has something to say)."""
    from prometheus_client import generate_latest

    metrics = Metrics()
    # Each labelled series appears once it has a value: give each one.
    metrics.coupons_issued.labels("issue").inc()
    metrics.entities_failed.labels("permanent").inc()
    metrics.retries_scheduled.inc()
    metrics.dead_letters.labels("707").inc()
    metrics.duplicates_issued.inc()
    metrics.replays.labels("replay").inc()
    metrics.events_received.labels("new").inc()
    metrics.bridge_forward_failures.inc()
    metrics.ledger_pruned.labels("events").inc()
    metrics.answer_remarks.labels("warnings").inc()
    metrics.observe_call("bulk_issue", 200, 12.0)
    metrics.read_back("reconcile", "ours")
    metrics.task_finished("w@host")
    vitals = LedgerVitals(1.0, 1.0, 1.0, (CircuitVitals("capillary", "open", 3.0),),
                          (BucketVitals("bulk_issue", 1.0, 1.0, 0.0),))
    configured = Configured(settle_window_s=120.0, rate_limit=BucketSpec(600, 10),
                            rate_limit_per_minute=600)
    registry = exposition_registry(
        metrics.registry, lambda: {"issued": 1}, {"version": "v", "schema": "s",
                                                  "ledger_schema": "s"},
        [ledger_collector(lambda: vitals, configured),
         consumers_collector(lambda: {"q.tasks": False}),
         queues_collector(lambda: {"tasks": ("q.tasks", 3)})])
    text = generate_latest(registry).decode()
    return frozenset(line.split("{")[0].split(" ")[0] for line in text.splitlines()
                     if line and not line.startswith("#"))


_KEYWORDS = frozenset({
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan",
    # aggregations, which may take their grouping before their parenthesis
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile",
})
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (function names, keywords, label matchers,
    grouping labels, ranges and numbers left out). Prometheus's parser checks the syntax; this
    only finds what must exist."""
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = _GROUPING.sub(r"\1", text)
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = re.sub(r"\b\d+(?:ms|[smhdwy])\b", "", text)  # offsets
    names = set()
    for match in _IDENT.finditer(text):
        word, rest = match.group(0), text[match.end():].lstrip()
        if rest.startswith("(") or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names
