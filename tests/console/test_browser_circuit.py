"""The circuit page in a real headless Chromium: an operator opens the circuit with a reason and
closes it again, under the strict content-security policy. With COUPONS_UPDATE_SCREENSHOTS=1
its screenshot goes to docs/screenshots/circuit.png."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import Engine

from tests.acceptance.helpers import circuit
from tests.console.test_browser import (  # noqa: F401  (fixtures)
    browser,
    console_url,
    log_in,
    shot,
    shots_dir,
)

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def test_an_operator_opens_and_closes_the_circuit_in_the_browser(
        clean_ledger: Engine, console_url: str, browser: object,  # noqa: F811
        shot: Callable[[object, str], None]) -> None:  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 700})  # type: ignore[attr-defined]
    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text)
            if "Content Security Policy" in m.text else None)
    log_in(page, console_url, "otto")
    page.click("nav >> text=Circuit")
    assert "closed" in page.inner_text("#circuit-state")
    # When the operator opens it for 30 minutes, saying why
    page.fill("form[action='/circuit/open'] input[name=minutes]", "30")
    page.fill("form[action='/circuit/open'] input[name=reason]",
              "Capillary asked us to stop (INC-42)")
    page.click("form[action='/circuit/open'] button")
    page.wait_for_selector("form[action='/circuit/close']")
    # Then every call waits, and the page says why and lists the opening
    assert circuit(clean_ledger)[0] == "open"
    assert "INC-42" in page.inner_text("#circuit-state")
    assert "circuit_open" in page.inner_text("table.audit")
    shot(page, "circuit")
    # When it closes it again
    page.fill("form[action='/circuit/close'] input[name=reason]", "maintenance over")
    page.click("form[action='/circuit/close'] button")
    page.wait_for_selector("form[action='/circuit/close']", state="detached")
    assert circuit(clean_ledger)[0] == "closed"
    assert violations == []  # styled by the style sheet alone, under the strict policy
