"""What every console page needs, built once by the app factory (``app.create_app``) and kept
in ``app.state.console``.

Its own module so that the pages and the app factory both import it without importing each
other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.templating import Jinja2Templates

from worker.adapters.postgres.jobs import ReplayJobStore
from worker.adapters.postgres.login_limits import LoginLimits
from worker.adapters.postgres.plans import SqlActionPlans
from worker.adapters.rabbitmq.backlog import QueueBacklogs
from worker.config import Settings
from worker.entrypoints.console.auth import UserDirectory
from worker.entrypoints.console.config import ConsoleSettings
from worker.entrypoints.console.sessions import SessionManager
from worker.usecases.support import EventSubmitter, SupportDeps

if TYPE_CHECKING:
    from sqlalchemy import Engine


@dataclass
class Console:
    """What every page needs; kept in ``app.state.console``."""

    settings: Settings
    console: ConsoleSettings
    engine: Engine
    support: SupportDeps
    submitter: EventSubmitter
    jobs: ReplayJobStore
    plans: SqlActionPlans
    users: UserDirectory
    limits: LoginLimits
    sessions: SessionManager
    templates: Jinja2Templates
    #: The queues' depths for the overview, over one broker connection kept between pages.
    backlogs: QueueBacklogs


def console_of(request: Request) -> Console:
    """The console state of the app serving ``request``."""
    console: Console = request.app.state.console
    return console
