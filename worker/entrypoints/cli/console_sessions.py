"""``console sessions list|revoke USER``: the console's logged-in sessions, and ending a
user's at once (a stolen laptop, someone leaving), audited."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from worker.domain.errors import WorkerError
from worker.entrypoints.cli import output
from worker.entrypoints.cli.output import fail, print_json, say, settings_or_exit
from worker.entrypoints.cli.webconsole import console_


@contextmanager
def _sessions() -> Iterator[tuple[Any, Any]]:
    """The console's session manager and the support services (for the audit)."""
    from worker.adapters.postgres.console_sessions import SessionStore
    from worker.adapters.postgres.unit_of_work import ConnectionLimits, make_engine
    from worker.bootstrap import build_support_deps
    from worker.entrypoints.console.auth import UserDirectory
    from worker.entrypoints.console.config import load_console_settings
    from worker.entrypoints.console.sessions import SessionManager

    settings = settings_or_exit()
    try:
        console = load_console_settings()
    except WorkerError as exc:
        fail(str(exc), 2, multiline=True)
    engine = make_engine(settings.database_url, pool_size=1,
                         limits=ConnectionLimits(pooler=settings.db_pooler))
    try:
        deps = build_support_deps(settings, engine)
        # The users file is not needed to list or end sessions.
        manager = SessionManager(SessionStore(engine), UserDirectory([]),
                                 idle_s=console.session_idle_s,
                                 absolute_s=console.session_max_age_s, clock=deps.clock)
        yield manager, deps
    except WorkerError as exc:
        fail(str(exc))
    finally:
        engine.dispose()


@console_.group("sessions")
def console_sessions() -> None:
    """The console's logged-in sessions: list them, end a user's."""


@console_sessions.command("list")
@click.option("--user", default=None, help="Only this user's sessions.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def sessions_list(user: str | None, as_json: bool) -> None:
    """The sessions not yet expired, oldest first: who, role at login, since when, last seen,
    from where."""
    with _sessions() as (manager, _deps):
        live = manager.live(user)
    rows = [{"user": s.user_name, "role": s.role, "created_at": s.created_at,
             "last_seen_at": s.last_seen_at, "client": s.client, "user_agent": s.user_agent,
             "id": s.id_hash[:12]} for s in live]
    if as_json:
        print_json(rows)
        return
    if not rows:
        say("no live console sessions" + (f" for {user}" if user else ""))
        return
    from worker.entrypoints.cli.render import table

    shown = table("console sessions", ["user", "role", "since", "last seen", "client",
                                       "browser", "id"])
    for r in rows:
        shown.add_row(r["user"], r["role"], f"{r['created_at']:%Y-%m-%d %H:%M:%S}Z",
                      f"{r['last_seen_at']:%Y-%m-%d %H:%M:%S}Z", r["client"],
                      r["user_agent"][:60], r["id"])
    output.console.print(shown)


@console_sessions.command("revoke")
@click.argument("user")
@click.option("--reason", required=True, help="Why (stored in the audit log).")
@click.option("--operator", default=None, help="Who (default: the OS user).")
def sessions_revoke(user: str, reason: str, operator: str | None) -> None:
    """End every session of USER now: their next request asks for a login. (To keep them out,
    remove them from the users file too.)"""
    from worker.usecases.support import default_operator

    with _sessions() as (manager, deps):
        ended = manager.revoke_user(user)
        with deps.uow() as uow:
            uow.ledger.audit(action="console_sessions_revoked",
                             operator=operator or default_operator(), reason=reason,
                             outcome=f"{ended} ended", now=deps.clock(),
                             details={"via": "cli", "user": user, "sessions": ended})
            uow.commit()
    say(f"{ended} console session{'s' if ended != 1 else ''} of {user} ended")
