"""``coupon-worker waiting``: list what waits, make it due now, give up on it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, text

from tests.console.conftest import seed_waiting


def test_waiting_list_retry_now_and_give_up(
    cli: Callable[..., Any], clean_ledger: Engine,
) -> None:
    assert "nothing is waiting" in cli("waiting", "list").output
    first, second = seed_waiting(clean_ledger, "cli-wait", "61", [1, 2], unknown=True)
    listed = json.loads(cli("waiting", "list", "--json").stdout)
    assert listed["counts"] == {"retry": 0, "unknown_outcome": 2}
    assert [r["id"] for r in listed["entities"]] == [first, second]
    shown = cli("waiting", "list")
    assert shown.exit_code == 0 and "unknown outcome" in shown.output
    due = json.loads(cli("waiting", "retry-now", str(first), "--json").stdout)
    assert [r["outcome"] for r in due["results"]] == ["due now"]
    assert cli("waiting", "give-up", str(second)).exit_code != 0  # a reason is required
    gone = json.loads(cli("waiting", "give-up", str(second), "--reason", "SUP-4",
                          "--json").stdout)
    assert [r["outcome"] for r in gone["results"]] == ["dead (given up)"]
    with clean_ledger.connect() as conn:
        assert dict(conn.execute(text("SELECT id, state FROM entities")).all()) == {
            first: "retry_wait", second: "dead"}
