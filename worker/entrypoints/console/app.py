"""The console's app factory: settings, ledger, support services and pages wired in one place.

Nothing connects at import or construction: the engine connects on the first page.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.templating import Jinja2Templates

from worker.adapters.postgres.console_sessions import SessionStore
from worker.adapters.postgres.jobs import ReplayJobStore
from worker.adapters.postgres.login_limits import LoginLimits
from worker.adapters.postgres.plans import SqlActionPlans
from worker.adapters.rabbitmq.backlog import QueueBacklogs
from worker.config import Settings
from worker.entrypoints.console.auth import UserDirectory
from worker.entrypoints.console.config import ConsoleSettings
from worker.entrypoints.console.headers import SecurityHeaders
from worker.entrypoints.console.proxies import TrustedProxyHeaders
from worker.entrypoints.console.routes import ROUTES
from worker.entrypoints.console.sessions import ServerSessions, SessionManager
from worker.entrypoints.console.state import Console
from worker.secret_files import Secret
from worker.usecases.support import EventSubmitter, SupportDeps

if TYPE_CHECKING:
    from sqlalchemy import Engine

TEMPLATES = Path(__file__).parent / "templates"


def create_app(settings: Settings, console: ConsoleSettings, *, engine: Engine | None = None,
               support: SupportDeps | None = None,
               submitter: EventSubmitter | None = None) -> Starlette:
    """The console app; ``engine``, ``support`` and ``submitter`` default to the real ones for
    ``settings`` (the support commands' Celery publisher sends both retries and events)."""
    from worker.adapters.postgres.unit_of_work import ConnectionLimits, make_engine
    from worker.bootstrap import build_support_deps

    engine = engine or make_engine(settings.database_url, pool_size=settings.db_pool_size,
                                   password=settings.database_secret(),
                                   application_name="coupon-worker-console",
                                   limits=ConnectionLimits.from_settings(settings))
    support = support or build_support_deps(settings, engine)
    users = UserDirectory.load(console.users, check_every_s=console.users_check_s)
    sessions = SessionManager(SessionStore(engine), users, idle_s=console.session_idle_s,
                              absolute_s=console.session_max_age_s, clock=support.clock)
    users.on_change = sessions.revoke_users
    state = Console(
        settings=settings, console=console, engine=engine, support=support,
        submitter=submitter or cast(EventSubmitter, support.publisher),
        jobs=ReplayJobStore(engine),
        plans=SqlActionPlans(engine),
        users=users,
        limits=LoginLimits(engine, max_failures=console.login_max_failures,
                           window_s=console.login_window_s, base_s=console.login_backoff_s,
                           cap_s=console.login_backoff_max_s),
        sessions=sessions,
        templates=Jinja2Templates(directory=str(TEMPLATES)),
        backlogs=QueueBacklogs(settings),
    )
    # Follows COUPONS_CONSOLE_SECRET_FILE when the secret is given as a file.
    session_secret = Secret.of(console, "secret")
    assert session_secret is not None
    app = Starlette(
        routes=ROUTES,
        # Outermost first: the proxy's headers are sorted out before HSTS reads the scheme
        # and before a session is looked up.
        middleware=[
            Middleware(TrustedProxyHeaders, proxies=console.proxies(),
                       identity_header=console.proxy_user_header),
            Middleware(SecurityHeaders),
            Middleware(ServerSessions, manager=sessions, secret=session_secret,
                       https_only=console.secure_cookies)],
    )
    app.state.console = state
    return app
