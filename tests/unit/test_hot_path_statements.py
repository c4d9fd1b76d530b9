"""The hot path's statements as they go over the wire."""

from __future__ import annotations

import pytest
from psycopg import _queries

from worker.adapters.postgres import hot_path


@pytest.mark.parametrize("statement", [hot_path.TAKE_IN, hot_path.RECORD],
                         ids=["claim", "outcome"])
def test_each_statement_is_short_enough_for_psycopg_to_convert_it_once(statement: str) -> None:
    # Longer statements have their placeholders parsed again on every execution.
    assert len(statement.encode()) <= _queries.MAX_CACHED_STATEMENT_LENGTH
    assert "--" not in statement and "  " not in statement and "\n" not in statement


@pytest.mark.parametrize("statement", [hot_path.TAKE_IN, hot_path.RECORD],
                         ids=["claim", "outcome"])
def test_behind_a_pooler_each_statement_with_its_settings_is_still_converted_once(
        statement: str) -> None:
    from worker.adapters.postgres.driver import after_settings
    from worker.adapters.postgres.unit_of_work import ConnectionLimits

    # The longest settings the configuration allows (timeouts of days, in milliseconds)
    limits = ConnectionLimits(statement_timeout_s=999_999.999, lock_timeout_s=999_999.999,
                              pooler="transaction")
    sent = after_settings(limits.transaction_settings_sql(), statement)
    assert len(sent.encode()) <= _queries.MAX_CACHED_STATEMENT_LENGTH
