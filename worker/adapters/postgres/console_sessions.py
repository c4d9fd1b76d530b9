"""The console's sessions in PostgreSQL: one row per logged-in session, keyed by the SHA-256 of
the random id the cookie holds (a copy of the table logs no one in). Each statement runs in a
short transaction of its own; the policy (timeouts, the users file's fingerprint) is the
console's (``worker.entrypoints.console.sessions``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, insert, or_, select, update

from worker.adapters.postgres import models as m


@dataclass(frozen=True)
class StoredSession:
    """A live session as stored: who, since when, from where."""

    id_hash: str
    user_name: str
    role: str
    fingerprint: str
    created_at: datetime
    last_seen_at: datetime
    client: str
    user_agent: str
    data: dict[str, Any]


class SessionStore:
    """Create, resume (and touch), update, end and list console sessions."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, *, id_hash: str, user_name: str, role: str, fingerprint: str,
               client: str, user_agent: str, data: dict[str, Any], now: datetime) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(m.ConsoleSession).values(
                id_hash=id_hash, user_name=user_name, role=role, fingerprint=fingerprint,
                created_at=now, last_seen_at=now, client=client, user_agent=user_agent,
                data=data))

    def resume(self, id_hash: str, *, now: datetime, idle_s: float,
               absolute_s: float) -> StoredSession | None:
        """The session if it is neither idle past ``idle_s`` nor older than ``absolute_s``,
        its last-seen moved to ``now`` in the same statement; an expired one is deleted."""
        s = m.ConsoleSession
        with self.engine.begin() as conn:
            row = conn.execute(
                update(s).where(s.id_hash == id_hash,
                                s.last_seen_at > now - timedelta(seconds=idle_s),
                                s.created_at > now - timedelta(seconds=absolute_s))
                .values(last_seen_at=now)
                .returning(s.id_hash, s.user_name, s.role, s.fingerprint, s.created_at,
                           s.last_seen_at, s.client, s.user_agent, s.data)).first()
            if row is None:
                conn.execute(delete(s).where(s.id_hash == id_hash))
                return None
        return StoredSession(*row)

    def save_data(self, id_hash: str, data: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(m.ConsoleSession).where(m.ConsoleSession.id_hash == id_hash)
                         .values(data=data))

    def end(self, id_hash: str) -> bool:
        """Delete one session; whether it existed."""
        with self.engine.begin() as conn:
            return conn.execute(delete(m.ConsoleSession)
                                .where(m.ConsoleSession.id_hash == id_hash)).rowcount > 0

    def end_user(self, user_name: str) -> int:
        """Delete every session of ``user_name``; how many there were."""
        with self.engine.begin() as conn:
            return int(conn.execute(delete(m.ConsoleSession)
                                    .where(m.ConsoleSession.user_name == user_name)).rowcount)

    def live(self, *, now: datetime, idle_s: float, absolute_s: float,
             user_name: str | None = None) -> list[StoredSession]:
        """The sessions not yet expired, oldest first; of ``user_name`` only when given."""
        s = m.ConsoleSession
        query = (select(s.id_hash, s.user_name, s.role, s.fingerprint, s.created_at,
                        s.last_seen_at, s.client, s.user_agent, s.data)
                 .where(s.last_seen_at > now - timedelta(seconds=idle_s),
                        s.created_at > now - timedelta(seconds=absolute_s))
                 .order_by(s.created_at))
        if user_name is not None:
            query = query.where(s.user_name == user_name)
        with self.engine.connect() as conn:
            return [StoredSession(*row) for row in conn.execute(query)]

    def prune(self, *, now: datetime, idle_s: float, absolute_s: float) -> int:
        """Delete the expired sessions; how many."""
        s = m.ConsoleSession
        with self.engine.begin() as conn:
            return int(conn.execute(delete(s).where(or_(
                s.last_seen_at <= now - timedelta(seconds=idle_s),
                s.created_at <= now - timedelta(seconds=absolute_s)))).rowcount)
