"""The console's paths: one line each, the pages themselves in ``pages/`` by area.

Every page needs a login; every POST needs the session's CSRF token and a role above viewer;
every action is audited with the logged-in identity (``web.page``).
"""

from __future__ import annotations

from starlette.routing import Route

from worker.entrypoints.console.pages import (
    audit,
    dead_letters,
    events,
    login,
    rejected,
    replay,
    waiting,
)

ROUTES = [
    Route("/static/console.css", login.style_sheet),
    Route("/login", login.login, methods=["GET", "POST"]),
    Route("/logout", login.logout, methods=["POST"]),
    Route("/", events.overview),
    Route("/customer", events.customer),
    Route("/entities/{entity_id:int}", events.entity),
    Route("/dlq", dead_letters.dead_letters),
    Route("/dlq/group", dead_letters.dead_letter_group),
    Route("/dlq/discard/plan", dead_letters.discard_plan),
    Route("/dlq/discard", dead_letters.discard_entities, methods=["POST"]),
    Route("/replay/plan", replay.replay_plan),
    Route("/replay/start", replay.replay_start, methods=["POST"]),
    Route("/jobs", replay.jobs),
    Route("/jobs/{job_id:int}", replay.job),
    Route("/jobs/{job_id:int}.json", replay.job),
    Route("/jobs/{job_id:int}/{command}", replay.job_control, methods=["POST"]),
    Route("/rejected", rejected.rejected_list),
    Route("/rejected/{rejected_id:int}", rejected.rejected_one),
    Route("/rejected/{rejected_id:int}/resubmit", rejected.rejected_resubmit, methods=["POST"]),
    Route("/audit", audit.audit),
    Route("/waiting", waiting.waiting),
    Route("/waiting/retry", waiting.waiting_retry, methods=["POST"]),
    Route("/waiting/give-up", waiting.waiting_give_up, methods=["POST"]),
]
