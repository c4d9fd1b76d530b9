"""The sweeper (worker step): a thread of the main process that runs ``worker.usecases.sweep``.

Every ``COUPONS_SWEEP_INTERVAL_SECONDS`` it recovers crashed claims, dispatches due retries to
``coupons.retry`` and publishes dead letters; after each sweep it records, in the links, which
queues ``worker.domain.policy`` says should pause (the guard carries that out).

When ``COUPONS_RETENTION_DAYS`` is set, a second thread tries, every minute, to claim the
fleet's scheduled prune (``worker.usecases.retention.run_scheduled``): one worker runs it per
``COUPONS_RETENTION_INTERVAL_SECONDS``, beside the sweep rather than inside it, so a long prune
never holds up retries and dead letters.

What only these threads run is imported when they start, after the prefork pool has forked:
the pool processes never run it (see ``worker_steps._freeze_before_fork``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import bootsteps

from worker.adapters.postgres.unit_of_work import ConnectionLimits, make_engine
from worker.domain.errors import LedgerUnavailable
from worker.domain.runtime_policy import consumption_for_circuit, consumption_for_ledger_down
from worker.entrypoints.celery.context import container_of, links_of, step_settings
from worker.usecases.deps import Deps
from worker.usecases.support import SupportDeps

log = logging.getLogger(__name__)

_RUN = bootsteps.RUN  # type: ignore[attr-defined]  # not in the stubs
#: How often a worker asks whether the fleet's prune is due: one cheap UPDATE.
RETENTION_CHECK_S = 60.0
#: The longest one replay step paces its items for while holding its job's row lock: well
#: under the lock timeout (COUPONS_DB_LOCK_TIMEOUT_SECONDS) an operator's pause may wait.
REPLAY_STEP_MAX_S = 1.0


def _probe_on_new_credentials(deps: Deps,
                              seen: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """When the Capillary credentials' files changed since ``seen``, a circuit paused (by a
    wrong key, say) probes at once instead of at its time; the versions to remember next."""
    now_seen = deps.credentials()
    if seen is None or now_seen == seen:
        return now_seen
    done = deps.circuit.probe_now("Capillary credentials changed")
    # A probe already out used the credentials of before: once it answers, look again.
    return now_seen if done else seen


class Sweeper(bootsteps.StartStopStep):
    """Runs ``worker.usecases.sweep`` every ``COUPONS_SWEEP_INTERVAL_SECONDS`` in the main process.

    The pool forks children while this thread runs (at start and whenever a child is
    replaced). A fork copies locks held by other threads in their held state, and a module
    import holds one, so every module the loop needs is imported here, in the main thread,
    before the thread starts (``worker.usecases.sweep`` at this module's import, the dependencies by
    building them once in ``start``); the loop itself then never imports.
    """

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._worker = parent
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._retention: threading.Thread | None = None

    def start(self, parent: Any) -> None:
        if not step_settings(parent).run_sweeper:
            log.info("sweeper.disabled")
            return
        try:
            container_of(parent.app).deps()
        except Exception:
            log.exception("sweeper.warm_up_failed")
        self._thread = threading.Thread(target=self._loop, name="coupon-sweeper", daemon=True)
        self._thread.start()
        if step_settings(parent).retention_days is not None:
            self._retention = threading.Thread(target=self._retention_loop,
                                               name="coupon-retention", daemon=True)
            self._retention.start()

    def stop(self, parent: Any) -> None:
        self._stop.set()
        for thread in (self._thread, self._retention):
            if thread is not None:
                thread.join(timeout=10)

    def _worker_running(self) -> bool:
        # A worker that is stopping, or failed before it fully started (Celery then skips the
        # steps' stop), must not keep sweeping: that would make a dead worker look busy.
        blueprint = getattr(self._worker, "blueprint", None)
        return bool(getattr(blueprint, "state", None) == _RUN)

    def _loop(self) -> None:
        from worker.usecases.sweep import sweep

        container = container_of(self._worker.app)
        links = links_of(self._worker.app)
        interval_s = container.settings.sweep_interval_s
        credentials: tuple[int, ...] | None = None
        while not self._stop.is_set() and self._worker_running():
            paced_s = 0.0
            try:
                deps = container.deps()
                credentials = _probe_on_new_credentials(deps, credentials)
                report = sweep(deps, requeue_after_s=container.settings.requeue_after_s)
                circuit = deps.circuit.state()
                links.pause = consumption_for_circuit(
                    circuit_state=circuit.state, reason=circuit.reason,
                    open_until=circuit.open_until, now=deps.clock())
                if report.dispatched or report.leases_expired or report.dead_letters_published:
                    log.info("sweep.done", extra=report.__dict__)
                # Replay jobs confirmed in the console: this worker steps one if it is due,
                # spacing its items until the next sweep; that time counts as the wait.
                paced_s = self._step_replays(container.support_deps(), container.engine,
                                             interval_s)
            except LedgerUnavailable as exc:
                links.pause = consumption_for_ledger_down(str(exc))
                log.error("sweep.ledger_unavailable", extra={"error": str(exc)})
            except Exception:
                log.exception("sweep.failed")
            self._stop.wait(max(0.0, interval_s - paced_s))

    @staticmethod
    def _step_replays(support: SupportDeps, engine: Any, interval_s: float) -> float:
        """Step replay jobs until the next sweep is due, in steps of at most
        ``REPLAY_STEP_MAX_S`` (a step holds its job's row lock: an operator's pause waits for
        it); the seconds spent."""
        from worker.adapters.postgres.jobs import ReplayJobStore
        from worker.usecases import replay_jobs

        store = ReplayJobStore(engine)
        started = time.monotonic()
        while True:
            left_s = interval_s - (time.monotonic() - started)
            stepped = replay_jobs.step_replay_jobs(
                support, store, horizon_s=max(0.01, min(left_s, REPLAY_STEP_MAX_S)))
            if not stepped or time.monotonic() - started >= interval_s:
                return time.monotonic() - started

    def _retention_loop(self) -> None:
        from worker.adapters.postgres.retention import RetentionStore
        from worker.usecases import retention

        container = container_of(self._worker.app)
        settings = container.settings
        policy = retention.policy_from(settings)
        # The retention role's own connection when one is set: the worker's role may not delete.
        own = None if settings.retention_database_url is None else make_engine(
            settings.retention_database_url, pool_size=1, application_name="coupon-retention",
            limits=ConnectionLimits.from_settings(settings))
        try:
            while not self._stop.wait(RETENTION_CHECK_S) and self._worker_running():
                try:
                    deps = container.deps()
                    retention.run_scheduled(
                        RetentionStore(own or container.engine), policy,
                        every_s=settings.retention_interval_s, worker=deps.worker_id,
                        pruned=deps.metrics.ledger_pruned)
                except LedgerUnavailable as exc:
                    log.error("retention.ledger_unavailable", extra={"error": str(exc)})
                except Exception:
                    log.exception("retention.failed")
        finally:
            if own is not None:
                own.dispose()
