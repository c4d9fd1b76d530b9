"""The console's app factory: settings, ledger, support services and pages wired in one place.

Nothing connects at import or construction: the engine connects on the first page.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.templating import Jinja2Templates

from worker.adapters.postgres.jobs import ReplayJobStore
from worker.adapters.postgres.plans import SqlActionPlans
from worker.config import Settings
from worker.entrypoints.console.auth import LoginLimiter, UserDirectory
from worker.entrypoints.console.config import ConsoleSettings
from worker.entrypoints.console.headers import SecurityHeaders
from worker.entrypoints.console.routes import ROUTES
from worker.entrypoints.console.state import Console
from worker.usecases.support import EventSubmitter, SupportDeps

if TYPE_CHECKING:
    from sqlalchemy import Engine

TEMPLATES = Path(__file__).parent / "templates"
SESSION_COOKIE = "coupon_console"


def create_app(settings: Settings, console: ConsoleSettings, *, engine: Engine | None = None,
               support: SupportDeps | None = None,
               submitter: EventSubmitter | None = None) -> Starlette:
    """The console app; ``engine``, ``support`` and ``submitter`` default to the real ones for
    ``settings`` (the support commands' Celery publisher sends both retries and events)."""
    from worker.adapters.postgres.unit_of_work import ConnectionLimits, make_engine
    from worker.bootstrap import build_support_deps

    engine = engine or make_engine(settings.database_url, pool_size=settings.db_pool_size,
                                   application_name="coupon-worker-console",
                                   limits=ConnectionLimits.from_settings(settings))
    support = support or build_support_deps(settings, engine)
    state = Console(
        settings=settings, console=console, engine=engine, support=support,
        submitter=submitter or cast(EventSubmitter, support.publisher),
        jobs=ReplayJobStore(engine),
        plans=SqlActionPlans(engine),
        users=UserDirectory.load(console.users),
        limiter=LoginLimiter(console.login_max_failures, console.login_window_s),
        templates=Jinja2Templates(directory=str(TEMPLATES)),
    )
    app = Starlette(
        routes=ROUTES,
        middleware=[Middleware(SecurityHeaders), Middleware(
            SessionMiddleware, secret_key=console.secret.get_secret_value(),
            session_cookie=SESSION_COOKIE, max_age=console.session_max_age_s,
            same_site="strict", https_only=console.secure_cookies)],
    )
    app.state.console = state
    return app
