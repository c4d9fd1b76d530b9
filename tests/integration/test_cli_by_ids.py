"""``dlq discard`` / ``dlq replay`` with a filter: the entities found are listed, the operator
confirms that list, and only those ids are touched."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, text

from tests.integration.test_cli import dead, seed


def states(engine: Engine) -> dict[int, str]:
    with engine.connect() as conn:
        return {int(i): s for i, s in conn.execute(text("SELECT id, state FROM entities"))}


def test_a_filtered_discard_lists_then_asks_and_a_no_changes_nothing(
    cli: Callable[..., Any], clean_ledger: Engine,
) -> None:
    a, b = seed(clean_ledger, "cli-ab", dead(), dead())
    dry = json.loads(cli("dlq", "discard", "--error-code", "712", "--reason", "r",
                         "--dry-run", "--json").output)
    assert dry["ids"] == [a, b]
    assert [r["outcome"] for r in dry["results"]] == ["would discard"] * 2
    said_no = cli("dlq", "discard", "--error-code", "712", "--reason", "r", stdin=b"n\n")
    assert said_no.exit_code == 0 and "exactly these 2" in said_no.output
    assert states(clean_ledger) == {a: "dead", b: "dead"}
    said_yes = cli("dlq", "discard", "--error-code", "712", "--reason", "r", stdin=b"y\n")
    assert said_yes.exit_code == 0
    assert states(clean_ledger) == {a: "discarded", b: "discarded"}


def test_the_ids_a_dry_run_printed_touch_only_those_after_new_dead_letters_arrive(
    cli: Callable[..., Any], clean_ledger: Engine,
) -> None:
    a, b = seed(clean_ledger, "cli-ids", dead(), dead())
    dry = json.loads(cli("dlq", "discard", "--error-code", "712", "--reason", "r",
                         "--dry-run", "--json").output)
    late, = seed(clean_ledger, "cli-late", dead())
    done = cli("dlq", "discard", *map(str, dry["ids"]), "--reason", "series retired")
    assert done.exit_code == 0
    assert states(clean_ledger) == {a: "discarded", b: "discarded", late: "dead"}
