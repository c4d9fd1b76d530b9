"""Loaded only by ``make mutation`` (see ``[tool.mutmut]`` in pyproject.toml).

The ledger's retry-path claim statements are built once, at import, before mutmut switches a
mutant on; tests on PostgreSQL rebuild them here so a mutant of their builders takes effect
(and so mutmut sees which tests exercise those builders). The hot path's two statements are
plain SQL text (``worker.adapters.postgres.hot_path``): mutmut mutates inside functions only, so
their text is left alone and their parameter builders are mutated as they run.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from worker.adapters.postgres import issuing


def _on_postgres(request: pytest.FixtureRequest) -> bool:
    """Whether the test runs the SQL ledger (directly, or as the contract's ``postgres`` case)."""
    if "clean_ledger" in request.fixturenames:
        return True
    callspec = getattr(request.node, "callspec", None)
    return callspec is not None and callspec.params.get("uow") == "postgres"


@pytest.fixture(autouse=True)
def _rebuilt_ledger_statements(request: pytest.FixtureRequest) -> Iterator[None]:
    if not _on_postgres(request):
        yield
        return
    built = (issuing._CLAIM_EVENT, issuing._CLAIM_ENTITY)
    issuing._CLAIM_EVENT, issuing._CLAIM_ENTITY = issuing._claim_statements()
    yield
    issuing._CLAIM_EVENT, issuing._CLAIM_ENTITY = built
