"""The plans of the statements a piece of work runs: captured as it runs, then explained.

``capture`` records every statement an engine sends (SQLAlchemy's ``before_cursor_execute``,
which the hot path's statements also pass through when they join a transaction); ``explain``
runs each again under ``EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)``, in order and in one
transaction that is rolled back, so a statement that writes finds what the ones before it
wrote, and nothing stays. ``check`` reads a plan: which tables were read and how, and whether
one of the big tables was read whole (a sequential scan), which is the verdict.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, event

INDEXED_SCANS = ("Index Scan", "Index Only Scan", "Bitmap Index Scan")


@dataclass(frozen=True)
class Captured:
    """One statement as sent, with the label of the work that sent it."""

    label: str
    sql: str
    params: Any


@dataclass
class Capture:
    """Statements captured so far; ``label`` names the work now running."""

    label: str = ""
    statements: list[Captured] = field(default_factory=list)


@dataclass(frozen=True)
class PlanCheck:
    """What one statement's plan read, and whether it read a big table whole."""

    label: str
    statement: str
    scans: tuple[str, ...]
    seq_scans: tuple[str, ...]
    buffers: int
    time_ms: float

    @property
    def ok(self) -> bool:
        return not self.seq_scans


@contextmanager
def capture(engine: Engine) -> Iterator[Capture]:
    """Record the data statements ``engine`` sends while the block runs."""
    seen = Capture()

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any,
               executemany: bool) -> None:
        if statement.lstrip().split(None, 1)[0].upper() in ("SELECT", "WITH", "INSERT",
                                                            "UPDATE", "DELETE"):
            first = parameters[0] if executemany and parameters else parameters
            seen.statements.append(Captured(seen.label, statement, first))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def explain(engine: Engine, statements: Sequence[Captured]) -> list[dict[str, Any]]:
    """Each statement's plan as run (``EXPLAIN ANALYZE``), in one rolled-back transaction."""
    plans: list[dict[str, Any]] = []
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        for captured in statements:
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + captured.sql,
                           captured.params)
            row = cursor.fetchone()
            assert row is not None
            document = row[0]
            plans.append(document[0] if isinstance(document, list) else document)
        raw.rollback()
    finally:
        raw.close()
    return plans


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from _nodes(child)


def _scan(node: dict[str, Any]) -> str | None:
    kind = node.get("Node Type", "")
    if kind == "Seq Scan":
        return f"Seq Scan on {node.get('Relation Name')}"
    if kind in INDEXED_SCANS:
        on = f" on {node['Relation Name']}" if "Relation Name" in node else ""
        return f"{kind} using {node.get('Index Name')}{on}"
    return None


def check(label: str, statement: str, plan: dict[str, Any],
          big_tables: Sequence[str]) -> PlanCheck:
    """Read one plan (``EXPLAIN (..., FORMAT JSON)``'s element): its scans, and the
    sequential scans of ``big_tables`` among them."""
    root = plan["Plan"]
    scans: list[str] = []
    seq: list[str] = []
    for node in _nodes(root):
        scan = _scan(node)
        if scan is None:
            continue
        if scan not in scans:
            scans.append(scan)
        if node.get("Node Type") == "Seq Scan" and node.get("Relation Name") in big_tables:
            seq.append(scan)
    buffers = int(root.get("Shared Hit Blocks", 0)) + int(root.get("Shared Read Blocks", 0))
    return PlanCheck(label, " ".join(statement.split()), tuple(scans), tuple(seq), buffers,
                     float(plan.get("Execution Time", 0.0)))


def check_all(statements: Sequence[Captured], plans: Sequence[dict[str, Any]],
              big_tables: Sequence[str]) -> list[PlanCheck]:
    return [check(s.label, s.sql, p, big_tables) for s, p in zip(statements, plans, strict=True)]
