"""Timestamps read as people read them: relative, with the exact moment on hover, in one
time zone, never with microseconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from worker.domain.errors import ConfigurationError
from worker.entrypoints.console.config import load_console_settings
from worker.entrypoints.console.timestamps import moment, relative

NOW = datetime(2026, 12, 7, 10, 0, 0, tzinfo=UTC)
SECRET = "console-test-secret-0123456789abcdefghij"


def test_a_recent_moment_is_relative_with_the_exact_utc_moment_on_hover() -> None:
    at = NOW - timedelta(minutes=3, seconds=12, microseconds=345_678)
    html = str(moment(at.isoformat(), now=NOW, zone=ZoneInfo("UTC")))
    assert html == ('<time datetime="2026-12-07T09:56:47Z" title="2026-12-07 09:56:47 UTC">'
                    "3 min ago</time>")
    assert "345" not in html  # no microseconds anywhere


def test_the_future_an_old_moment_and_the_time_zone() -> None:
    assert relative(NOW + timedelta(minutes=2, seconds=5), NOW) == "in 2 min"
    assert relative(NOW - timedelta(seconds=2), NOW) == "just now"
    berlin = ZoneInfo("Europe/Berlin")
    old = str(moment(NOW - timedelta(days=3), now=NOW, zone=berlin))
    # Past a day: the date in the console's zone; the hover gives it and UTC
    assert ">2026-12-04 11:00 CET</time>" in old
    assert 'title="2026-12-04 11:00:00 CET (2026-12-04 10:00:00 UTC)"' in old
    assert 'datetime="2026-12-04T10:00:00Z"' in old


def test_nothing_and_text_are_shown_escaped() -> None:
    assert str(moment(None, now=NOW, zone=ZoneInfo("UTC"), empty="now")) == "now"
    assert str(moment("<b>soon</b>", now=NOW, zone=ZoneInfo("UTC"))) == "&lt;b&gt;soon&lt;/b&gt;"


def test_one_timezone_setting_checked_at_start() -> None:
    assert load_console_settings(secret=SECRET).timezone == "UTC"
    assert load_console_settings(secret=SECRET, timezone="Europe/Berlin").zone() == \
        ZoneInfo("Europe/Berlin")
    with pytest.raises(ConfigurationError, match="unknown time zone"):
        load_console_settings(secret=SECRET, timezone="Mars/Olympus")
